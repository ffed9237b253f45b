"""Same seed and config on CPU -> byte-identical results.json and model files; every run
directory records the resolved config, versions, git commit and device."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_overrides

from metatransfer.cli import main
from metatransfer.config import from_dict

pytestmark = pytest.mark.slow  # end-to-end runs of the phases


def run_once(out, amp: str) -> None:
    args = ["run", "--quiet"]
    for item in [*tiny_overrides(out), "threads=1", "pretrain.epochs=1", "meta.epochs=1",
                 "eval.episodes=10", f"amp={amp}"]:
        args += ["--set", item]
    threads = torch.get_num_threads()
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("amp,precision", [("off", "fp32"), ("bf16", "bf16")])
def test_same_seed_same_bytes(tmp_path, amp, precision):
    """Within one precision; bf16 is forced here even where the CPU only emulates it."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_once(a, amp)
    run_once(b, amp)
    for name in ("results.json", "pretrain_best.safetensors", "meta_best.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    results = json.loads((a / "results.json").read_text())
    assert "eval_seconds" not in results  # wall-clock figures live in timing.json
    assert results["precision"] == precision
    assert json.loads((a / "timing.json").read_text())["eval_seconds"] >= 0

    env = json.loads((a / "environment.json").read_text())
    for key in ("metatransfer", "torch", "python", "device", "git_commit", "numpy"):
        assert key in env, key
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["amp"] == amp and env["precision"] == precision
    cfg = from_dict(yaml.safe_load((a / "config.yaml").read_text()))  # the resolved config
    assert cfg.seed == 0 and cfg.data.name == "toy" and cfg.out == str(a)
