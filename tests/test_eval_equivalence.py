"""Embed-once, batched-episode evaluation equals the one-episode-at-a-time reference.

``evaluation.evaluate`` embeds every image once and adapts many episodes' heads in one
batched inner loop; ``evaluation.per_episode_accuracy`` embeds each episode's images and
adapts it alone. They must agree episode by episode (to float tolerance: accuracies are
counts of argmax hits, so they must be equal).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_method, make_toy_split

from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.transforms import Normalizer
from metatransfer.embedding import Embedder
from metatransfer.evaluation import evaluate, per_episode_accuracy
from metatransfer.learners import adapt, cross_entropy_grads, linear_logits
from metatransfer.methods.mtl import MTL
from metatransfer.methods.protonet import ProtoNet
from metatransfer.models import create_backbone
from metatransfer.models.ss import enable_ss

EPISODES = 9
STEPS = 15
LR = 0.5


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    split = make_toy_split("val")
    backbone = create_backbone("conv4", in_channels=1, width=8)
    # Non-trivial BN statistics and SS parameters, so eval-mode BN and SS both matter.
    with torch.no_grad():
        backbone.train()
        backbone(torch.randn(32, 1, 16, 16))
    for p in enable_ss(backbone, "kernel", "all"):
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    head = (0.1 * torch.randn(5, backbone.out_dim), 0.1 * torch.randn(5))
    embedder = Embedder(backbone, Normalizer(split.mean, split.std, torch.device("cpu")),
                        torch.device("cpu"))
    return split, embedder, head


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("method", ["mtl", "ft", "protonet"])
def test_cached_batched_equals_per_episode(setup, method, shots):
    split, embedder, head = setup
    sampler = EpisodeSampler(split.indices_by_class, 5, shots, 4, seed=3, name=split.name)
    learner = make_method(method, STEPS, LR, head if method == "mtl" else None)
    # episode_batch smaller than the episode count: several batched inner loops.
    fast = evaluate(learner, embedder, split, sampler, EPISODES, episode_batch=4)
    slow = [per_episode_accuracy(learner, embedder, split, sampler, i)
            for i in range(EPISODES)]
    np.testing.assert_array_equal(fast, np.array(slow, dtype=fast.dtype))
    assert 0.0 < fast.mean() < 1.0  # a meaningful comparison: neither all right nor all wrong


def test_batched_logits_match_single_episodes(setup):
    """The batched inner loop gives each episode the logits it gets alone (tolerance)."""
    split, embedder, head = setup
    sampler = EpisodeSampler(split.indices_by_class, 5, 2, 3, seed=5, name=split.name)
    batch = sampler.batch(0, 6)
    feats = embedder.embed(split, np.arange(len(split)))
    labels = torch.as_tensor(batch.support_labels()).expand(batch.tasks, -1)
    support, query = feats[batch.support], feats[batch.query]
    mtl = MTL(head, STEPS, LR)
    together = mtl.fit(support, labels, 5).logits(query)
    for t in range(batch.tasks):
        alone = mtl.fit(support[t:t + 1], labels[t:t + 1], 5).logits(query[t:t + 1])
        torch.testing.assert_close(together[t:t + 1], alone, rtol=1e-5, atol=1e-5)


def test_shared_cache_embeds_each_image_once(setup):
    split, embedder, head = setup
    calls = []
    real = embedder.embed

    def counting(split_, indices, **kw):
        calls.append(len(indices))
        return real(split_, indices, **kw)

    embedder.embed = counting  # type: ignore[method-assign]
    try:
        cache: dict = {}
        for shots in (1, 5):
            sampler = EpisodeSampler(split.indices_by_class, 5, shots, 4, seed=3)
            evaluate(ProtoNet(), embedder, split, sampler, EPISODES, cache=cache)
    finally:
        del embedder.embed
    assert sum(calls) == len(np.unique(cache["indices"])) <= len(split)


@pytest.mark.parametrize("first_order", [False, True])
def test_dual_inner_loop_equals_primal_steps(first_order):
    """``adapt`` (support-span form when S < D) equals plain gradient steps, and so do
    its meta-gradients w.r.t. theta_0 and the features."""
    g = torch.Generator().manual_seed(4)
    dt = torch.float64
    feats = torch.randn(3, 5, 12, generator=g, dtype=dt, requires_grad=True)
    w0 = (0.1 * torch.randn(5, 12, generator=g, dtype=dt)).requires_grad_()
    b0 = torch.randn(5, generator=g, dtype=dt, requires_grad=True)
    labels = torch.arange(5).expand(3, -1)
    targets = torch.nn.functional.one_hot(labels, 5).to(dt)

    def primal():
        w, b = w0.expand(3, -1, -1), b0.expand(3, -1)
        for _ in range(STEPS):
            gw, gb = cross_entropy_grads(w, b, feats, targets)
            if first_order:
                gw, gb = gw.detach(), gb.detach()
            w, b = w - LR * gw, b - LR * gb
        return w, b

    query = torch.randn(3, 7, 12, generator=g, dtype=dt)
    results = []
    for w, b in (adapt(w0, b0, feats, labels, 5, STEPS, LR, first_order), primal()):
        loss = linear_logits(w, b, query).logsumexp(-1).sum()
        grads = torch.autograd.grad(loss, (w0, b0, feats), allow_unused=True)
        results.append((w, b, *grads))
    for got, want in zip(*results, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want)
