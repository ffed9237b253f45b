"""Meta-test speed, per backbone: the embedding rate (batched, no grad) and episodes/s
of per-episode evaluation (embed each episode's images, the reference path) vs the
cached, batched ``evaluation.evaluate`` (embed every image once, all episodes' inner
loops together), 5-way 1- and 5-shot.

    python benchmarks/meta_test_speed.py                       # CPU default
    python benchmarks/meta_test_speed.py --quick --backbones conv4@16   # seconds
    python benchmarks/meta_test_speed.py --device cuda --backbones resnet12@84

Rows "embed (no grad)" and "meta-test" of ``benchmarks/RESULTS.md``; the speed-up on
real data is ``eval_speedup.py``. Options: see ``timing.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from timing import Setup, emit, run, timed

from metatransfer.data.episodes import EpisodeSampler
from metatransfer.embedding import Embedder
from metatransfer.evaluation import evaluate, per_episode_accuracy
from metatransfer.methods.mtl import MTL
from metatransfer.phases.meta_train import MetaLearner


def meta_test(bench: Setup) -> None:
    """Per-episode embedding (the reference path) vs cached, batched evaluation."""
    args, device = bench.args, bench.device
    backbone = bench.new_backbone()
    learner = MetaLearner(backbone, 5, "kernel", "all", False).to(device)
    mtl = MTL((learner.weight0.detach(), learner.bias0.detach()), args.inner_steps, 0.01)
    embedder = Embedder(bench.maybe_compile(learner.backbone), bench.normalizer, device,
                        amp=bench.amp, fold_bn=bench.cfg.fold_bn)
    embed_batch = 16 if bench.heavy else 256
    idx = np.arange(min(embed_batch, len(bench.split)))
    embedder.embed(bench.split, idx[:2])
    embed_s, _ = timed(lambda _: embedder.embed(bench.split, idx, batch_size=len(idx)),
                       1 if bench.heavy else args.iters, 0, device)
    embed_ips = len(idx) / embed_s
    emit({**bench.base, "measure": "embed", "batch": len(idx),
          "images_per_s": round(embed_ips, 2),
          **bench.rate(bench.fwd_flops * len(idx), embed_s)})
    cache = random_cache(len(bench.split), backbone.out_dim, device)
    for shots in (1, 5):
        sampler = EpisodeSampler(bench.split.indices_by_class, 5, shots, args.queries, 7)
        images = 5 * (shots + args.queries)
        if bench.heavy and not args.full:  # one episode's forward costs minutes here
            adapt_s, _ = timed(lambda _, s=sampler: evaluate(
                mtl, embedder, bench.split, s, 1, cache=cache), 2, 1, device)
            per_s, measured = images / embed_ips + adapt_s, False
        else:
            per_s, _ = timed(lambda i, s=sampler: per_episode_accuracy(
                mtl, embedder, bench.split, s, i), args.iters, 1, device)
            measured = True
        n_eps = args.eval_episodes
        cached_s, _ = timed(lambda _, s=sampler: evaluate(
            mtl, embedder, bench.split, s, args.eval_episodes, cache=cache), 1, 1, device)
        emit({**bench.base, "measure": "meta_test", "shots": shots, "queries": args.queries,
              "inner_steps": args.inner_steps,
              "per_episode_episodes_per_s": round(1 / per_s, 3),
              "per_episode_measured": measured,
              "cached_episodes_per_s": round(n_eps / cached_s, 1),
              "cached_episodes": n_eps,
              "embed_images_per_s": round(embed_ips, 2)})


def random_cache(n: int, d: int, device: torch.device) -> dict:
    """An embedding cache for every image (the episode phase does not depend on values)."""
    gen = torch.Generator().manual_seed(0)
    return {"indices": np.arange(n), "feats": torch.randn(n, d, generator=gen).to(device)}


def measure(bench: Setup) -> None:
    if "metatest" not in bench.args.skip:
        meta_test(bench)


def main(argv: list[str] | None = None) -> None:
    run(measure, __doc__, argv)


if __name__ == "__main__":
    main()
