"""Phase 3 — meta-test: seeded novel-class episodes, every method on the same episodes.

For each requested (ways, shots): draw ``eval.episodes`` episodes from the evaluated split
with the evaluation seed, then score each method on exactly those episodes:

* ``mtl``: SS-modulated backbone, inner loop from the meta-learned θ_0;
* ``ft``: the same inner loop from zero on the plain pre-trained features;
* ``protonet``: nearest class centroid on the pre-trained features;
* ``ft-all``: the whole pre-trained backbone fine-tuned per task (first
  ``eval.ft_all_episodes`` episodes only: it cannot embed once, so it is costly).

Accuracy is the mean over episodes with a 95% confidence interval, in percent. Because
the episodes are shared, methods are compared by the paired difference of their
per-episode accuracies (``comparisons``), whose CI is several times narrower than the
unpaired ones; the per-episode accuracies go to ``episodes.json`` for later comparisons.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..checkpoints import (
    ModelInfo,
    bn_changed_reason,
    build_backbone,
    load_model,
    sibling_pretrained,
)
from ..config import EVAL_METHODS, RunConfig, check_methods
from ..data import load_split
from ..data.episodes import EpisodeSampler
from ..devices import precision
from ..errors import MTLError
from ..evaluation import episode_ids, evaluate_all_ranks
from ..finetune import evaluate_ft_all
from ..preprocessing import apply_stats, for_checkpoint
from ..results import comparison_rows, result_row, setting_key, training_sizes, write_results
from ..runs import RunDir
from .common import make_embedder, prepare_backbone, use_amp

log = logging.getLogger(__name__)
ALL_METHODS = EVAL_METHODS
# what a run can answer: does meta-transfer beat each baseline, and ft beat protonet
PAIRS = (("mtl", "ft"), ("mtl", "protonet"), ("mtl", "ft-all"), ("ft", "protonet"))


def split_name(cfg: RunConfig) -> str:
    """The on-disk split ``eval.split`` refers to (``test`` -> ``data.test_split`` etc.)."""
    mapping = {"train": cfg.data.train_split, "val": cfg.data.val_split,
               "test": cfg.data.test_split}
    return mapping.get(cfg.eval.split, cfg.eval.split)


def load_models(meta_path: Path | None, pretrained_path: Path | None, methods: list[str]):
    """Backbones per method: the SS backbone (+θ_0) for mtl, the plain one for baselines."""
    models: dict[str, tuple[ModelInfo, nn.Module, tuple | None]] = {}
    meta = load_model(meta_path) if meta_path else None
    if "mtl" in methods:
        if meta is None or not meta[2]:
            raise MTLError("method 'mtl' needs a meta-trained checkpoint (run meta-train first, "
                           "or pass --checkpoint)")
        info, state, head = meta
        models["mtl"] = (info, build_backbone(info, state), (head["weight"], head["bias"]))
    baselines = [m for m in methods if m != "mtl"]
    if baselines:
        changed = bn_changed_reason(meta[0].extra) if meta is not None else None
        if pretrained_path is None and changed:
            pretrained_path = sibling_pretrained(meta_path)  # the run directory's
            if pretrained_path is not None:
                log.info("baselines %s use %s: %s", ", ".join(baselines), pretrained_path,
                         changed)
        if pretrained_path is not None:
            info, state, _ = load_model(pretrained_path)
        elif meta is not None and not changed:
            # W and b are frozen during meta-training: dropping SS gives the pre-trained net
            info, state = meta[0], {k: v for k, v in meta[1].items()
                                    if not k.endswith(("ss_scale", "ss_shift"))}
        elif meta is not None:
            raise MTLError(f"methods {', '.join(baselines)} are the pre-trained network, but "
                           f"{meta_path} is not ({changed}): pass --pretrained with the "
                           "checkpoint meta-training started from (pretrain_best.safetensors, "
                           "or the imported pre-trained model)")
        else:
            raise MTLError(f"methods {', '.join(baselines)} need the pre-trained checkpoint "
                           "(pass --pretrained)")
        plain = (info, build_backbone(info, state), None)
        for method in baselines:
            models[method] = plain
    return models


def meta_test(cfg: RunConfig, run: RunDir, device: torch.device, meta_path: Path | None,
              pretrained_path: Path | None, show: bool = True) -> dict:
    """Evaluate every method on the same seeded episodes; write results.json / results.md."""
    ec = cfg.eval
    check_methods(ec.methods)  # configs built in code skip validate()
    models = load_models(meta_path, pretrained_path, ec.methods)
    # each model sees its checkpoint's preprocessing (size, resize policy, statistics,
    # feature normalisation) unless the config overrides it explicitly
    splits, loaded, preps, embedders, caches = {}, {}, {}, {}, {}
    for info, backbone, _ in models.values():
        key = id(backbone)
        if key in embedders:
            continue
        data, prep = for_checkpoint(cfg.data, info, "meta-test: ")
        geometry = (data.image_size, data.resize)
        if geometry not in loaded:
            with distributed.local_main_first():
                loaded[geometry] = load_split(data, split_name(cfg))
        splits[key] = apply_stats(loaded[geometry], prep, "meta-test: ")
        if info.in_channels != splits[key].channels:
            raise MTLError(f"the {info.backbone} checkpoint expects {info.in_channels}-channel "
                           f"images but {splits[key].name} has {splits[key].channels}; "
                           "evaluate it on a dataset like the one it was trained on")
        preps[key] = prep
        prepare_backbone(cfg, backbone, device).eval()
        norm = info.feature_norm  # the same features the inner loop was tuned for
        embedders[key] = make_embedder(cfg, backbone, splits[key], device, norm)
        caches[key] = {}
    first = id(next(iter(models.values()))[1])
    split = splits[first]
    rows = []
    per_episode: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for ways in ec.ways:
        for shots in ec.shots:
            split.require(ways, shots + ec.queries, f"{ways}-way {shots}-shot test episodes")
            sampler = EpisodeSampler(split.indices_by_class, ways, shots, ec.queries,
                                     seed=ec.seed, name=split.name)
            for method in ec.methods:
                info, backbone, head = models[method]
                if method == "ft-all":
                    count = min(ec.ft_all_episodes, ec.episodes)
                    ids = episode_ids(count, distributed.rank(), distributed.world_size())
                    acc = distributed.gather_by_index(ids, evaluate_ft_all(
                        backbone, splits[id(backbone)], sampler, ids, device, ec.ft_all_steps,
                        ec.ft_all_lr), count)
                else:
                    if head is not None:
                        head = (head[0].to(device), head[1].to(device))
                    # each process runs its share of the episodes; all of them are gathered
                    acc = evaluate_all_ranks(method, embedders[id(backbone)],
                                             splits[id(backbone)], sampler, ec.episodes,
                                             ec.inner_steps, ec.inner_lr, head,
                                             episode_batch=ec.episode_batch,
                                             cache=caches[id(backbone)],
                                             progress=show and run.is_main)
                rows.append(result_row(method, ways, shots, ec.queries, acc))
                per_episode[setting_key(method, ways, shots)] = np.asarray(acc)
    settings = [(ways, shots) for ways in ec.ways for shots in ec.shots]
    pairs = [(a, b) for a, b in PAIRS if a in ec.methods and b in ec.methods]
    results = {
        "dataset": cfg.data.name,
        "split": split_name(cfg),
        "backbone": models[ec.methods[0]][0].backbone,  # validate() forbids no methods
        "seed": cfg.seed,
        "eval_seed": ec.seed,
        "selection_seed": ec.val_seed,  # in-training validation: a stream apart from these
        "inner_steps": ec.inner_steps,
        "inner_lr": ec.inner_lr,
        "device": str(device),
        "precision": precision(use_amp(cfg, device)),  # of the backbone's forward passes
        "world_size": distributed.world_size(),
        "training": training_sizes(cfg),
        "eval_seconds": round(time.perf_counter() - started, 2),
        "preprocessing": preps[first].as_dict(),
        "results": rows,
        "comparisons": comparison_rows(per_episode, pairs, settings),
        "per_episode": per_episode,  # for scripts; written to episodes.json, not results.json
    }
    by_method = {m: preps[id(models[m][1])].as_dict() for m in ec.methods}
    if any(p != results["preprocessing"] for p in by_method.values()):
        results["preprocessing_by_method"] = by_method
    if "data_fingerprint" in split.meta:  # e.g. the fonts the glyphs were rendered from
        results["data_fingerprint"] = split.meta["data_fingerprint"]
    if run.is_main:
        write_results(run.path, results)
    return results
