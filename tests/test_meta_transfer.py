"""Meta-transfer is not a no-op: selection episodes apart from reported ones, class
holdout, SS that moves by the expected amount and reaches meta-test, θ_0 that is used."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_toy_split

from metatransfer.config import load_config
from metatransfer.data.base import ImageSplit, class_share, held_out_mask
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.transforms import Normalizer
from metatransfer.embedding import Embedder
from metatransfer.evaluation import evaluate
from metatransfer.methods.ft import FineTune
from metatransfer.methods.mtl import MTL
from metatransfer.methods.protonet import ProtoNet
from metatransfer.models import create_backbone
from metatransfer.models.ss import ss_convs
from metatransfer.phases.meta_train import MetaLearner, meta_step

CPU = torch.device("cpu")


def episode_keys(sampler: EpisodeSampler, count: int) -> set:
    return {tuple(np.concatenate([e.classes[0], e.support[0], e.query[0]]).tolist())
            for e in (sampler.episode(i) for i in range(count))}


def test_selection_stream_is_disjoint_from_the_reported_episodes():
    by_class = [np.arange(c * 20, c * 20 + 20) for c in range(40)]
    for val_seed in (1234, 4321):  # even with the evaluation seed itself
        test = EpisodeSampler(by_class, 5, 1, 15, seed=1234)
        selection = EpisodeSampler(by_class, 5, 1, 15, seed=val_seed, stream="selection")
        reported, selected = episode_keys(test, 600), episode_keys(selection, 600)
        assert len(reported) == len(selected) == 600
        assert not reported & selected
    with pytest.raises(ValueError, match="stream"):
        EpisodeSampler(by_class, 5, 1, 15, seed=0, stream="other")


def test_validation_draws_from_the_selection_stream():
    from metatransfer.phases.common import validation_accuracy

    split = make_toy_split("val")
    embedder = Embedder(create_backbone("conv4", in_channels=1, width=8).eval(),
                        Normalizer(split.mean, split.std, CPU), CPU)
    got = validation_accuracy(ProtoNet(), embedder, split, 5, 1, 3, 40, seed=7)
    def scored(stream):
        sampler = EpisodeSampler(split.indices_by_class, 5, 1, 3, 7, stream=stream)
        return evaluate(ProtoNet(), embedder, split, sampler, 40).mean() * 100
    assert got[0] == pytest.approx(scored("selection"))
    assert got[0] != pytest.approx(scored("test"))


def rotated_split() -> ImageSplit:
    names = [f"alpha/char{c}{rot}" for c in range(10) for rot in ("/rot000", "/rot090")]
    labels = np.repeat(np.arange(20), 3)
    images = labels.astype(np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2)
    return ImageSplit(images, labels, names, "omni/train")


def test_class_holdout_partitions_the_train_classes_by_character():
    split = rotated_split()
    mask = held_out_mask(split.class_names, 0.3)
    assert mask.sum() == 6  # 3 of 10 characters, with both rotations each
    assert np.array_equal(mask, held_out_mask(split.class_names, 0.3))  # fixed choice
    pre, meta = class_share(split, 0.3, "pretrain"), class_share(split, 0.3, "meta")
    assert set(pre.class_names) | set(meta.class_names) == set(split.class_names)
    assert not set(pre.class_names) & set(meta.class_names)
    chars = {n.rsplit("/", 1)[0] for n in meta.class_names}
    assert not chars & {n.rsplit("/", 1)[0] for n in pre.class_names}
    for part in (pre, meta):  # labels renumbered, each image still shows its own class
        assert part.labels.max() == part.num_classes - 1
        original = [split.class_names.index(part.class_names[y]) for y in part.labels]
        assert np.array_equal(part.images[:, 0, 0, 0], original)
    assert class_share(split, 0.0, "meta") is split


def without_ss(backbone: torch.nn.Module) -> torch.nn.Module:
    plain = copy.deepcopy(backbone)
    for conv in ss_convs(plain):
        conv.ss_scale, conv.ss_shift = None, None
    return plain


def ss_state(learner: MetaLearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.backbone.named_parameters()
            if k.endswith(("ss_scale", "ss_shift"))}


@pytest.mark.slow
def test_short_meta_training_moves_ss_by_the_adam_budget_and_changes_predictions():
    """Adam moves a parameter by about lr per step when its gradient keeps its sign: 20
    steps at 1e-2 must move Φ_S by 0.05-0.2 (a no-op would stay near 0), and meta-test
    must see the moved SS (its embeddings and predictions differ from the plain net's)."""
    torch.manual_seed(0)
    train, test = make_toy_split("train"), make_toy_split("test")
    cfg = load_config(overrides=["meta.inner_steps=5", "meta.inner_lr=0.5", "meta.queries=3",
                                 "meta.ht=off"])
    learner = MetaLearner(create_backbone("conv4", in_channels=1, width=8), 5, "kernel", "all",
                          False).eval()
    optimizer = torch.optim.Adam(learner.ss_params, lr=1e-2)
    sampler = EpisodeSampler(train.indices_by_class, 5, 1, 3, seed=0)
    norm = Normalizer(train.mean, train.std, CPU)
    before = ss_state(learner)
    for step in range(20):
        loss, _ = meta_step(learner, train, sampler, step, cfg, norm, CPU)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = max((v - before[k]).abs().max().item() for k, v in ss_state(learner).items())
    assert 0.05 < moved <= 0.2 + 1e-6
    assert learner.weight0.abs().sum() == 0  # θ_0 'zero' stays zero

    test_sampler = EpisodeSampler(test.indices_by_class, 5, 1, 5, seed=1)
    ss_net = Embedder(learner.backbone, Normalizer(test.mean, test.std, CPU), CPU)
    plain_net = Embedder(without_ss(learner.backbone), Normalizer(test.mean, test.std, CPU), CPU)
    ids = np.arange(30)
    feats_ss = ss_net.embed(test, ids)
    feats_plain = plain_net.embed(test, ids)
    assert (feats_ss - feats_plain).norm() > 0.01 * feats_plain.norm()
    head = (learner.weight0.detach(), learner.bias0.detach())
    acc_ss = evaluate(MTL(head, 5, 0.5), ss_net, test, test_sampler, 40)
    acc_plain = evaluate(MTL(head, 5, 0.5), plain_net, test, test_sampler, 40)
    assert not np.array_equal(acc_ss, acc_plain)


def test_mtl_uses_theta0_and_ft_does_not():
    torch.manual_seed(0)
    support, query = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    labels = torch.arange(5).expand(3, -1)
    zero = (torch.zeros(5, 8), torch.zeros(5))
    learned = (torch.randn(5, 8), torch.randn(5))
    ft = FineTune(3, 0.1).fit(support, labels, 5).logits(query)
    torch.testing.assert_close(MTL(zero, 3, 0.1).fit(support, labels, 5).logits(query), ft)
    assert not torch.allclose(MTL(learned, 3, 0.1).fit(support, labels, 5).logits(query), ft)


def test_ss_decay_pulls_toward_the_identity():
    learner = MetaLearner(create_backbone("conv4", in_channels=1, width=8), 5, "kernel", "all",
                          False)
    assert learner.ss_penalty().item() == 0.0  # SS starts at the identity
    scale, shift = learner.ss_params[0], learner.ss_params[1]
    with torch.no_grad():
        scale.fill_(1.5)
        shift.fill_(-2.0)
    expected = 0.25 * scale.numel() + 4.0 * shift.numel()
    assert learner.ss_penalty().item() == pytest.approx(expected)
    learner.ss_penalty().backward()
    assert (scale.grad > 0).all() and (shift.grad < 0).all()  # descent moves back to 1 and 0


@pytest.mark.slow
def test_meta_training_keeps_the_pretrained_network_unless_ss_helps(tmp_path):
    """Epoch 0 (SS = identity, θ_0 = 0: the `ft` network) is validated and kept as the best
    model until an epoch beats it on the selection stream: with SS that can only hurt
    (a huge SS learning rate), the kept checkpoint is the pre-trained network."""
    from conftest import tiny_overrides

    from metatransfer.checkpoints import load_model
    from metatransfer.phases.meta_train import meta_train
    from metatransfer.phases.pretrain import pretrain
    from metatransfer.runs import RunDir

    # fp32: the premise (lr 5 lowers val accuracy) was checked for this toy network in fp32
    cfg = load_config(overrides=tiny_overrides(tmp_path / "run") + [
        "meta.lr_ss=5.0", "meta.epochs=1", "meta.episodes_per_epoch=2", "amp=off"])
    run = RunDir(cfg.out)
    best = meta_train(cfg, run, CPU, pretrain(cfg, run, CPU, show=False), show=False)
    records = [r for r in run.metrics() if r["phase"] == "meta"]
    assert [r["step"] for r in records] == [0, 1] and "loss" not in records[0]
    assert records[1]["val_acc"] < records[0]["val_acc"]  # SS at lr 5 ruins the features
    _, state, _ = load_model(best)
    for key, value in state.items():  # the kept model is the starting one
        if key.endswith("ss_scale"):
            assert torch.equal(value, torch.ones_like(value)), key
        elif key.endswith("ss_shift"):
            assert torch.equal(value, torch.zeros_like(value)), key
    # meta.select_start=false: the best trained epoch is kept, however bad
    cfg = load_config(overrides=tiny_overrides(tmp_path / "forced") + [
        "meta.lr_ss=5.0", "meta.epochs=1", "meta.episodes_per_epoch=2",
        "meta.select_start=false", "amp=off"])
    run = RunDir(cfg.out)
    best = meta_train(cfg, run, CPU, pretrain(cfg, run, CPU, show=False), show=False)
    assert [r["step"] for r in run.metrics() if r["phase"] == "meta"] == [1]
    _, state, _ = load_model(best)
    assert any(not torch.equal(v, torch.ones_like(v)) for k, v in state.items()
               if k.endswith("ss_scale"))


def test_a_holdout_too_small_for_the_episodes_fails_before_anything_is_written(tmp_path,
                                                                                 capsys):
    """12 toy train classes, 30% held out = 4 < 5 ways: `mtl run` stops in preflight."""
    from conftest import tiny_overrides

    from metatransfer.cli import main

    out = tmp_path / "run"
    args = ["run", "--quiet"]
    for item in tiny_overrides(out) + ["data.meta_holdout=0.3"]:
        args += ["--set", item]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code != 0
    assert "meta-training episodes need 5 classes" in capsys.readouterr().err
    assert not out.exists()
