"""A torch and a torchvision from different builds: one line naming both and the fix.

The failure is reproduced in a child process by making ``import torchvision`` raise what
a mismatched pair raises (``RuntimeError: operator torchvision::nms does not exist``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from metatransfer.versions import matching_torchvision, reinstall_command

BROKEN = """
import importlib.abc, sys
class Mismatched(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            raise RuntimeError("operator torchvision::nms does not exist")
sys.meta_path.insert(0, Mismatched())
sys.modules.pop("torchvision", None)
from metatransfer.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("argv", [
    ["run", "--quiet", "--set", "device=cpu"],
    ["adapt", "--checkpoint", "nowhere", "--support", "s", "--query", "q"],
])
def test_mismatched_torchvision_is_one_line(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-c", BROKEN, *argv], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert "come from different builds" in line
    assert "operator torchvision::nms does not exist" in line
    assert "pip install --force-reinstall torch==" in line and "torchvision==0." in line
    assert not (tmp_path / "runs").exists()  # stopped before any run directory


def test_reinstall_command_pairs_the_versions():
    assert matching_torchvision("2.14.1+cpu") == "0.29.*"
    assert matching_torchvision("2.0.1") == "0.15.*"
    assert matching_torchvision("1.13.1") is None
    assert reinstall_command("2.14.1+cpu") == ("pip install --force-reinstall torch==2.14.1 "
                                               "'torchvision==0.29.*' --index-url "
                                               "https://download.pytorch.org/whl/cpu")
    assert reinstall_command("2.5.0") == "pip install --force-reinstall torch==2.5.0 " \
                                         "'torchvision==0.20.*'"
