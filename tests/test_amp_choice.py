"""amp=auto per network: the rule with a stubbed probe, the cache, and a real probe."""

from __future__ import annotations

import json

import pytest
import torch

from metatransfer import amp_choice
from metatransfer.amp_choice import MIN_SPEEDUP, choose_amp, step_seconds
from metatransfer.config import load_config
from metatransfer.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture
def probe(monkeypatch):
    """A CPU with native bf16 whose probe returns the given (fp32, bf16) seconds."""
    calls = []
    timings = {"value": (1.0, 1.0)}

    def fake_measure(backbone, args, channels, size, device):
        calls.append((backbone, size))
        return timings["value"]

    monkeypatch.setattr(amp_choice, "native_bf16", lambda device: True)
    monkeypatch.setattr(amp_choice, "measure", fake_measure)
    monkeypatch.setattr(amp_choice, "_MEASURED", {})
    return timings, calls


def test_bf16_slower_for_the_network_means_fp32(probe, tmp_path):
    timings, calls = probe
    timings["value"] = (1.0, 1.4)  # Lite0 on Zen 4/5: bf16 at 0.71x
    choice = choose_amp("auto", CPU, "timm:tf_efficientnet_lite0", {}, 3, 56,
                        cache=tmp_path / "c.json")
    assert choice.amp == "off" and choice.speedup == pytest.approx(1 / 1.4, abs=1e-3)
    assert choice.reason.startswith("fp32: bf16 ran 0.71x") and "56 px" in choice.reason
    assert calls == [("timm:tf_efficientnet_lite0", 56)]


def test_bf16_faster_means_bf16_and_a_tie_means_fp32(probe, tmp_path):
    timings, _ = probe
    timings["value"] = (1.0, 0.5)
    assert choose_amp("auto", CPU, "conv4", {}, 1, 84, cache=tmp_path / "a.json").amp == "bf16"
    timings["value"] = (1.0, 1.0 / (MIN_SPEEDUP - 0.01))  # faster, but within noise
    amp_choice._MEASURED.clear()
    assert choose_amp("auto", CPU, "conv4", {}, 1, 84, cache=tmp_path / "b.json").amp == "off"


def test_the_choice_is_cached_per_backbone_and_size(probe, tmp_path):
    timings, calls = probe
    timings["value"] = (2.0, 1.0)
    cache = tmp_path / "amp.json"
    first = choose_amp("auto", CPU, "resnet12", {}, 3, 84, cache=cache)
    timings["value"] = (1.0, 2.0)  # would flip the choice, were it measured again
    amp_choice._MEASURED.clear()
    again = choose_amp("auto", CPU, "resnet12", {}, 3, 84, cache=cache)
    assert first.amp == again.amp == "bf16" and len(calls) == 1
    assert "cached in" in again.reason
    (entry,) = json.loads(cache.read_text()).values()
    assert entry == {"fp32_s": 2.0, "bf16_s": 1.0}
    other = choose_amp("auto", CPU, "resnet12", {}, 3, 160, cache=cache)  # another size
    assert other.amp == "off" and len(calls) == 2


def test_no_probe_where_the_rule_is_plain(monkeypatch, tmp_path):
    def no_probe(*args):
        raise AssertionError("probed")

    monkeypatch.setattr(amp_choice, "measure", no_probe)
    assert choose_amp("off", CPU, "conv4").amp == "off"
    assert choose_amp("bf16", CPU, "conv4").amp == "bf16"
    monkeypatch.setattr(amp_choice, "native_bf16", lambda device: False)
    no_native = choose_amp("auto", CPU, "conv4", cache=tmp_path / "x.json")
    assert no_native.amp == "off" and "no native bf16" in no_native.reason
    with pytest.raises(ConfigError, match="amp must be"):
        choose_amp("fp16", CPU, "conv4")


def test_a_run_config_resolves_to_a_concrete_precision(probe, tmp_path, monkeypatch):
    timings, calls = probe
    timings["value"] = (1.0, 3.0)
    monkeypatch.setattr(amp_choice, "_cache_file", lambda: tmp_path / "amp.json")
    cfg = load_config(overrides=["data.image_size=40"])
    choice = amp_choice.resolve_run_amp(cfg, CPU)
    assert choice.amp == "off" and calls == [(cfg.model.backbone, 40)]


@pytest.mark.parametrize("dataset,size", [("glyphs", 32), ("omniglot", 28),
                                          ("miniimagenet", 84), ("cifarfs", 32)])
def test_without_an_image_size_the_probe_runs_at_the_datasets_own(probe, tmp_path,
                                                                   monkeypatch, dataset, size):
    """data.image_size=0 means the loader's default size: the probe measures there (the
    demo's Conv-4 at 32 px, not the fallback 84 px), since bf16's gain depends on it."""
    timings, calls = probe
    timings["value"] = (1.0, 0.5)
    monkeypatch.setattr(amp_choice, "_cache_file", lambda: tmp_path / "amp.json")
    cfg = load_config(overrides=[f"data.name={dataset}", "data.image_size=0"])
    amp_choice.resolve_run_amp(cfg, CPU)
    assert calls == [(cfg.model.backbone, size)]


def test_meta_test_probes_the_checkpoints_network_not_the_configs(probe, tmp_path,
                                                                  monkeypatch):
    """``mtl meta-test`` of a foreign checkpoint chooses what ``FewShotClassifier`` chooses
    for that file: its backbone at its size, not the preset's."""
    from metatransfer.adapt import FewShotClassifier
    from metatransfer.checkpoints import ModelInfo, save_model
    from metatransfer.models import create_backbone

    timings, calls = probe
    timings["value"] = (1.0, 0.5)
    monkeypatch.setattr(amp_choice, "_cache_file", lambda: tmp_path / "amp.json")
    backbone = create_backbone("conv4", in_channels=1, width=8).eval()
    info = ModelInfo(backbone="conv4", backbone_args={"width": 8}, in_channels=1,
                     image_size=20, phase="pretrain", source="synthetic")
    path = tmp_path / "model.safetensors"
    save_model(path, info, backbone, {})
    cfg = load_config(overrides=["data.image_size=84", "model.backbone=resnet12"])
    choice = amp_choice.resolve_checkpoint_amp(cfg, CPU, path)
    assert choice.amp == "bf16" and calls == [("conv4", 20)]
    timings["value"] = (1.0, 3.0)  # were it probed again it would flip; the cache holds
    clf = FewShotClassifier.from_checkpoint(path, "protonet", "cpu")
    assert clf.embedder.amp and calls == [("conv4", 20)]


def test_a_real_probe_times_both_precisions():
    from metatransfer.models import create_backbone

    backbone = create_backbone("conv4", in_channels=1, width=8).train()
    images = torch.randn(4, 1, 28, 28)
    for bf16 in (False, True):
        seconds = step_seconds(backbone, images, bf16=bf16, iters=2)
        assert 0 < seconds < 5
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)
