"""Tune the evaluation inner loop of ``mtl`` and ``ft`` apart, on the selection split.

``mtl`` (the inner loop from θ_0 on SS features) and its baseline ``ft`` (the same loop
from zero on the pre-trained features) need not share one setting: a fair table gives each
its best. This scores a grid of (steps, lr) for both on episodes of the run's *selection*
classes (``data.val_split``, or the training classes set apart by
``data.selection_holdout``), drawn from the selection stream (``eval.val_seed``), never
from the classes or episodes a report is made of. Each network embeds each image once; a
grid cell costs one batched inner loop. Prints one JSON line per method and cell, then
the best cell of each method (mean accuracy over the evaluated settings) and the
``eval.*`` lines to put in the preset.

    python benchmarks/tune_inner_loop.py runs/omniglot-lite0 --steps 25,50,100 \\
        --lrs 0.5,1,2,5,10 --episodes 300
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from metatransfer.config import CONFIG_NAME, load_config
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.training import selection_name, training_splits
from metatransfer.devices import autocast_enabled, resolve_device, subnormals_flushed
from metatransfer.evaluation import evaluate
from metatransfer.loader import find_checkpoints, load_models
from metatransfer.methods.ft import FineTune
from metatransfer.methods.mtl import MTL
from metatransfer.preprocessing import apply_stats, for_checkpoint
from metatransfer.results import mean_ci95


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory (meta_best + pretrain_best)")
    p.add_argument("--steps", type=ints, default=[25, 50, 100])
    p.add_argument("--lrs", type=floats, required=True)
    p.add_argument("--episodes", type=int, default=300, help="selection episodes per setting")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    with subnormals_flushed():
        return tune(args)


def tune(args) -> dict:
    cfg = load_config(file=args.run / CONFIG_NAME, overrides=args.overrides)
    device = resolve_device(cfg.device)
    ec = cfg.eval
    models = load_models(find_checkpoints(args.run), ["mtl", "ft"])
    cells = [(s, lr) for s in args.steps for lr in args.lrs]
    scores: dict[str, dict[tuple[int, float], list[float]]] = {"mtl": {}, "ft": {}}
    settings = [(w, s) for w in ec.ways for s in ec.shots]
    for name, model in models.items():
        data, prep = for_checkpoint(cfg.data, model.info, quiet=True)
        split = apply_stats(training_splits(data, "meta")[1], prep)
        embedder = model.embedder(device, autocast_enabled(cfg.amp, device), cfg.channels_last)
        cache: dict = {}
        for ways, shots in settings:
            split.require(ways, shots + ec.queries, f"{ways}-way {shots}-shot selection episodes")
            sampler = EpisodeSampler(split.indices_by_class, ways, shots, ec.queries,
                                     seed=ec.val_seed, name=split.name, stream="selection")
            for steps, lr in cells:
                method = MTL(model.head, steps, lr) if name == "mtl" else FineTune(steps, lr)
                with torch.no_grad():
                    acc = evaluate(method, embedder, split, sampler, args.episodes, cache=cache)
                mean, ci = mean_ci95(acc)
                scores[name].setdefault((steps, lr), []).append(mean)
                print(json.dumps({"method": name, "ways": ways, "shots": shots, "steps": steps,
                                  "lr": lr, "episodes": args.episodes,
                                  "accuracy": round(mean, 2), "ci95": round(ci, 2)}),
                      flush=True)
    best = {name: max(cells, key=lambda c, n=name: np.mean(scores[n][c])) for name in scores}
    summary = {
        "selection": selection_name(cfg.data), "settings": settings, "episodes": args.episodes,
        "best": {n: {"steps": c[0], "lr": c[1], "mean_accuracy": round(
            float(np.mean(scores[n][c])), 2)} for n, c in best.items()},
        "at_current": {n: round(float(np.mean(scores[n][(ec.inner_steps, ec.inner_lr)])), 2)
                       for n in scores if (ec.inner_steps, ec.inner_lr) in scores[n]},
    }
    print(json.dumps(summary))
    (m_steps, m_lr), (f_steps, f_lr) = best["mtl"], best["ft"]
    print(f"eval:\n  inner_steps: {m_steps}\n  inner_lr: {m_lr}\n"
          f"  ft_inner_steps: {f_steps}\n  ft_inner_lr: {f_lr}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
