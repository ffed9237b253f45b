"""Same seed and config on CPU -> byte-identical results.json and model files; every run
directory records the resolved config, versions, git commit and device."""

from __future__ import annotations

import json

import torch
import yaml
from conftest import tiny_overrides

from metatransfer.cli import main
from metatransfer.config import from_dict


def run_once(out) -> None:
    args = ["run", "--quiet"]
    for item in [*tiny_overrides(out), "threads=1", "pretrain.epochs=1", "meta.epochs=1",
                 "eval.episodes=10"]:
        args += ["--set", item]
    threads = torch.get_num_threads()
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        torch.set_num_threads(threads)


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_once(a)
    run_once(b)
    for name in ("results.json", "pretrain_best.safetensors", "meta_best.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    results = json.loads((a / "results.json").read_text())
    assert "eval_seconds" not in results  # wall-clock figures live in timing.json
    assert json.loads((a / "timing.json").read_text())["eval_seconds"] >= 0

    env = json.loads((a / "environment.json").read_text())
    for key in ("metatransfer", "torch", "python", "device", "git_commit", "numpy"):
        assert key in env, key
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    cfg = from_dict(yaml.safe_load((a / "config.yaml").read_text()))  # the resolved config
    assert cfg.seed == 0 and cfg.data.name == "toy" and cfg.out == str(a)
