"""Data parallel under torchrun, checked on CPU with gloo and 2 processes.

Two processes must compute what one process computes with the same global batch:
pre-training parameters, meta-training parameters (hard tasks included) and meta-test
per-episode accuracies (hence mean and CI). The 1-process references run in the test
process; the 2-process runs happen once, in spawned workers, for the whole module.
A last test launches a tiny ``mtl run`` with ``torchrun --nproc_per_node=2``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_overrides
from torch import nn

from metatransfer import distributed
from metatransfer.checkpoints import PRETRAIN_NAME as BEST
from metatransfer.config import eval_seed, load_config
from metatransfer.data import load_split
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.evaluation import evaluate, evaluate_all_ranks
from metatransfer.loader import CheckpointPaths, load_models
from metatransfer.methods.mtl import MTL
from metatransfer.models.backbones import register_backbone
from metatransfer.models.ss import SSConv2d
from metatransfer.phases.common import make_embedder
from metatransfer.phases.meta_test import meta_test
from metatransfer.phases.meta_train import meta_train
from metatransfer.phases.pretrain import pretrain
from metatransfer.runs import RunDir

pytestmark = pytest.mark.slow  # end-to-end runs of the phases

WORLD = 2
CPU = torch.device("cpu")
EPISODES = 25  # odd: the ranks get uneven shares


@register_backbone("test-nobn")
class NoBNConv(nn.Module):
    """Two convs, no BatchNorm: with BN, each rank normalises over its half of the batch,
    so only a BN-free net can equal the 1-process run exactly (see pretrain.sync_bn)."""

    def __init__(self, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.conv1 = SSConv2d(in_channels, width, 3, padding=1)
        self.conv2 = SSConv2d(width, width, 3, stride=2, padding=1)
        self.out_dim = width

    def stages(self) -> list[nn.Module]:
        return [self.conv1, self.conv2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return x.mean((2, 3))


# fp32: ranks are compared to 1e-5, and with shards of another size the gradients sum in
# another order; bf16 forward passes round such differences up to a whole bf16 ulp.
FP32 = ["amp=off"]


def pretrain_cfg(out: Path):
    return load_config(overrides=tiny_overrides(out) + FP32 + [
        "model.backbone=test-nobn", "data.augment=none", "pretrain.epochs=1",
        "pretrain.batch_size=96"])  # 288 toy images: 3 steps of a 96-image global batch


META_VARIANTS = {
    # uneven shares; θ_0 learned, so its gradient is checked across ranks too
    "meta": ["meta.meta_batch=3", "meta.ht=resample", "meta.ht_tasks=3",
             "meta.head_init=learned"],
    "meta_one": ["meta.meta_batch=1", "meta.ht=reuse", "meta.ht_tasks=1",  # rank 1 idle
                 "meta.head_init=learned"],
}


def meta_cfg(out: Path, variant: str = "meta"):
    return load_config(overrides=tiny_overrides(out) + FP32 + [
        "meta.epochs=1", "meta.episodes_per_epoch=2", *META_VARIANTS[variant]])


def eval_cfg(out: Path):
    return load_config(overrides=tiny_overrides(out) + FP32 + [f"eval.episodes={EPISODES}"])


def mtl_accuracies(cfg, meta_path: Path, pretrained: Path, all_ranks: bool) -> np.ndarray:
    """Per-episode accuracies of ``mtl`` 5-way 1-shot, in one process or gathered."""
    split = load_split(cfg.data, "test")
    model = load_models(CheckpointPaths(meta_path, pretrained), ["mtl"])["mtl"]
    embedder = make_embedder(cfg, model.backbone.eval(), split, CPU, model.info.feature_norm)
    sampler = EpisodeSampler(split.indices_by_class, 5, 1, cfg.eval.queries, eval_seed(cfg))
    mtl = MTL(model.head, cfg.eval.inner_steps, cfg.eval.inner_lr)
    if all_ranks:
        return evaluate_all_ranks(mtl, embedder, split, sampler, EPISODES)
    return evaluate(mtl, embedder, split, sampler, np.arange(EPISODES))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, job, args: tuple) -> None:
    """One torchrun-like process: the environment torchrun sets, then ``job``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu") == CPU
    try:
        job(*args)
    finally:
        distributed.shutdown()


def spawn(job, *args) -> None:
    mp.spawn(_worker, args=(WORLD, free_port(), job, args), nprocs=WORLD, join=True)


def two_rank_phases(root: Path) -> None:
    """Every phase on 2 ranks, from the same inputs as the 1-process references."""
    main = distributed.is_main()
    assert distributed.world_size() == WORLD
    pretrain(pretrain_cfg(root / "pre2"), RunDir(root / "pre2", main), CPU, show=False)
    for variant in META_VARIANTS:
        meta_train(meta_cfg(root / f"{variant}2", variant), RunDir(root / f"{variant}2", main),
                   CPU, root / "init" / BEST, show=False)
    cfg = eval_cfg(root / "test2")
    meta_path = root / "meta1" / "meta_best.safetensors"
    meta_test(cfg, RunDir(root / "test2", main), CPU, meta_path, root / "init" / BEST, False)
    acc = mtl_accuracies(cfg, meta_path, root / "init" / BEST, all_ranks=True)
    if main:
        np.save(root / "acc2.npy", acc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    pretrain(pretrain_cfg(root / "pre1"), RunDir(root / "pre1"), CPU, show=False)
    init = load_config(overrides=tiny_overrides(root / "init") + ["pretrain.epochs=0"])
    pretrain(init, RunDir(root / "init"), CPU, show=False)  # an untrained conv4 checkpoint
    for variant in META_VARIANTS:
        meta_train(meta_cfg(root / f"{variant}1", variant), RunDir(root / f"{variant}1"), CPU,
                   root / "init" / BEST, show=False)
    meta_test(eval_cfg(root / "test1"), RunDir(root / "test1"), CPU,
              root / "meta1" / "meta_best.safetensors", root / "init" / BEST, False)
    spawn(two_rank_phases, root)
    return root


def assert_states_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_pretrain_two_ranks_equal_one_rank(runs):
    one, two = RunDir(runs / "pre1").load_state("pretrain"), RunDir(runs / "pre2").load_state(
        "pretrain")
    initial = NoBNConv(1, 8).state_dict()
    assert not torch.equal(one["backbone"]["conv1.weight"], initial["conv1.weight"])
    assert_states_close(one["backbone"], two["backbone"])
    assert_states_close(one["head"], two["head"])
    m1 = [r for r in RunDir(runs / "pre1").metrics() if r["phase"] == "pretrain"]
    m2 = [r for r in RunDir(runs / "pre2").metrics() if r["phase"] == "pretrain"]
    assert len(m2) == 1, "rank 0 alone logs"
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-5)
    assert m2[0]["val_acc"] == pytest.approx(m1[0]["val_acc"], abs=1e-9)


@pytest.mark.parametrize("variant", list(META_VARIANTS))
def test_meta_train_two_ranks_equal_one_rank(runs, variant):
    one = RunDir(runs / f"{variant}1").load_state("meta")
    two = RunDir(runs / f"{variant}2").load_state("meta")
    assert one["learner"]["weight0"].abs().sum() > 0, "theta_0 moved"
    assert_states_close(one["learner"], two["learner"])
    def trained(run: str) -> list[dict]:  # epoch 0, the starting model, has no train loss
        return [r for r in RunDir(runs / run).metrics() if r["phase"] == "meta" and "loss" in r]

    m1, m2 = trained(f"{variant}1"), trained(f"{variant}2")
    for key in ("loss", "train_acc", "hard_acc"):
        assert m2[0][key] == pytest.approx(m1[0][key], rel=1e-5), key


def test_meta_test_two_ranks_give_the_same_episodes_mean_and_ci(runs):
    cfg = eval_cfg(runs / "x")
    one = mtl_accuracies(cfg, runs / "meta1" / "meta_best.safetensors", runs / "init" / BEST,
                         all_ranks=False)
    two = np.load(runs / "acc2.npy")
    assert len(two) == EPISODES and np.array_equal(one.astype(np.float64), two)
    r1 = json.loads((runs / "test1" / "results.json").read_text())
    r2 = json.loads((runs / "test2" / "results.json").read_text())
    assert r1["results"] == r2["results"]  # mean and CI of every method and setting
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r2["training"]["meta_batch"] == 2 and r2["training"]["pretrain_batch_size"] == 32


def test_shares_cover_everything_once():
    shares = [distributed.shard(7, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(7))
    full = distributed.gather_by_index(shares[1], np.array([0.5, 0.25]), 7)  # 1 process
    assert full.tolist() == [0, 0.5, 0, 0, 0.25, 0, 0]


def write_folder_dataset(root: Path, per_class: int = 12, size: int = 16) -> None:
    """A tiny ``folder`` dataset (PNG files): 12 train, 6 val, 6 test classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    splits = {"train": 12, "val": 6, "test": 6}
    for split, classes in splits.items():
        for c in range(classes):
            proto = rng.integers(0, 256, size=(size, size, 3))
            folder = root / split / f"{split}{c:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                noisy = np.clip(proto + rng.normal(0, 40, proto.shape), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(folder / f"{i}.png")


def test_torchrun_two_processes_tiny_run(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    write_folder_dataset(data)
    overrides = [o for o in tiny_overrides(out) if not o.startswith(("data.name", "eval.shots"))]
    overrides += ["data.name=folder", f"data.root={data}", "data.image_size=16",
                  "pretrain.epochs=1", "pretrain.val_queries=5", "meta.epochs=1",
                  "eval.episodes=10", "eval.shots=[1]"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "-m", "metatransfer", "run", "--quiet"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("results.json")) \
        == ["run/results.json"]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == WORLD and len(results["results"]) == 3
    assert json.loads((out / "environment.json").read_text())["world_size"] == WORLD
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    phases = [r["phase"] for r in records if "loss" in r]  # meta's epoch 0 has no loss
    assert sorted(phases) == ["meta", "pretrain"], "one record per epoch, from rank 0 only"
    assert [r["step"] for r in records if "loss" not in r] == [0]  # the starting model
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 5-way 1-shot |")]
    assert len(rows) == 1, "the table is printed once"
    assert proc.stdout.count("| mtl − ft |") == 1, "and the paired differences once"
