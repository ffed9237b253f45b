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
                                 "serve", "report", "import", "export")]
    + [["data", "verify", "--help"]],
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


def test_every_option_with_a_default_shows_it_in_help():
    import argparse

    from metatransfer.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = []
    for parser in parsers(build_parser()):
        for action in parser._actions:
            if action.default in (None, False, [], argparse.SUPPRESS) or not action.help:
                continue
            if "default" not in action.help:
                missing.append(f"{parser.prog} {action.option_strings}")
    assert not missing, missing
    help_text = {cmd: _help(cmd) for cmd in ("serve", "adapt")}
    assert "(default: 8000)" in help_text["serve"] and "(default: 1)" in help_text["adapt"]


def _help(command: str) -> str:
    from metatransfer.cli import build_parser

    for action in build_parser()._subparsers._group_actions:
        return action.choices[command].format_help()
    return ""


def test_listing_commands(capsys):
    from metatransfer.cli import main

    main(["config", "keys"])
    out = capsys.readouterr().out
    assert "eval.episodes" in out and "int = 600" in out and "episodes per" in out
    main(["config", "show", "--preset", "glyphs-conv4", "--set", "meta.inner_steps=7"])
    assert "inner_steps: 7" in capsys.readouterr().out
    main(["data", "list"])
    out = capsys.readouterr().out
    assert "miniimagenet" in out and "train.csv" in out and "glyphs" in out
    main(["import", "--list"])
    assert "authors-meta" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["import", "rfs"])
    assert exc.value.code == 2 and "mtl import --list" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["presets"], ["config", "keys"], ["config", "show"],
                                  ["data", "list"]])
def test_a_closed_pipe_is_quiet(argv):
    """`mtl presets | head -1`: the reader stops early; no BrokenPipeError traceback."""
    code = ("import sys; sys.argv = ['mtl'] + sys.argv[1:]\n"
            "from metatransfer.cli import main\nmain(sys.argv[1:])")
    for read_first_line in (True, False):  # the reader leaves after one line, or at once
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        if read_first_line:
            assert proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
        assert "Traceback" not in err and "BrokenPipe" not in err, err
        assert proc.returncode in (0, 141)  # 141: stopped by the closed pipe, like SIGPIPE


def test_config_show_without_a_preset_is_what_run_uses(capsys):
    """`diff <(mtl config show) runs/<run>/config.yaml` differs only in `out`."""
    import yaml

    from metatransfer.cli import build_parser, main, resolve_run_config
    from metatransfer.config import to_dict

    main(["config", "show"])
    captured = capsys.readouterr()
    shown = yaml.safe_load(captured.out)
    assert "glyphs-conv4" in captured.err
    run = to_dict(resolve_run_config(build_parser().parse_args(["run"])))
    assert {k: v for k, v in shown.items() if k != "out"} == \
        {k: v for k, v in run.items() if k != "out"}
    assert shown["meta"]["epochs"] == 12 and shown["meta"]["lr_ss"] == 0.002
    main(["config", "show", "--set", "meta.epochs=3"])
    assert yaml.safe_load(capsys.readouterr().out)["meta"]["lr_ss"] == 0.002  # still the preset
