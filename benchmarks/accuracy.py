"""Accuracy benchmark: a preset end to end, MTL variants and baselines on the same episodes.

Pre-training, then one meta-training per MTL variant (built-in: SS where the preset puts
it, or forced onto all layers / the last stage; hard tasks off / resample / reuse; or any
``--variant NAME:key=val,...``; default ``mtl+ht,mtl``),
then every method evaluated on the same seeded episodes and compared pairwise: the paired
95% CI of the per-episode difference is what can show that one method beats another.

Over training seeds (``--seeds`` / ``--meta-seeds``) each seed draws episodes of its own
(``eval.seed`` derived from the seed: :func:`metatransfer.config.derived_eval_seed`, an
explicit ``eval.seed`` taking the place of its base 1234), all methods of a seed sharing
them; each comparison gets one interval over seeds and episodes
(:func:`metatransfer.results.over_seeds`) and ``holds`` is decided on it. A comparison
whose networks do not change with the seed (baselines on one shared pre-training) is
``one network``, never "across seeds".
A variant that overrides pre-training keys (``pretrain.*``, ``data.*``, ``model.backbone*``,
``seed``) gets its own pre-training; variants that do not share the base one. Data
overrides must leave the evaluated split's images as they are (e.g. ``data.augment``,
``data.meta_holdout``), or the pairs would not be on the same episodes.

Writes ``results.json`` (with ``comparisons``), ``results.md``, ``episodes.json``,
``learning_curves.png`` and ``accuracy.png`` into ``--out`` and prints one JSON line per
result row and per comparison.

    python benchmarks/accuracy.py --preset omniglot-conv4 --out runs/bench-omniglot
    python benchmarks/accuracy.py --preset glyphs-conv4 --out runs/bench-lr --variants mtl \\
        --variant mtl-lr2:meta.lr_ss=2e-3 --variant mtl-pe20:pretrain.epochs=20 \\
        --baselines-everywhere --pairs mtl-lr2-mtl,mtl-lr2-ft
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import torch
import yaml

from metatransfer.amp_choice import resolve_run_amp
from metatransfer.checkpoints import META_TRAINED_NAME
from metatransfer.config import (
    EVAL_SEED_BASE,
    apply_override,
    derived_eval_seed,
    eval_seed,
    load_config,
    phase_seed,
    to_dict,
)
from metatransfer.devices import autocast_enabled, precision, resolve_device, subnormals_flushed
from metatransfer.phases.meta_test import meta_test
from metatransfer.phases.meta_train import meta_train
from metatransfer.phases.pretrain import pretrain
from metatransfer.report import render, selection_notes
from metatransfer.results import (
    RESULTS_JSON,
    RESULTS_MD,
    common_prefix_difference,
    comparison_rows,
    comparisons_table,
    over_seeds,
    results_table,
    seeds_comparisons_table,
    setting_key,
    write_episodes,
)
from metatransfer.runs import RunDir, seed_everything

# `mtl+ht`, `mtl` and `mtl+ht-reuse` keep the preset's `model.ss_scope`, so a preset's own
# setting is what its table reports; `-all` / `-last` force one scope for the ablation.
VARIANTS = {
    "mtl+ht": {"meta.ht": "resample"},
    "mtl": {"meta.ht": "off"},
    "mtl+ht-reuse": {"meta.ht": "reuse"},
    "mtl-all+ht": {"model.ss_scope": "all", "meta.ht": "resample"},
    "mtl-all": {"model.ss_scope": "all", "meta.ht": "off"},
    "mtl-last+ht": {"model.ss_scope": "last", "meta.ht": "resample"},
    "mtl-last": {"model.ss_scope": "last", "meta.ht": "off"},
}
DEFAULT_VARIANTS = ("mtl+ht", "mtl")
BASELINES = ["protonet", "ft"]
PRETRAIN_KEYS = ("pretrain.", "data.", "model.backbone", "seed")  # override prefixes
EPISODE_KEYS = ("episodes", "ways", "shots", "queries", "split")  # eval.* that shape them


def with_overrides(cfg, items: dict):
    for key, value in items.items():
        cfg = apply_override(cfg, f"{key}={value}")
    return cfg


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=val,key=val`` -> (name, overrides). Items are split only at a comma that
    starts a new ``key=``, so values may hold commas (``eval.shots=[1,5]``)."""
    name, sep, rest = text.partition(":")
    items = [item for item in re.split(r",(?=\s*[\w.]+=)", rest) if item.strip()]
    if not sep or not name or not all("=" in item for item in items):
        raise argparse.ArgumentTypeError(f"expected NAME:key=val,key=val, got '{text}'")
    return name, {k.strip(): v for k, _, v in (item.partition("=") for item in items)}


def parse_pairs(text: str, methods: list[str]) -> list[tuple[str, str]]:
    """``a-b,a-b`` -> pairs. Names hold dashes too (``mtl-last-ft``), so each item is split
    at the one dash that leaves two known method names."""
    pairs = []
    for item in filter(None, text.split(",")):
        cuts = [(item[:i], item[i + 1:]) for i, ch in enumerate(item) if ch == "-"
                and item[:i] in methods and item[i + 1:] in methods]
        if len(cuts) != 1:
            raise SystemExit(f"--pairs: cannot read '{item}' as A-B with A and B among "
                             f"{', '.join(methods)}")
        pairs.append(cuts[0])
    return pairs


def default_pairs(variants: list[str], methods: list[str],
                  own_ft: dict[str, str]) -> list[tuple[str, str]]:
    """Every variant against ``ft``; where baselines ran on a variant's own pre-training
    (``own_ft``: variant -> e.g. ``ft@NAME``), the variant against that ``ft`` (meta-transfer
    alone) and that ``ft`` against ``ft`` (the pre-training change alone); then the
    ablations the paper reports: hard tasks, and SS on the last stage only."""
    pairs = [(v, "ft") for v in variants]
    pairs += [(v, own_ft[v]) for v in variants if v in own_ft]
    pairs += [(ft, "ft") for ft in dict.fromkeys(own_ft.values())]
    pairs += [("mtl+ht", "mtl"), ("mtl-last", "mtl"), ("mtl+ht-forced", "mtl-forced")]
    return [(a, b) for a, b in pairs if a in methods and b in methods]


def pretrain_key(cfg) -> str:
    """Canonical YAML of all that pre-training depends on: equal keys share one pre-training
    (the meta-training seed is not part of it: ``--meta-seeds`` share one)."""
    return yaml.safe_dump({"seed": phase_seed(cfg, "pretrain"), "data": to_dict(cfg.data),
                           "backbone": cfg.model.backbone,
                           "backbone_args": cfg.model.backbone_args,
                           "pretrain": to_dict(cfg.pretrain)}, sort_keys=True)


def episode_source(cfg, res: dict) -> tuple[tuple, int]:
    """What decides the evaluated episodes: their shape (dataset, split, sizes) and their
    seed; both equal for every method of a seed, or its pairs are void."""
    shape = (res["dataset"], res["split"], *(getattr(cfg.eval, k) for k in EPISODE_KEYS))
    return shape, res["eval_seed"]


def main(argv: list[str] | None = None) -> dict:
    with subnormals_flushed():  # as `mtl run` does
        return measure(argv)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") \
            from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got '{text}'")
    return seeds


class Benchmark:
    """One seed's benchmark: pre-trainings (shared across seeds when equal), one
    meta-training per variant, every method on the same episodes (this seed's own).

    ``networks`` names the network each method ran on (a pre-training's label, or the
    seed's own meta-training), so that comparisons whose networks are the same for every
    seed are told apart as ``one network``."""

    def __init__(self, args, cfg, out: Path, device, pretrainings: dict, timings: dict,
                 label: str) -> None:
        self.args, self.cfg, self.out, self.device = args, cfg, out, device
        self.pretrainings, self.timings, self.label = pretrainings, timings, label
        self.rows: list[dict] = []
        self.per_episode: dict = {}
        self.sources: dict[str, tuple] = {}
        self.selections: dict[str, dict] = {}
        self.networks: dict[str, str] = {}
        self.used: list[dict] = []  # the pre-trainings this seed used

    def timed(self, name, fn):
        start = time.perf_counter()
        result = fn()
        self.timings[f"{self.label}{name}"] = round(time.perf_counter() - start, 1)
        return result

    def pretrained_for(self, variant: str | None, overrides: dict) -> dict:
        """The pre-training a variant needs: the shared one unless it changes pre-training."""
        pre = with_overrides(self.cfg, {k: v for k, v in overrides.items()
                                        if k.startswith(PRETRAIN_KEYS)})
        key = pretrain_key(pre)
        if key not in self.pretrainings:
            mine = sum(p["seed_label"] == self.label for p in self.pretrainings.values())
            tag = f"pretrain@{variant}" if mine else "pretrain"
            pre = dataclasses.replace(pre, out=str(self.out / tag))
            run = RunDir(pre.out)
            run.write_config(pre, self.device)
            seed_everything(pre.seed)
            path = self.timed(tag, lambda: pretrain(pre, run, self.device))
            self.pretrainings[key] = {"tag": tag, "cfg": pre, "run": run, "path": path,
                                      "owner": variant, "variants": [],
                                      "seed_label": self.label}
        entry = self.pretrainings[key]
        if entry not in self.used:
            self.used.append(entry)
        if variant is not None:
            entry["variants"].append(variant)
        return entry

    def collect(self, test_cfg, res: dict, rename) -> None:
        """Keep a meta-test's rows and per-episode accuracies under the benchmark's names."""
        for row in res["results"]:
            name = rename(row["method"])
            self.rows.append({**row, "method": name})
            self.sources[name] = episode_source(test_cfg, res)
        for key, acc in res["per_episode"].items():
            method, setting = key.split("/", 1)
            self.per_episode[f"{rename(method)}/{setting}"] = acc

    def test_baselines(self, pre: dict, suffix: str, baselines: list[str]) -> None:
        """The baselines on a pre-training (perhaps another seed's, shared), scored on this
        seed's episodes."""
        test_cfg = with_overrides(pre["cfg"], {"eval.methods": f"[{','.join(baselines)}]",
                                               "eval.seed": self.cfg.eval.seed})
        run = pre["run"]
        if pre["seed_label"] != self.label:  # another seed's pre-training: this seed's
            # scores go to this seed's folder, not over that seed's results
            folder = self.out / f"baselines{suffix.replace('@', '-')}"
            test_cfg = dataclasses.replace(test_cfg, out=str(folder))
            run = RunDir(folder)
        res = self.timed(f"test baselines{suffix}", lambda: meta_test(
            test_cfg, run, self.device, None, pre["path"]))
        self.collect(test_cfg, res, lambda m: m + suffix)
        for m in baselines:
            self.networks[m + suffix] = pre["seed_label"] + pre["tag"]

    def test_mtl(self, name: str, variant, meta: Path, folder: Path) -> dict:
        test_cfg = with_overrides(dataclasses.replace(variant, out=str(folder)),
                                  {"eval.methods": "[mtl]"})
        run = RunDir(folder)
        res = self.timed(f"test {name}", lambda: meta_test(test_cfg, run, self.device, meta,
                                                           None))
        self.collect(test_cfg, res, lambda m: name)
        return res

    def run(self, variants: dict, baselines: list[str]) -> None:
        base = self.pretrained_for(None, {})
        if baselines:
            self.test_baselines(base, "", baselines)
        for name, overrides in variants.items():
            pre = self.pretrained_for(name, overrides)
            variant = with_overrides(dataclasses.replace(self.cfg, out=str(self.out / name)),
                                     overrides)
            run = RunDir(variant.out)
            run.write_config(variant, self.device)
            seed_everything(variant.seed)
            meta = self.timed(f"meta-train {name}", lambda v=variant, r=run, p=pre["path"]:
                              meta_train(v, r, self.device, p))
            res = self.test_mtl(name, variant, meta, Path(variant.out))
            kept = res.get("selection")
            if kept:
                self.selections[name] = kept
            # selection kept the start: SS is the identity, mtl runs on the pre-trained network
            start = kept is not None and kept.get("selected_epoch") == 0
            self.networks[name] = (pre["seed_label"] + pre["tag"] if start
                                   else f"{self.label}{name}")
            trained = meta.parent / META_TRAINED_NAME
            if variant.meta.select_start and trained.is_file():
                # the best trained epoch: what meta-training does, whatever selection kept
                self.test_mtl(f"{name}-forced", variant, trained, self.out / f"{name}-forced")
                self.networks[f"{name}-forced"] = f"{self.label}{name}-forced"
        if self.args.baselines_everywhere and baselines:
            for pre in self.used:
                if pre["owner"] is not None:
                    self.test_baselines(pre, f"@{pre['owner']}", baselines)

    def own_ft(self) -> dict[str, str]:
        return {v: f"ft@{p['owner']}" for p in self.used if p["owner"] for v in p["variants"]}


def seed_independent(benches: list[Benchmark], method: str) -> bool:
    """Whether ``method`` ran on the same network for every seed (a pre-training they
    share): then the seeds repeat that network's evaluation, they do not retrain it."""
    return len({b.networks.get(method, f"{b.label}{method}") for b in benches}) == 1


def combine_rows(benches: list[Benchmark]) -> list[dict]:
    """Accuracy rows over seeds: the mean accuracy and its 95% CI over seeds and episodes
    (:func:`metatransfer.results.over_seeds`), each seed's accuracy and episode CI."""
    rows = []
    for row in benches[0].rows:
        key = setting_key(row["method"], row["ways"], row["shots"])
        if not all(key in b.per_episode for b in benches):
            continue
        stats = over_seeds([b.per_episode[key] for b in benches],
                           seed_independent(benches, row["method"]))
        rows.append({**row, "accuracy": stats["mean"], "ci95": stats["ci95"] or 0.0,
                     **{k: stats[k] for k in ("scope", "ci_method", "seeds", "per_seed",
                                              "per_seed_ci95")}})
    return rows


def combine_comparisons(benches: list[Benchmark], per_seed: list[list[dict]]) -> list[dict]:
    """Each paired comparison over seeds: the per-seed paired differences of episodes,
    summarised by :func:`metatransfer.results.over_seeds` (one interval over seeds and
    episodes, ``holds``; ``one network`` where neither side changes with the seed), each
    seed's own difference, episode CI and eval seed beside it."""
    keyed = [{(c["a"], c["b"], c["ways"], c["shots"]): c for c in rows} for rows in per_seed]
    out = []
    for key, first in keyed[0].items():
        if not all(key in k for k in keyed):
            continue
        a, b, ways, shots = key
        diffs = [common_prefix_difference(bench.per_episode[setting_key(a, ways, shots)],
                                          bench.per_episode[setting_key(b, ways, shots)])
                 for bench in benches]
        fixed = seed_independent(benches, a) and seed_independent(benches, b)
        stats = over_seeds(diffs, fixed)
        out.append({"a": a, "b": b, "ways": ways, "shots": shots,
                    "episodes": first["episodes"], **stats, "diff": stats["mean"],
                    "ci95": stats["ci95"] or 0.0,
                    "eval_seeds": [bench.cfg.eval.seed for bench in benches],
                    "per_seed_significant": [k[key]["significant"] for k in keyed]})
    return out


def per_seed_table(seeds: list[int], per_seed: dict[int, list[dict]]) -> str:
    """Each seed's paired differences side by side (points ± paired episode CI)."""
    keys = list(dict.fromkeys((c["a"], c["b"], c["ways"], c["shots"])
                              for c in per_seed[seeds[0]]))
    cell = {s: {(c["a"], c["b"], c["ways"], c["shots"]): c for c in per_seed[s]}
            for s in seeds}
    lines = ["| difference | setting | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for a, b, w, sh in keys:
        values = []
        for s in seeds:
            c = cell[s].get((a, b, w, sh))
            values.append("–" if c is None else
                          f"{c['diff']:+.2f} ± {c['ci95']:.2f}{' *' if c['significant'] else ''}")
        lines.append(f"| {a} − {b} | {w}-way {sh}-shot | " + " | ".join(values) + " |")
    return "\n".join(lines)


def seed_configs(cfg, axis: str | None, seeds: list[int]) -> dict[int, object]:
    """Each seed's config, with the seed of its episodes fixed in ``eval.seed`` so that
    every method and variant of the seed shares them (paired), even a variant that
    overrides ``seed``. Over seeds each seed draws its own
    (:func:`metatransfer.config.derived_eval_seed`, an explicit ``eval.seed`` as the base):
    an interval over seeds then covers episodes too."""
    if axis is None:
        return {seeds[0]: with_overrides(cfg, {"eval.seed": eval_seed(cfg)})}
    base = EVAL_SEED_BASE if cfg.eval.seed is None else cfg.eval.seed
    out = {}
    for seed in seeds:
        seed_cfg = with_overrides(cfg, {axis: seed})
        out[seed] = with_overrides(seed_cfg, {"eval.seed": derived_eval_seed(seed_cfg, base)})
    drawn = [c.eval.seed for c in out.values()]
    if len(set(drawn)) < len(drawn):
        raise SystemExit(f"seeds {seeds} would share episodes (eval seeds {drawn}); use "
                         "training seeds below 1000")
    return out


def check_episodes(benches: dict[int, Benchmark]) -> tuple:
    """Within each seed every method must have been scored on the very same episodes, or
    its pairs are void; over seeds only the split and episode sizes must agree (each seed
    has episodes of its own). Returns the episodes' shape (dataset, split, sizes)."""
    first = next(iter(benches.values()))
    shape = first.sources[first.rows[0]["method"]][0]
    for bench in benches.values():
        mine = bench.sources[bench.rows[0]["method"]]
        for method, source in bench.sources.items():
            if source != mine or source[0] != shape:
                raise SystemExit(f"{method} was evaluated on other episodes than "
                                 f"{bench.rows[0]['method']} ({source} vs {mine}); its "
                                 "overrides must not change the evaluated split or eval.* "
                                 "episode keys")
    return shape


def measure(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated built-in MTL variants (of {', '.join(VARIANTS)})")
    parser.add_argument("--variant", dest="extra", action="append", default=[],
                        type=parse_variant, metavar="NAME:key=val,...",
                        help="an MTL variant given by its overrides (repeatable)")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="comma-separated baseline methods (protonet, ft, ft-all)")
    parser.add_argument("--baselines-everywhere", action="store_true",
                        help="also evaluate the baselines on each variant's own pre-training "
                             "(named e.g. ft@VARIANT)")
    parser.add_argument("--pairs", default="",
                        help="comma-separated A-B comparisons (default: every variant - ft, "
                             "mtl+ht - mtl, mtl-last - mtl)")
    seeds_group = parser.add_mutually_exclusive_group()
    seeds_group.add_argument("--seeds", type=parse_seeds, metavar="S,S,...",
                             help="the whole pipeline once per training seed (seed=S)")
    seeds_group.add_argument("--meta-seeds", type=parse_seeds, metavar="S,S,...",
                             help="one pre-training, one meta-training per seed (meta.seed=S)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant '{unknown[0]}'; built-in: {', '.join(VARIANTS)} "
                     "(or give one as --variant NAME:key=val,...)")
    variants = {v: VARIANTS[v] for v in args.variants.split(",") if v} | dict(args.extra)
    out = Path(args.out)
    cfg = load_config(args.preset, overrides=args.overrides)
    device = resolve_device(cfg.device)
    choice = resolve_run_amp(cfg, device)  # amp=auto: the precision measured faster here
    logging.info("precision %s", choice.reason)
    cfg = dataclasses.replace(cfg, amp=choice.amp)
    baselines = [m for m in args.baselines.split(",") if m]
    axis, seeds = ("seed", args.seeds) if args.seeds else (
        ("meta.seed", args.meta_seeds) if args.meta_seeds else (None, [cfg.seed]))
    timings: dict[str, float] = {}
    pretrainings: dict[str, dict] = {}  # pretrain_key -> its run: equal keys train once
    benches: dict[int, Benchmark] = {}
    for seed, seed_cfg in seed_configs(cfg, axis, seeds).items():
        folder = out / f"seed-{seed}" if axis else out
        label = f"seed {seed}: " if axis else ""
        bench = Benchmark(args, seed_cfg, folder, device, pretrainings, timings, label)
        bench.run(variants, baselines)
        benches[seed] = bench
        if axis:  # each seed on record as it ends: a long run cut short keeps what it did
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "seed_results.json").write_text(json.dumps(
                {"seed": seed, "eval_seed": seed_cfg.eval.seed,
                 "episode_shape": list(check_episodes({seed: bench})) if bench.rows else None,
                 "results": bench.rows,
                 "selections": bench.selections, "networks": bench.networks,
                 "seconds": timings}, indent=2, default=str))
            write_episodes(folder, bench.per_episode)

    first = benches[seeds[0]]
    if not first.rows:
        parser.error("nothing to evaluate: give --variants/--variant or --baselines")
    reference = check_episodes(benches)
    methods = list(dict.fromkeys(r["method"] for r in first.rows))
    forced = [f"{v}-forced" for v in variants if f"{v}-forced" in methods]
    pairs = (parse_pairs(args.pairs, methods) if args.pairs
             else default_pairs(list(variants) + forced, methods, first.own_ft()))
    settings = list(dict.fromkeys((r["ways"], r["shots"]) for r in first.rows))
    per_seed_comparisons = {s: [{**c, "eval_seed": b.cfg.eval.seed}
                                for c in comparison_rows(b.per_episode, pairs, settings)]
                            for s, b in benches.items()}
    several = axis is not None and len(seeds) > 1  # one seed is a plain benchmark
    if several:
        rows = combine_rows(list(benches.values()))
        comparisons = combine_comparisons(list(benches.values()),
                                          list(per_seed_comparisons.values()))
        per_episode = {f"seed{s}:{k}": v for s, b in benches.items()
                       for k, v in b.per_episode.items()}
        selections = {v: {str(s): b.selections[v] for s, b in benches.items()
                          if v in b.selections} for v in variants}
    else:
        rows, comparisons, per_episode = first.rows, per_seed_comparisons[seeds[0]], \
            first.per_episode
        selections = first.selections
    results = {
        "preset": args.preset, "dataset": cfg.data.name, "split": reference[1],
        "backbone": cfg.model.backbone, "seed": cfg.seed,
        "eval_seed": ({str(s): b.cfg.eval.seed for s, b in benches.items()} if several
                      else first.cfg.eval.seed),
        "overrides": args.overrides, "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "precision": precision(autocast_enabled(cfg.amp, device)),
        "precision_reason": choice.reason,
        "seconds": timings, "training_seconds": round(
            sum(v for k, v in timings.items() if "test" not in k), 1),
        "variants": variants,
        "pretrainings": {(p["seed_label"] + p["tag"]): p["variants"]
                         for p in pretrainings.values()},
        "results": rows,
        "comparisons": comparisons,
        "selections": selections,
    }
    if several:
        results["seed_axis"] = {"seed": "whole pipeline per seed",
                                "meta.seed": "one pre-training, meta-training per seed"}[axis]
        results["seeds"] = seeds
        results["per_seed_comparisons"] = {str(s): c for s, c in per_seed_comparisons.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2))
    write_episodes(out, per_episode)
    table = results_table(results)
    command = " ".join(["python", "benchmarks/accuracy.py", *(argv or sys.argv[1:])])
    text = markdown(args.preset, cfg, command, results, per_seed_comparisons)
    (out / RESULTS_MD).write_text(text)
    render(out)
    for row in rows:
        print(json.dumps({"preset": args.preset, **row}))
    for comparison in comparisons:
        print(json.dumps({"preset": args.preset, **comparison}))
    print(table, file=sys.stderr)
    print(seeds_comparisons_table(comparisons) if several else comparisons_table(comparisons),
          file=sys.stderr)
    return {**results, "per_episode": per_episode}


def markdown(preset: str, cfg, command: str, results: dict,
             per_seed_comparisons: dict[int, list[dict]]) -> str:
    """``results.md``: the command, machine and times, the accuracy table and the
    comparisons; over seeds, each comparison's interval, ``ci_method`` and verdict (holds
    / not shown / one network), then each seed's own paired differences."""
    seeds = results.get("seeds")
    episodes = cfg.eval.episodes
    if seeds:
        scope = (f"mean over {len(seeds)} seeds ({results['seed_axis']}: "
                 f"{', '.join(map(str, seeds))}) ± 95% CI over seeds and episodes (method "
                 f"per row in results.json's `ci_method`); each seed on {episodes} episodes "
                 f"of its own (eval seeds {json.dumps(results['eval_seed'])}), shared by "
                 "its methods")
        compared = seeds_comparisons_table(results["comparisons"])
    else:
        scope = (f"± 95% CI over {episodes} episodes; every method on the same episodes "
                 f"(eval seed {results['eval_seed']})")
        compared = comparisons_table(results["comparisons"])
    text = (f"# {preset}: {cfg.data.name} ({results['split']} split)\n\n"
            f"`{command}`\n\nMachine: {results['machine']}, {results['precision']}; training "
            f"time {results['training_seconds']:.0f} s; phase times (s): "
            f"{json.dumps(results['seconds'])}\n\n"
            f"Variants (each one's overrides on top of the preset; `model.ss_scope` is the "
            f"preset's `{cfg.model.ss_scope}` unless a variant sets it): "
            f"{json.dumps(results['variants'])}\n\n"
            f"Pre-trainings (variants that use each; baselines use `pretrain`): "
            f"{json.dumps(results['pretrainings'])}\n\n"
            f"Accuracy (%), {scope}.\n\n{results_table(results)}\n\n{compared}\n\n")
    if seeds:
        text += ("Per seed (paired difference ± CI over that seed's episodes; `*`: it "
                 "excludes 0):\n\n"
                 f"{per_seed_table(seeds, per_seed_comparisons)}\n\n")
    notes = "\n".join(f"- {n}" for n in selection_notes(results))
    if notes:
        text += f"What selection kept:\n\n{notes}\n\n"
    return text + "![learning curves](learning_curves.png)\n\n![accuracy](accuracy.png)\n"


if __name__ == "__main__":
    main()
