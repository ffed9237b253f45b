"""``benchmarks/vs_authors.py`` without the authors' code: one clear line and exit 2, and
``--help``. The comparison itself is a benchmark (minutes of ResNet-25 steps), not a test.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "vs_authors.py"
CLONE = "git clone https://github.com/yaoyao-liu/meta-transfer-learning"


def load():
    if str(BENCH) not in sys.path:  # it imports the benchmarks' shared timing.py
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_vs_authors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_checkout_one_line_exit_2(tmp_path):
    """From the command line: exit status 2, one line naming the path and how to get the
    code, no traceback, nothing on stdout."""
    missing = tmp_path / "no-such-checkout"
    out = subprocess.run([sys.executable, str(SCRIPT), "--authors", str(missing), "--quick"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(missing) in lines[0] and "does not exist" in lines[0]
    assert CLONE in lines[0]


@pytest.mark.parametrize("tree", ["empty", "other"])
def test_folder_without_their_code(tmp_path, capsys, tree):
    """An existing folder that is not their checkout, or no --authors at all."""
    if tree == "other":
        (tmp_path / "pytorch" / "models").mkdir(parents=True)  # no mtl.py in it
    assert load().main(["--authors", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pytorch/models/mtl.py" in err[0] and CLONE in err[0]
    assert load().main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--authors" in err[0] and CLONE in err[0]


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        load().main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--authors", "--data", "--amp", "--threads", "--quick", "--iters"):
        assert option in text
