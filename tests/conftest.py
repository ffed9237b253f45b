"""Shared fixtures: an isolated cache dir, the shared data path, and a tiny toy dataset.

The ``toy`` dataset is registered only for tests: classes are random 16x16 patterns plus
noise, so a tiny Conv-4 learns them in seconds and phases can be run end to end fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metatransfer.config import DATA_ENV, DataConfig, EvalConfig, data_search_path
from metatransfer.data.base import ImageSplit
from metatransfer.data.registry import register_dataset
from metatransfer.methods.catalog import create_method

# the real data, found as the presets find it: $METATRANSFER_DATA, else ../shared/data
SHARED_DATA = next((p for p in data_search_path() if p.is_dir()), data_search_path()[0])
NO_DATA_HINT = f"set {DATA_ENV} to the folder holding miniimagenet/ and omniglot/"

torch.set_num_threads(2)

TOY_SPLITS = {"train": (0, 12), "val": (12, 18), "test": (18, 24)}


def make_method(name: str, steps: int = 0, lr: float = 0.0, head=None):
    """Method ``name`` with these inner-loop settings (and θ_0 ``head`` for ``mtl``)."""
    return create_method(name, EvalConfig(inner_steps=steps, inner_lr=lr), head)


def make_toy_split(split: str, per_class: int = 24, size: int = 16) -> ImageSplit:
    lo, hi = TOY_SPLITS[split]
    protos = np.random.default_rng(99).integers(0, 256, size=(24, size, size, 1))
    rng = np.random.default_rng([hi, per_class])
    images, labels = [], []
    for label, cls in enumerate(range(lo, hi)):
        noise = rng.normal(0, 40, size=(per_class, size, size, 1))
        images.append(np.clip(protos[cls] + noise, 0, 255).astype(np.uint8))
        labels += [label] * per_class
    return ImageSplit(np.concatenate(images), np.array(labels, dtype=np.int64),
                      [f"toy{c}" for c in range(lo, hi)], f"toy/{split}", (0.5,), (0.25,))


@register_dataset("toy")
def load_toy(cfg: DataConfig, split: str) -> ImageSplit:
    return make_toy_split(split)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Never write to the user's cache from tests."""
    monkeypatch.setenv("METATRANSFER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared offline data not found at {SHARED_DATA}; {NO_DATA_HINT}")
    return SHARED_DATA


def tiny_overrides(out: Path) -> list[str]:
    """Config overrides for a seconds-long end-to-end run on the toy dataset."""
    return [
        "data.name=toy", f"out={out}", "device=cpu",
        "model.backbone_args={width: 8}",
        "pretrain.epochs=2", "pretrain.batch_size=32", "pretrain.val_episodes=10",
        "pretrain.lr=0.05",
        "meta.epochs=2", "meta.episodes_per_epoch=3", "meta.inner_steps=5",
        "meta.val_episodes=10", "meta.queries=5", "meta.meta_batch=2", "meta.ht=resample",
        "eval.episodes=20", "eval.inner_steps=5", "eval.queries=5", "eval.shots=[1,5]",
    ]


def run_tiny(out: Path, *extra: str) -> Path:
    """``mtl run`` of :func:`tiny_overrides` (plus ``extra`` overrides) into ``out``."""
    from metatransfer.cli import main

    args = ["run", "--quiet"]
    for item in [*tiny_overrides(out), *extra]:
        args += ["--set", item]
    main(args)
    return out
