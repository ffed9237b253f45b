"""Frozen BatchNorm folded into the SS conv before it: the same network, outputs and
gradients w.r.t. Φ, to float rounding; never folded where BN uses batch statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_toy_split
from torch import nn

from metatransfer.config import load_config
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.transforms import Normalizer
from metatransfer.embedding import Embedder
from metatransfer.models import create_backbone, enable_ss
from metatransfer.models.fold import conv_bn_pairs, folded_bn
from metatransfer.phases.meta_train import MetaLearner, meta_step

CPU = torch.device("cpu")
# (backbone, arguments, input side, conv+BN pairs: every conv of these is followed by a BN,
# except resnet12-tf's BN-less shortcuts)
NETWORKS = {
    "conv4": ({"width": 8}, 28, 4),
    "resnet12": ({"widths": [8, 16, 16, 32]}, 32, 16),
    "resnet12-tf": ({"widths": [8, 16]}, 16, 6),
    "resnet25": ({"widths": [8, 16, 16], "blocks": 2}, 32, 1 + 3 * 2 * 2 + 3),
    "timm:tf_efficientnet_lite0": ({}, 32, 49),
}


def randomised(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list]:
    """``name`` with SS on every conv, in eval mode, BN statistics and affine parameters and
    Φ away from their initial values (so every term of the fold is exercised)."""
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    kwargs, _, _ = NETWORKS[name]
    torch.manual_seed(0)
    model = create_backbone(name, in_channels=3, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    params = enable_ss(model, "kernel", "all", bn_affine=True)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p), alpha=0.1)
    return model.to(dtype).eval(), params


def forward_and_grads(model: nn.Module, params: list, x: torch.Tensor, fold: bool):
    with folded_bn(model, fold) as folded:
        out = model(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    return out.detach(), grads, folded


@pytest.mark.parametrize("name", NETWORKS)
def test_folded_network_is_the_unfolded_one(name: str) -> None:
    """In float64 the folded and unfolded networks agree to 1e-10 (outputs and the
    gradients w.r.t. Φ_S1, Φ_S2 and BN's γ, β): the fold formula is exact. In float32
    they differ by rounding only."""
    _, size, pairs = NETWORKS[name]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        model, params = randomised(name, dtype)
        x = torch.randn(3, 3, size, size, dtype=dtype)
        want, want_grads, none = forward_and_grads(model, params, x, fold=False)
        got, got_grads, folded = forward_and_grads(model, params, x, fold=True)
        assert (none, folded) == (0, pairs)
        scale = want.abs().max()
        torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)
        for p, g, w in zip(params, got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=tol * w.abs().max().clamp_min(1e-3),
                                       msg=f"{dtype} gradient of a {tuple(p.shape)} parameter")


def test_only_provably_consecutive_pairs_are_folded() -> None:
    """A conv whose output also goes elsewhere, or a norm with its own forward, is left as
    it is; a network fx cannot trace is left unfolded."""

    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            z = self.conv2(self.bn(y) + y)  # conv's output is used twice: not foldable
            return self.bn2(z)

    class DataDependent(Branching):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # fx cannot trace this

    model = Branching().eval()
    assert [(c, b) for c, b in conv_bn_pairs(model)] == [(model.conv2, model.bn2)]
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    with folded_bn(model) as folded:
        got = model(x)
    assert folded == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert conv_bn_pairs(DataDependent().eval()) == []


def test_never_folded_with_batch_statistics() -> None:
    """In training mode (meta.bn_mode=train) or without running statistics (a
    batch-statistics checkpoint) BN is not an affine map: nothing is folded."""
    model, _ = randomised("conv4")
    model.train()
    with folded_bn(model) as folded:
        assert folded == 0
    tf = create_backbone("resnet12-tf", widths=[4, 8], bn_stats="batch").eval()
    x = torch.randn(4, 3, 16, 16)
    want = tf(x)
    with folded_bn(tf):
        got = tf(x)
    assert torch.equal(got, want)  # BN normalised by the batch: as without folding
    # a fold left active while BN switches to training mode does nothing either
    model.eval()
    with folded_bn(model):
        model.train()
        out = model(torch.randn(4, 3, 28, 28))
    assert out.shape == (4, 8)
    assert all(not getattr(m, "bn_folded", False) and getattr(m, "bn_fold", None) is None
               for m in model.modules())


def test_state_dict_and_checkpoints_do_not_change() -> None:
    model, _ = randomised("conv4")
    keys = list(model.state_dict())
    with folded_bn(model):
        assert list(model.state_dict()) == keys
    assert list(model.state_dict()) == keys
    assert all(isinstance(m, nn.BatchNorm2d) for m in model.modules()
               if "BatchNorm" in type(m).__name__)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_meta_step_folds_only_in_eval_mode(bn_mode: str, monkeypatch) -> None:
    """The meta-gradient with fold_bn is the unfolded one; folding happens exactly when
    meta.bn_mode=eval."""
    import metatransfer.phases.meta_train as mt

    seen: list[int] = []
    real = mt.folded_bn

    def spy(backbone, enabled=True):
        ctx = real(backbone, enabled)

        class Wrapped:
            def __enter__(self):
                seen.append(ctx.__enter__())

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(mt, "folded_bn", spy)
    split = make_toy_split("train")
    grads = []
    for fold in ("false", "true"):
        torch.manual_seed(0)
        cfg = load_config(overrides=["meta.inner_steps=3", "meta.queries=3", "meta.ht=reuse",
                                     f"meta.bn_mode={bn_mode}", f"fold_bn={fold}", "amp=off"])
        learner = MetaLearner(create_backbone("conv4", in_channels=1, width=8), 5, "kernel",
                              "all", False, head_init="learned")
        learner.train(bn_mode == "train")
        sampler = EpisodeSampler(split.indices_by_class, 5, 1, 3, seed=0)
        loss, _ = meta_step(learner, split, sampler, 0, cfg,
                            Normalizer(split.mean, split.std, CPU), CPU)
        loss.backward()
        grads.append([p.grad.clone() for p in learner.ss_params] + [learner.weight0.grad])
    assert set(seen) == ({0, 4} if bn_mode == "eval" else {0})
    for plain, folded in zip(*grads, strict=True):
        torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-6)


def test_embedder_folds_and_embeds_the_same() -> None:
    split = make_toy_split("test")
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=1, width=8)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    norm = Normalizer(split.mean, split.std, CPU)
    indices = np.arange(40)
    seen: list[bool] = []
    backbone.blocks[0][1].register_forward_hook(
        lambda m, i, o: seen.append(getattr(m, "bn_folded", False)))
    plain = Embedder(backbone, norm, CPU, fold_bn=False).embed(split, indices)
    folded = Embedder(backbone, norm, CPU).embed(split, indices)
    assert seen == [False, True]
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
