"""The CLI starts fast: parsing, `--help`, `--version` and `presets` never import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "safetensors", "PIL", "matplotlib", "metatransfer.adapt")

CHECK = """
import sys
from metatransfer.cli import build_parser, main
build_parser()
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("argvs", [
    [],
    [["--help"], ["--version"], ["presets"]],
    [[cmd, "--help"] for cmd in ("run", "pretrain", "meta-train", "meta-test", "adapt",
                                 "serve", "report", "import")] + [["data", "verify", "--help"]],
])
def test_cli_does_not_import_torch(argvs):
    code = CHECK.format(argvs=argvs, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_package_import_is_light_and_api_is_lazy():
    code = ("import sys, metatransfer; assert 'torch' not in sys.modules; "
            "from metatransfer import FewShotClassifier; assert 'torch' in sys.modules; "
            "print(FewShotClassifier.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "FewShotClassifier"
