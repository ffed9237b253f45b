"""A meta-train step changes only Φ_S and θ_0; SS at initialisation is the plain network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_toy_split

from metatransfer.config import load_config
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.transforms import Normalizer
from metatransfer.models import create_backbone
from metatransfer.phases.meta_train import MetaLearner, meta_step


@pytest.mark.parametrize("ht,bn_affine", [("off", False), ("resample", False),
                                          ("reuse", True)])
def test_meta_step_updates_only_ss_and_theta0(ht, bn_affine):
    torch.manual_seed(0)
    split = make_toy_split("train")
    cfg = load_config(overrides=["meta.inner_steps=3", "meta.queries=3", f"meta.ht={ht}",
                                 f"model.ss_bn_affine={str(bn_affine).lower()}"])
    backbone = create_backbone("conv4", in_channels=1, width=8)
    x = torch.randn(4, 1, 16, 16)
    backbone.eval()
    plain_out = backbone(x)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    learner = MetaLearner(backbone, 5, "kernel", "all", bn_affine, head_init="learned")
    torch.testing.assert_close(backbone(x), plain_out, rtol=0, atol=0)  # SS = identity at init
    optimizer = torch.optim.Adam([{"params": learner.ss_params, "lr": 1e-2},
                                  {"params": [learner.weight0, learner.bias0], "lr": 1e-2}])
    sampler = EpisodeSampler(split.indices_by_class, 5, 1, 3, seed=0)
    loss, stats = meta_step(learner, split, sampler, 0, cfg, Normalizer(split.mean, split.std,
                                                                        torch.device("cpu")),
                            torch.device("cpu"))
    assert torch.isfinite(loss) and ("hard_acc" in stats) == (ht != "off")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = backbone.state_dict()
    for key, value in frozen.items():
        if bn_affine and key.endswith((".weight", ".bias")) and after[key].dim() == 1:
            continue  # BN affine is meta-learned when enabled
        assert torch.equal(after[key], value), f"frozen tensor {key} changed"
    ss = [k for k in after if k.endswith(("ss_scale", "ss_shift"))]
    assert len(ss) == 8 and any(not torch.equal(after[k], torch.ones_like(after[k]))
                                for k in ss if k.endswith("ss_scale"))
    assert learner.weight0.abs().sum() > 0
    if bn_affine:
        bn = [k for k in after if k.endswith(".1.weight")]
        assert any(not torch.equal(after[k], frozen[k]) for k in bn)


def test_meta_batch_goes_through_one_backbone_pass():
    split = make_toy_split("train")
    cfg = load_config(overrides=["meta.inner_steps=2", "meta.queries=3", "meta.ht=off",
                                 "meta.meta_batch=4", "meta.forward_chunk=0"])
    backbone = create_backbone("conv4", in_channels=1, width=8)
    learner = MetaLearner(backbone, 5, "kernel", "all", False)
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    sampler = EpisodeSampler(split.indices_by_class, 5, 1, 3, seed=0)
    meta_step(learner, split, sampler, 0, cfg, Normalizer(split.mean, split.std,
                                                          torch.device("cpu")),
              torch.device("cpu"))
    assert calls == [4 * 5 * (1 + 3)]
    assert np.isfinite(calls[0])


def test_chunked_forward_gives_the_same_meta_gradient():
    split = make_toy_split("train")
    grads = []
    for chunk in (0, 7):
        torch.manual_seed(0)
        cfg = load_config(overrides=["meta.inner_steps=3", "meta.queries=3", "meta.ht=resample",
                                     f"meta.forward_chunk={chunk}"])
        learner = MetaLearner(create_backbone("conv4", in_channels=1, width=8), 5, "kernel",
                              "all", False, head_init="learned")
        learner.train(False)  # BN in eval mode, as meta-training runs it by default
        sampler = EpisodeSampler(split.indices_by_class, 5, 1, 3, seed=0)
        calls: list[int] = []
        learner.backbone.register_forward_hook(
            lambda m, i, o, calls=calls: calls.append(i[0].shape[0]))
        loss, _ = meta_step(learner, split, sampler, 0, cfg,
                            Normalizer(split.mean, split.std, torch.device("cpu")),
                            torch.device("cpu"))
        loss.backward()
        assert max(calls) <= (chunk or 10**6)
        grads.append([p.grad.clone() for p in learner.ss_params] + [learner.weight0.grad])
    for plain, chunked in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["bn_mode=train", "batch-statistics checkpoint"])
def test_batch_statistics_embed_support_and_queries_in_calls_of_their_own(source):
    """With BN normalising by batch statistics an embedding depends on its batch, so each
    task's support set and query set are embedded apart, as meta-test embeds them; the
    support features are then exactly those of one call on the support images alone."""
    from metatransfer.data.transforms import gather_uint8
    from metatransfer.phases.meta_train import task_losses

    torch.manual_seed(0)
    split = make_toy_split("train")
    extra = ["meta.bn_mode=train"] if source == "bn_mode=train" else []
    cfg = load_config(overrides=["meta.inner_steps=2", "meta.queries=3", "meta.ht=off",
                                 "meta.meta_batch=2", "amp=off", *extra])
    if extra:
        backbone = create_backbone("conv4", in_channels=1, width=8)
    else:
        backbone = create_backbone("resnet12-tf", in_channels=1, widths=[4, 8],
                                   bn_stats="batch")
    learner = MetaLearner(backbone, 5, "kernel", "all", False)
    learner.train(bool(extra))
    calls: list[int] = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    sampler = EpisodeSampler(split.indices_by_class, 5, 1, 3, seed=0)
    batch = sampler.batch(0, 2)
    norm = Normalizer(split.mean, split.std, torch.device("cpu"))
    losses, _ = task_losses(learner, split, batch, cfg, norm, torch.device("cpu"))
    assert calls == [5, 5, 15, 15]  # support, support, queries, queries
    assert torch.isfinite(losses).all() and losses.shape == (2,)
    if not extra:  # eval mode: the same support features as one call on them alone
        with torch.no_grad():
            alone = backbone(norm(gather_uint8(split, batch.support[1], torch.device("cpu"))))
            mixed = backbone(norm(gather_uint8(split, np.concatenate(
                [batch.support[1], batch.query[1]]), torch.device("cpu"))))[:5]
        assert not torch.allclose(alone, mixed, atol=1e-4)  # why the calls must be apart


def test_reused_hard_tasks_take_their_features_from_the_meta_batch_pass(monkeypatch):
    """``ht=reuse`` with BN in eval mode: the hard tasks' features are gathered from the
    meta-batch's one backbone pass, and the loss and every meta-gradient equal those of
    embedding the hard tasks again."""
    from metatransfer.phases import meta_train

    split = make_toy_split("train")
    cfg = load_config(overrides=["meta.inner_steps=3", "meta.queries=3", "meta.ht=reuse",
                                 "meta.meta_batch=3", "meta.ht_tasks=2",
                                 "meta.forward_chunk=0", "amp=off"])
    results = []
    for reuse in (False, True):
        monkeypatch.setattr(meta_train, "reuses_features", lambda *_, reuse=reuse: reuse)
        torch.manual_seed(0)
        learner = MetaLearner(create_backbone("conv4", in_channels=1, width=8), 5, "kernel",
                              "all", False, head_init="learned")
        learner.train(False)
        calls: list[int] = []
        learner.backbone.register_forward_hook(
            lambda m, i, o, calls=calls: calls.append(i[0].shape[0]))
        sampler = EpisodeSampler(split.indices_by_class, 5, 1, 3, seed=0)
        loss, stats = meta_step(learner, split, sampler, 0, cfg,
                                Normalizer(split.mean, split.std, torch.device("cpu")),
                                torch.device("cpu"))
        loss.backward()
        assert calls == ([3 * 20] if reuse else [3 * 20, 2 * 20])
        results.append((loss.detach(), stats["hard_acc"],
                        [p.grad.clone() for p in learner.ss_params]
                        + [learner.weight0.grad, learner.bias0.grad]))
    (loss_a, hard_a, grads_a), (loss_b, hard_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    assert float(hard_a) == float(hard_b)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for again, reused in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(reused, again, rtol=1e-5, atol=1e-7)


def test_resampled_and_batch_statistics_hard_tasks_are_embedded_again():
    from metatransfer.phases.meta_train import reuses_features

    learner = MetaLearner(create_backbone("conv4", in_channels=1, width=8), 5, "kernel",
                          "all", False)
    assert reuses_features(learner, load_config(overrides=["meta.ht=reuse"]))
    assert not reuses_features(learner, load_config(overrides=["meta.ht=resample"]))
    assert not reuses_features(learner, load_config(overrides=["meta.ht=reuse",
                                                               "meta.bn_mode=train"]))
