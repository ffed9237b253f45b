"""bf16 autocast: on by default only where the device has bf16 natively, really engaged on
CPU, close to fp32, deterministic, and fp32 wherever precision matters (features, losses,
meta-gradients, BN statistics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_toy_split

from metatransfer.config import load_config
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.transforms import Normalizer
from metatransfer.devices import (
    autocast_enabled,
    native_bf16,
    precision,
    subnormals_flushed,
)
from metatransfer.embedding import Embedder
from metatransfer.errors import ConfigError
from metatransfer.models import create_backbone
from metatransfer.phases.common import autocast
from metatransfer.phases.meta_train import MetaLearner, task_losses

CPU = torch.device("cpu")


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, False),
                                                      (True, False, True),
                                                      (False, True, True)])
def test_auto_turns_bf16_on_only_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bf16(CPU) is expected
    assert autocast_enabled("auto", CPU) is expected
    assert autocast_enabled("bf16", CPU) and not autocast_enabled("off", CPU)
    assert precision(autocast_enabled("auto", CPU)) == ("bf16" if expected else "fp32")


def test_amp_setting_is_checked():
    assert not native_bf16(torch.device("meta"))
    with pytest.raises(ConfigError, match="amp must be"):
        autocast_enabled("fp16", CPU)
    with pytest.raises(ConfigError):
        load_config(overrides=["amp=fp16"])


def embedder(amp: bool) -> tuple[Embedder, object]:
    torch.manual_seed(0)
    split = make_toy_split("test")
    backbone = create_backbone("conv4", in_channels=1, width=8).eval()
    return Embedder(backbone, Normalizer(split.mean, split.std, CPU), CPU, amp=amp), split


def test_bf16_embeddings_are_fp32_close_to_fp32_and_deterministic():
    indices = np.arange(60)
    fp32_embedder, split = embedder(False)
    bf16_embedder, _ = embedder(True)
    want = fp32_embedder.embed(split, indices)
    got = bf16_embedder.embed(split, indices)
    again = bf16_embedder.embed(split, indices, batch_size=7)
    assert got.dtype == torch.float32
    assert not torch.equal(got, want), "autocast did not engage on CPU"
    relative = (got - want).norm() / want.norm()
    assert 1e-5 < relative < 2e-2
    assert torch.equal(got, bf16_embedder.embed(split, indices))  # run to run
    torch.testing.assert_close(again, got, rtol=1e-2, atol=1e-3)  # other batch sizes


@pytest.mark.parametrize("first_order", [True, False])
def test_meta_gradients_in_bf16_follow_fp32(first_order):
    """The inner loop runs on fp32 features, so the loss and the gradients reaching Φ_S and
    θ_0 are fp32 and point where the fp32 ones do; the second-order path is differentiable
    through the bf16 backbone too."""
    split = make_toy_split("train")
    sampler = EpisodeSampler(split.indices_by_class, 5, 1, 3, seed=0)
    batch = sampler.batch(0, 2)
    grads, losses = {}, {}
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        cfg = load_config(overrides=["meta.inner_steps=3", "meta.queries=3", f"amp={amp}",
                                     f"meta.first_order={str(first_order).lower()}"])
        learner = MetaLearner(create_backbone("conv4", in_channels=1, width=8), 5, "kernel",
                              "all", False, head_init="learned")
        loss, _ = task_losses(learner, split, batch, cfg,
                              Normalizer(split.mean, split.std, CPU), CPU)
        assert loss.dtype == torch.float32
        loss.sum().backward()
        params = [*learner.ss_params, learner.weight0, learner.bias0]
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        grads[amp] = torch.cat([p.grad.flatten() for p in params])
        losses[amp] = loss.detach()
    torch.testing.assert_close(losses["bf16"], losses["off"], rtol=2e-2, atol=1e-3)
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["off"], dim=0)
    assert cosine > 0.98, float(cosine)
    assert not torch.equal(grads["bf16"], grads["off"])


def test_bn_statistics_stay_fp32_under_autocast():
    torch.manual_seed(0)
    nets = {amp: create_backbone("conv4", in_channels=1, width=8).train() for amp in (0, 1)}
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(32, 1, 16, 16)
    for amp, net in nets.items():
        with autocast(bool(amp), CPU):
            out = net(x)
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)
    for (name, a), b in zip(nets[0].named_buffers(), nets[1].buffers(), strict=True):
        if not name.endswith("running_mean"):
            continue
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


def test_pretraining_head_computes_fp32_logits_inside_autocast():
    from metatransfer.phases.common import Float32

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 7)
    feats = torch.randn(5, 16).to(torch.bfloat16)  # what a bf16 backbone returns
    with autocast(True, CPU):
        logits = Float32(head)(feats)
        plain = head(feats)
    assert logits.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(logits, head(feats.float()), rtol=0, atol=0)


@pytest.mark.slow
def test_runs_flush_subnormals_to_zero_and_restore_ieee_after(tmp_path, monkeypatch):
    """Subnormal arithmetic takes a microcode path on x86 (a 13x slower resnet25
    meta-training step measured); commands flush it, and put the global setting back."""
    from conftest import tiny_overrides

    import metatransfer.cli as cli

    def product() -> float:
        return float(torch.tensor([1e-30]) * 1e-9)  # 1e-39: subnormal in fp32

    assert product() > 0.0
    with subnormals_flushed() as supported:
        if not supported:
            pytest.skip("this CPU cannot flush subnormals")
        assert product() == 0.0
    assert product() > 0.0
    seen = []
    real_start = cli.start

    def spy(cfg):
        result = real_start(cfg)
        seen.append(product())
        return result

    monkeypatch.setattr(cli, "start", spy)
    args = ["run", "--quiet"]
    for item in [*tiny_overrides(tmp_path / "run"), "pretrain.epochs=1", "meta.epochs=1",
                 "eval.episodes=4", "eval.shots=[1]"]:
        args += ["--set", item]
    cli.main(args)
    assert seen == [0.0]  # flushed while the command ran
    assert product() > 0.0  # and IEEE again after it
