"""Evaluation speed-up: embed-once + batched episodes vs embedding every episode.

The standard protocol (600 episodes each of 5-way 1-shot and 5-shot, 15 queries, 100
inner steps, method ``mtl``) on a real split (default: miniImageNet val, ``resnet25`` at
80x80). The per-episode side (``evaluation.per_episode_accuracy``) is timed over a few
episodes and scaled to 600. The embed-once side is ``evaluation.evaluate`` with one
embedding cache shared by both shot settings.

By default (CPU-sized) the embed-once side is measured in two parts: the batched
embedding rate on ``--embed-sample`` real images, scaled to the number of distinct images
the episodes use (counted exactly), plus the real ``evaluate`` episode phase over all
episodes on a cache of those embeddings (tiled to every image: its cost does not depend
on the values). ``--full`` embeds every image for real instead (about 80 TFLOP for
resnet25 on the 4,800 val images: ~15-40 min on 2 CPU cores, seconds on a GPU).

    python benchmarks/eval_speedup.py                  # default, a few minutes on CPU
    python benchmarks/eval_speedup.py --full           # the whole thing, for real
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metatransfer.config import DataConfig
from metatransfer.data import load_split
from metatransfer.data.base import ImageSplit
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.transforms import Normalizer
from metatransfer.devices import autocast_enabled, precision, subnormals_flushed
from metatransfer.embedding import Embedder
from metatransfer.evaluation import evaluate, per_episode_accuracy
from metatransfer.methods.mtl import MTL
from metatransfer.models import create_backbone, place_backbone
from metatransfer.models.ss import enable_ss

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "miniimagenet"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def distinct_images(split: ImageSplit, samplers: list[EpisodeSampler], episodes: int) -> int:
    used = [np.concatenate([b.support.ravel(), b.query.ravel()])
            for s in samplers for b in (s.batch(0, episodes),)]
    return len(np.unique(np.concatenate(used)))


def main(argv: list[str] | None = None) -> None:
    with subnormals_flushed():  # as `mtl run` does
        return measure(argv)


def measure(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="miniimagenet")
    p.add_argument("--root", default=str(DEFAULT_ROOT))
    p.add_argument("--split", default="val")
    p.add_argument("--backbone", default="resnet25")
    p.add_argument("--backbone-args", type=json.loads, default={})
    p.add_argument("--image-size", type=int, default=80)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--many", type=int, default=10000, help="the large episode count (0: skip)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--inner-steps", type=int, default=100)
    p.add_argument("--per-episode", type=int, default=1,
                   help="episodes per shot setting timed on the per-episode path")
    p.add_argument("--embed-sample", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=0, help="embedding batch (0: auto)")
    p.add_argument("--full", action="store_true", help="embed every image for real")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast of the backbone, as in runs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    amp = autocast_enabled(args.amp, device)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 64)

    split, load_s = clock(lambda: load_split(
        DataConfig(name=args.dataset, root=args.root, image_size=args.image_size), args.split),
        device)
    torch.manual_seed(0)
    backbone = create_backbone(args.backbone, in_channels=split.channels, **args.backbone_args)
    backbone = place_backbone(backbone, device, channels_last=True)  # as runs do
    enable_ss(backbone)  # the meta-trained network evaluated by `mtl`
    d = backbone.out_dim
    head = (torch.zeros(5, d, device=device), torch.zeros(5, device=device))
    mtl = MTL(head, args.inner_steps, 0.01)
    embedder = Embedder(backbone, Normalizer(split.mean, split.std, device, channels_last=True),
                        device, amp=amp)
    samplers = [EpisodeSampler(split.indices_by_class, 5, s, args.queries, seed=1234,
                               name=split.name) for s in args.shots]
    base = {"dataset": f"{args.dataset}/{args.split}", "images": len(split),
            "backbone": args.backbone, "size": args.image_size, "device": str(device),
            "precision": precision(amp),
            "threads": torch.get_num_threads(), "inner_steps": args.inner_steps,
            "queries": args.queries, "shots": args.shots}
    emit({**base, "measure": "load", "seconds": round(load_s, 1)})

    # per-episode reference: embed each episode's images, adapt alone
    embedder.embed(split, np.arange(2))  # warm-up
    per_episode = 0.0
    for sampler in samplers:
        _, secs = clock(lambda s=sampler: [per_episode_accuracy(mtl, embedder, split, s, i)
                                           for i in range(args.per_episode)], device)
        per_episode += secs / args.per_episode * args.episodes
        emit({**base, "measure": "per_episode", "shots_of": sampler.shots,
              "seconds_per_episode": round(secs / args.per_episode, 2)})

    rate = float("nan")
    cache: dict = {}
    if not args.full:
        sample = np.arange(min(args.embed_sample, len(split)))
        feats, secs = clock(lambda: embedder.embed(split, sample, len(sample)), device)
        rate = len(sample) / secs
        tiled = feats[torch.arange(len(split), device=device) % len(sample)]
        cache = {"indices": np.arange(len(split)), "feats": tiled}
        emit({**base, "measure": "embed_rate", "sample": len(sample),
              "images_per_s": round(rate, 2)})
    else:
        feats, secs = clock(lambda: embedder.embed(split, np.arange(len(split)), batch_size),
                            device)
        rate, embed_all_s = len(split) / secs, secs
        cache = {"indices": np.arange(len(split)), "feats": feats}
        emit({**base, "measure": "embed_rate", "sample": len(split),
              "images_per_s": round(rate, 2), "measured_all": True})
    for episodes in [args.episodes] + ([args.many] if args.many else []):
        distinct = distinct_images(split, samplers, episodes)
        embed_s = embed_all_s if args.full else distinct / rate
        episode_s = 0.0
        for sampler in samplers:
            _, secs = clock(lambda s=sampler, n=episodes: evaluate(
                mtl, embedder, split, s, n, cache=cache), device)
            episode_s += secs
        record = {**base, "measure": "embed_once", "episodes_per_setting": episodes,
                  "distinct_images": distinct, "embed_s": round(embed_s, 1),
                  "episodes_s": round(episode_s, 1), "total_s": round(embed_s + episode_s, 1),
                  "embedding_measured": args.full}
        if episodes == args.episodes:
            record["per_episode_s"] = round(per_episode, 1)
            record["speedup"] = round(per_episode / (embed_s + episode_s), 1)
        emit(record)
    print(f"done on {device}", file=sys.stderr)


if __name__ == "__main__":
    main()
