"""Few-shot methods: each one small class on one base, one registry every tool reads.

The by-hand numbers of the built-ins; the light name lists (used by the config and the
CLI without torch) against the classes; and a toy method registered in a few lines that
meta-test, its paired comparisons and the classifier API all pick up.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from metatransfer import FewShotClassifier
from metatransfer.cli import build_parser, main
from metatransfer.config import RunConfig
from metatransfer.errors import MTLError
from metatransfer.learners import linear_logits
from metatransfer.loader import available_methods, find_checkpoints
from metatransfer.methods import (
    FewShotMethod,
    comparison_pairs,
    method_names,
    register_method,
    registry,
)
from metatransfer.methods.catalog import method_class
from metatransfer.methods.ft import FineTune
from metatransfer.methods.mtl import MTL, head_for_ways
from metatransfer.methods.protonet import ProtoNet


def test_protonet_by_hand():
    support = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]])
    labels = torch.tensor([[0, 0, 1]])
    query = torch.tensor([[[1.0, 1.0]]])
    # centroids (1, 0) and (0, 4): squared distances 1 and 10
    torch.testing.assert_close(ProtoNet().fit(support, labels, 2).logits(query),
                               torch.tensor([[[-1.0, -10.0]]]))


def test_ft_starts_from_zero_and_mtl_from_theta0():
    support = torch.randn(1, 4, 3)
    labels = torch.tensor([[0, 0, 1, 1]])
    query = torch.randn(1, 2, 3)
    zero_steps = FineTune(steps=0, lr=0.1).fit(support, labels, 2).logits(query)
    assert torch.equal(zero_steps, torch.zeros(1, 2, 2))
    head = (torch.ones(2, 3), torch.tensor([1.0, -1.0]))
    logits = MTL(head, steps=0, lr=0.1).fit(support, labels, 2).logits(query)
    torch.testing.assert_close(logits, linear_logits(head[0][None], head[1][None], query))


def test_head_for_other_ways_uses_the_mean_row():
    w, b = head_for_ways(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, 3.0]), 3)
    assert torch.equal(w, torch.tensor([[2.0, 3.0]] * 3)) and torch.equal(b, torch.full((3,), 2.0))


def test_each_method_carries_its_own_settings():
    cfg = RunConfig().eval
    cfg.inner_steps, cfg.inner_lr, cfg.ft_all_steps, cfg.ft_all_lr = 7, 0.3, 4, 0.02
    head = (torch.zeros(5, 3), torch.zeros(5))
    mtl = method_class("mtl").from_config(cfg, head)
    ft = method_class("ft").from_config(cfg)
    ft_all = method_class("ft-all").from_config(cfg)
    assert (mtl.steps, mtl.lr, mtl.head) == (7, 0.3, head)
    assert (ft.steps, ft.lr) == (7, 0.3)
    assert (ft_all.steps, ft_all.lr, ft_all.max_episodes) == (4, 0.02, cfg.ft_all_episodes)


def test_light_name_lists_match_the_registered_classes():
    """The names the config and CLI use without importing torch are the classes'."""
    assert [n for n in method_names() if n in registry.BUILTIN_METHODS] == list(
        registry.BUILTIN_METHODS)
    classes = {n: method_class(n) for n in registry.BUILTIN_METHODS}
    assert all(cls.name == n for n, cls in classes.items())
    embed_once = [n for n, cls in classes.items() if cls.embeds_once]
    assert list(registry.EMBED_ONCE_METHODS) == embed_once == ["mtl", "ft", "protonet"]
    assert RunConfig().eval.methods == embed_once  # what meta-test runs by default
    assert [n for n, cls in classes.items() if cls.needs_head] == ["mtl"]
    adapt = next(a for a in build_parser()._subparsers._group_actions[0].choices["adapt"]
                 ._actions if "--method" in a.option_strings)
    assert list(adapt.choices) == embed_once


def test_pairs_follow_the_registry_order():
    assert comparison_pairs(["protonet", "mtl", "ft"]) == [
        ("mtl", "ft"), ("mtl", "protonet"), ("ft", "protonet")]
    assert comparison_pairs(["ft-all", "mtl"]) == [("mtl", "ft-all")]
    assert comparison_pairs(["ft"]) == []


# ----------------------------------------------------------------------- a toy method


class NearestNeighbour(FewShotMethod):
    """1-nearest neighbour: a class scores minus the distance to its closest support image."""

    def fit(self, support, labels, ways):
        self.support, self.onehot = support, F.one_hot(labels, ways).bool()  # (T, S, N)
        return self

    def logits(self, query):
        dist = torch.cdist(query, self.support)  # (T, Q, S)
        masked = torch.where(self.onehot[:, None], -dist[..., None], -torch.inf)
        return masked.amax(2)  # (T, Q, N)


@pytest.fixture
def toy_method(monkeypatch):
    """``nn`` registered for this test only (the registry is process-wide)."""
    monkeypatch.setattr(registry, "_CLASSES", dict(registry._CLASSES))
    register_method("nn")(NearestNeighbour)
    return "nn"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods") / "run"
    args = ["run", "--quiet"]
    for item in [*tiny_overrides(out), "amp=off", "eval.shots=[1,3]"]:
        args += ["--set", item]
    main(args)
    return out


@pytest.mark.slow
def test_a_registered_method_is_reported_and_paired(run_dir, toy_method, tmp_path):
    out = tmp_path / "eval"
    main(["meta-test", "--quiet", "--checkpoint", str(run_dir), "--out", str(out),
          "--method", "mtl,ft,protonet,nn"])
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["results"]} == {"mtl", "ft", "protonet", "nn"}
    pairs = list(dict.fromkeys((c["a"], c["b"]) for c in results["comparisons"]))
    assert pairs == [("mtl", "ft"), ("mtl", "protonet"), ("mtl", "nn"), ("ft", "protonet"),
                     ("ft", "nn"), ("protonet", "nn")]
    assert "| protonet − nn |" in (out / "results.md").read_text()
    episodes = json.loads((out / "episodes.json").read_text())
    # one image per class: its nearest neighbour is its centroid, episode by episode
    np.testing.assert_array_equal(episodes["nn/5w1s"], episodes["protonet/5w1s"])
    assert not np.array_equal(episodes["nn/5w3s"], episodes["protonet/5w3s"])
    before = json.loads((run_dir / "results.json").read_text())  # the run's own, without nn
    assert [r for r in results["results"] if r["method"] != "nn"] == before["results"]


@pytest.mark.slow
def test_a_registered_method_serves_the_classifier(run_dir, toy_method):
    assert available_methods(find_checkpoints(run_dir)) == ["mtl", "protonet", "ft", "nn"]
    clf = FewShotClassifier.from_checkpoint(run_dir, "nn", "cpu", amp="off")
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 1), dtype=np.uint8)
    clf.fit({"a": [images[0]], "b": [images[1]]})
    assert clf.predict([images[0], images[1]]) == ["a", "b"]  # each its own nearest


@pytest.mark.slow
def test_ft_all_is_not_a_classifier(run_dir):
    with pytest.raises(MTLError, match="embeds once") as err:
        FewShotClassifier.from_checkpoint(run_dir, "ft-all", "cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("norm", ["none", "l2"])
def test_ft_all_starts_from_ft_and_then_moves_the_backbone(norm):
    """Zero fine-tuning steps are exactly ft (its head on the frozen support features, the
    same feature normalisation); with steps the backbone copy changes, the original not."""
    import numpy as np
    from conftest import make_toy_split

    from metatransfer.data.episodes import EpisodeSampler
    from metatransfer.data.transforms import Normalizer
    from metatransfer.embedding import Embedder
    from metatransfer.evaluation import evaluate
    from metatransfer.methods.ft import FineTune
    from metatransfer.methods.ft_all import FineTuneAll
    from metatransfer.models import create_backbone

    torch.manual_seed(0)
    split = make_toy_split("test")
    backbone = create_backbone("conv4", in_channels=1, width=8).eval()
    cpu = torch.device("cpu")
    embedder = Embedder(backbone, Normalizer(split.mean, split.std, cpu), cpu,
                        feature_norm=norm)
    sampler = EpisodeSampler(split.indices_by_class, 5, 1, 4, seed=3)
    episodes = np.arange(6)
    ft = evaluate(FineTune(30, 0.5), embedder, split, sampler, episodes)
    start = evaluate(FineTuneAll(0, 0.01, head_steps=30, head_lr=0.5), embedder, split,
                     sampler, episodes)
    np.testing.assert_allclose(start, ft, atol=1e-6)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    moved = evaluate(FineTuneAll(3, 0.05, head_steps=30, head_lr=0.5), embedder, split,
                     sampler, episodes)
    assert moved.shape == ft.shape and ((0 <= moved) & (moved <= 1)).all()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
