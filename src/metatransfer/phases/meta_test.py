"""Phase 3 — meta-test: seeded novel-class episodes, every method on the same episodes.

For each requested (ways, shots): draw ``eval.episodes`` episodes from the evaluated split
with the evaluation seed (:func:`metatransfer.config.eval_seed`: ``eval.seed``, or one
derived from the run's training seeds, so that each training seed is scored on episodes of
its own), then score each method on exactly those episodes:

* ``mtl``: SS-modulated backbone, inner loop from the meta-learned θ_0;
* ``ft``: the same inner loop from zero on the plain pre-trained features;
* ``protonet``: nearest class centroid on the pre-trained features;
* ``ft-all``: the whole pre-trained backbone fine-tuned per task (first
  ``eval.ft_all_episodes`` episodes only: it cannot embed once, so it is costly);
* any other method registered with ``@register_method`` (:mod:`metatransfer.methods`).

Each method runs on the network its class names (the meta model for ``mtl``, the
pre-trained ``pretrain_best`` for the baselines, :func:`metatransfer.loader.load_models`),
under that network's preprocessing; every image is embedded once per network.

Accuracy is the mean over episodes with a 95% confidence interval, in percent. Because
the episodes are shared, methods are compared by the paired difference of their
per-episode accuracies (``comparisons``), whose CI is several times narrower than the
unpaired ones; the per-episode accuracies go to ``episodes.json`` for later comparisons.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..config import RunConfig, eval_seed, eval_split
from ..data.base import ImageSplit
from ..data.episodes import EpisodeSampler
from ..data.training import evaluation_split
from ..devices import precision
from ..embedding import Embedder
from ..errors import MTLError
from ..evaluation import evaluate_all_ranks
from ..loader import CheckpointPaths, LoadedModel, load_models
from ..methods.catalog import create_method
from ..methods.registry import check_methods, comparison_pairs
from ..preprocessing import apply_stats, check_decoding, for_checkpoint
from ..results import (
    comparison_rows,
    result_row,
    selection_record,
    setting_key,
    training_sizes,
    write_results,
)
from ..runs import RunDir
from .common import channels_last, use_amp

log = logging.getLogger(__name__)


@dataclass
class TestNetwork:
    """One loaded network on the evaluated split: the images under its preprocessing,
    its embedder, and the embeddings computed so far (shared by its methods)."""

    model: LoadedModel
    split: ImageSplit
    embedder: Embedder
    cache: dict


def test_networks(cfg: RunConfig, device: torch.device,
                  models: dict[str, LoadedModel]) -> dict[LoadedModel, TestNetwork]:
    """Each distinct network of ``models`` on the evaluated split, under its checkpoint's
    preprocessing (size, resize policy, statistics, feature normalisation) unless the
    config overrides it explicitly; splits of the same geometry are loaded once."""
    loaded, networks = {}, {}
    for model in dict.fromkeys(models.values()):
        data, model.preprocessing = for_checkpoint(cfg.data, model.info, "meta-test: ")
        geometry = (data.image_size, data.resize, data.channels, data.invert)
        if geometry not in loaded:
            with distributed.local_main_first():
                loaded[geometry] = evaluation_split(data, eval_split(cfg))
        check_decoding(loaded[geometry], model.preprocessing)  # e.g. raw Omniglot inverted
        split = apply_stats(loaded[geometry], model.preprocessing, "meta-test: ")
        if model.channels != split.channels:
            raise MTLError(f"the {model.info.backbone} checkpoint expects {model.channels}-"
                           f"channel images but {split.name} has {split.channels}; "
                           "evaluate it on a dataset like the one it was trained on")
        embedder = model.embedder(device, use_amp(cfg, device), channels_last(cfg), cfg.compile,
                                  cfg.fold_bn)
        networks[model] = TestNetwork(model, split, embedder, {})
    return networks


def meta_test(cfg: RunConfig, run: RunDir, device: torch.device, meta_path: Path | None,
              pretrained_path: Path | None, show: bool = True) -> dict:
    """Evaluate every method on the same seeded episodes; write results.json / results.md."""
    ec = cfg.eval
    check_methods(ec.methods)  # configs built in code skip validate()
    models = load_models(CheckpointPaths(meta_path, pretrained_path), ec.methods)
    networks = test_networks(cfg, device, models)
    methods = {m: create_method(m, ec, models[m].head) for m in ec.methods}
    first = next(iter(networks.values()))  # the meta model's when there is one
    split = first.split
    seed = eval_seed(cfg)  # the run's own episodes, shared by its methods
    rows = []
    per_episode: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for ways in ec.ways:
        for shots in ec.shots:
            split.require(ways, shots + ec.queries, f"{ways}-way {shots}-shot test episodes")
            sampler = EpisodeSampler(split.indices_by_class, ways, shots, ec.queries,
                                     seed=seed, name=split.name)
            for name, method in methods.items():
                net = networks[models[name]]
                count = min(method.max_episodes or ec.episodes, ec.episodes)
                # each process runs its share of the episodes; all of them are gathered
                acc = evaluate_all_ranks(method, net.embedder, net.split, sampler, count,
                                         episode_batch=ec.episode_batch, cache=net.cache,
                                         progress=show and run.is_main)
                rows.append(result_row(name, ways, shots, ec.queries, acc))
                per_episode[setting_key(name, ways, shots)] = np.asarray(acc)
    settings = [(ways, shots) for ways in ec.ways for shots in ec.shots]
    preprocessing = first.model.preprocessing.as_dict()
    results = {
        "dataset": cfg.data.name,
        "split": eval_split(cfg),
        "backbone": models[ec.methods[0]].info.backbone,  # validate() forbids no methods
        "seed": cfg.seed,
        "eval_seed": seed,
        "selection_seed": ec.val_seed,  # in-training validation: a stream apart from these
        "inner_steps": ec.inner_steps,
        "inner_lr": ec.inner_lr,
        "device": str(device),
        "precision": precision(use_amp(cfg, device)),  # of the backbone's forward passes
        "world_size": distributed.world_size(),
        "training": training_sizes(cfg),
        "eval_seconds": round(time.perf_counter() - started, 2),
        "preprocessing": preprocessing,
        "results": rows,
        "comparisons": comparison_rows(per_episode, comparison_pairs(ec.methods), settings),
        "per_episode": per_episode,  # for scripts; written to episodes.json, not results.json
    }
    by_method = {m: models[m].preprocessing.as_dict() for m in ec.methods}
    if any(p != preprocessing for p in by_method.values()):
        results["preprocessing_by_method"] = by_method
    if "ft" in methods and (ec.ft_inner_steps is not None or ec.ft_inner_lr is not None):
        ft = methods["ft"]  # tuned apart from mtl's inner loop
        results["ft_inner_steps"], results["ft_inner_lr"] = ft.steps, ft.lr
    if "mtl" in models and (kept := selection_record(models["mtl"].info.extra)):
        results["selection"] = kept  # which meta-training epoch mtl is (0: mtl = ft)
    pre = next((m.info.extra for m in models.values()
                if "pretrain_selected_epoch" in m.info.extra), None)
    if pre:  # a fine-tuning from pretrain.init: which epoch it kept (0: the import)
        results["pretrain_selection"] = {k: pre[k] for k in (
            "pretrain_selected_epoch", "pretrain_epochs", "pretrain_selection_acc")}
    if "data_fingerprint" in split.meta:  # e.g. the fonts the glyphs were rendered from
        results["data_fingerprint"] = split.meta["data_fingerprint"]
    if run.is_main:
        write_results(run.path, results)
    return results
