"""Accuracy benchmark: a preset end to end, MTL variants and baselines on the same episodes.

Pre-training, then one meta-training per MTL variant (built-in: SS on all layers or on the
last stage only; hard tasks off / resample / reuse; or any ``--variant NAME:key=val,...``),
then every method evaluated on the same seeded episodes and compared pairwise: the paired
95% CI of the per-episode difference is what can show that one method beats another.
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

from metatransfer.config import apply_override, load_config, to_dict
from metatransfer.devices import resolve_device, subnormals_flushed
from metatransfer.phases.meta_test import meta_test
from metatransfer.phases.meta_train import meta_train
from metatransfer.phases.pretrain import pretrain
from metatransfer.report import render
from metatransfer.results import (
    RESULTS_JSON,
    RESULTS_MD,
    comparison_rows,
    comparisons_table,
    results_table,
    write_episodes,
)
from metatransfer.runs import RunDir, seed_everything

VARIANTS = {
    "mtl+ht": {"model.ss_scope": "all", "meta.ht": "resample"},
    "mtl": {"model.ss_scope": "all", "meta.ht": "off"},
    "mtl-last+ht": {"model.ss_scope": "last", "meta.ht": "resample"},
    "mtl-last": {"model.ss_scope": "last", "meta.ht": "off"},
    "mtl+ht-reuse": {"model.ss_scope": "all", "meta.ht": "reuse"},
}
BASELINES = ["protonet", "ft"]
PRETRAIN_KEYS = ("pretrain.", "data.", "model.backbone", "seed")  # override prefixes
EPISODE_KEYS = ("episodes", "ways", "shots", "queries", "seed", "split")  # eval.* that pick them


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
    pairs += [("mtl+ht", "mtl"), ("mtl-last", "mtl")]
    return [(a, b) for a, b in pairs if a in methods and b in methods]


def pretrain_key(cfg) -> str:
    """Canonical YAML of all that pre-training depends on: equal keys share one pre-training."""
    return yaml.safe_dump({"seed": cfg.seed, "data": to_dict(cfg.data),
                           "backbone": cfg.model.backbone,
                           "backbone_args": cfg.model.backbone_args,
                           "pretrain": to_dict(cfg.pretrain)}, sort_keys=True)


def episode_source(cfg, res: dict) -> tuple:
    """What decides the evaluated episodes; equal for every method or the pairs are void."""
    return (res["dataset"], res["split"], *(getattr(cfg.eval, k) for k in EPISODE_KEYS))


def main(argv: list[str] | None = None) -> dict:
    with subnormals_flushed():  # as `mtl run` does
        return measure(argv)


def measure(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", default=",".join(VARIANTS),
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
    timings: dict[str, float] = {}
    rows: list[dict] = []
    per_episode: dict = {}
    sources: dict[str, tuple] = {}
    pretrainings: dict[str, dict] = {}  # pretrain_key -> {"tag", "cfg", "run", "path", ...}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    def pretrained_for(variant: str | None, overrides: dict) -> dict:
        """The pre-training a variant needs: the shared one unless it changes pre-training."""
        pre = with_overrides(cfg, {k: v for k, v in overrides.items()
                                   if k.startswith(PRETRAIN_KEYS)})
        key = pretrain_key(pre)
        if key not in pretrainings:
            tag = f"pretrain@{variant}" if pretrainings else "pretrain"
            pre = dataclasses.replace(pre, out=str(out / tag))
            run = RunDir(pre.out)
            run.write_config(pre, device)
            seed_everything(pre.seed)
            path = timed(tag, lambda: pretrain(pre, run, device))
            pretrainings[key] = {"tag": tag, "cfg": pre, "run": run, "path": path,
                                 "owner": variant, "variants": []}
        if variant is not None:
            pretrainings[key]["variants"].append(variant)
        return pretrainings[key]

    def collect(test_cfg, res: dict, rename) -> None:
        """Keep a meta-test's rows and per-episode accuracies under the benchmark's names."""
        for row in res["results"]:
            name = rename(row["method"])
            rows.append({**row, "method": name})
            sources[name] = episode_source(test_cfg, res)
        for key, acc in res["per_episode"].items():
            method, setting = key.split("/", 1)
            per_episode[f"{rename(method)}/{setting}"] = acc

    def test_baselines(pre: dict, suffix: str) -> None:
        test_cfg = with_overrides(pre["cfg"], {"eval.methods": f"[{','.join(baselines)}]"})
        res = timed(f"test baselines{suffix}", lambda: meta_test(
            test_cfg, pre["run"], device, None, pre["path"]))
        collect(test_cfg, res, lambda m: m + suffix)

    base = pretrained_for(None, {})
    baselines = [m for m in args.baselines.split(",") if m]
    if baselines:
        test_baselines(base, "")
    for name, overrides in variants.items():
        pre = pretrained_for(name, overrides)
        variant = with_overrides(dataclasses.replace(cfg, out=str(out / name)), overrides)
        run = RunDir(variant.out)
        run.write_config(variant, device)
        seed_everything(variant.seed)
        meta = timed(f"meta-train {name}", lambda v=variant, r=run, p=pre["path"]: meta_train(
            v, r, device, p))
        test_cfg = with_overrides(variant, {"eval.methods": "[mtl]"})
        res = timed(f"test {name}",
                    lambda t=test_cfg, r=run, m=meta: meta_test(t, r, device, m, None))
        collect(test_cfg, res, lambda m, n=name: n)
    if args.baselines_everywhere and baselines:
        for pre in pretrainings.values():
            if pre["owner"] is not None:
                test_baselines(pre, f"@{pre['owner']}")

    if not rows:
        parser.error("nothing to evaluate: give --variants/--variant or --baselines")
    # pairs are only meaningful when every method was scored on the very same episodes
    reference = sources[rows[0]["method"]]
    for method, source in sources.items():
        if source != reference:
            raise SystemExit(f"{method} was evaluated on other episodes than "
                             f"{rows[0]['method']} ({source} vs {reference}); its overrides "
                             "must not change the evaluated split or eval.* episode keys")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    own_ft = {v: f"ft@{p['owner']}" for p in pretrainings.values() if p["owner"]
              for v in p["variants"]}
    pairs = (parse_pairs(args.pairs, methods) if args.pairs
             else default_pairs(list(variants), methods, own_ft))
    settings = list(dict.fromkeys((r["ways"], r["shots"]) for r in rows))
    comparisons = comparison_rows(per_episode, pairs, settings)

    results = {
        "preset": args.preset, "dataset": cfg.data.name, "split": reference[1],
        "backbone": cfg.model.backbone, "seed": cfg.seed, "eval_seed": cfg.eval.seed,
        "overrides": args.overrides, "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "seconds": timings, "training_seconds": round(
            sum(v for k, v in timings.items() if not k.startswith("test")), 1),
        "variants": variants,
        "pretrainings": {p["tag"]: p["variants"] for p in pretrainings.values()},
        "results": rows,
        "comparisons": comparisons,
    }
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2))
    write_episodes(out, per_episode)
    table = results_table(results)
    command = " ".join(["python", "benchmarks/accuracy.py", *(argv or sys.argv[1:])])
    (out / RESULTS_MD).write_text(
        f"# {args.preset}: {cfg.data.name} ({results['split']} split)\n\n"
        f"`{command}`\n\nMachine: {results['machine']}; training time "
        f"{results['training_seconds']:.0f} s; phase times (s): {json.dumps(timings)}\n\n"
        f"Pre-trainings (variants that use each; baselines use `pretrain`): "
        f"{json.dumps(results['pretrainings'])}\n\n"
        f"Accuracy (%) ± 95% CI, every method on the same {cfg.eval.episodes} episodes.\n\n"
        f"{table}\n\n{comparisons_table(comparisons)}\n\n"
        f"![learning curves](learning_curves.png)\n\n![accuracy](accuracy.png)\n")
    render(out)
    for row in rows:
        print(json.dumps({"preset": args.preset, **row}))
    for comparison in comparisons:
        print(json.dumps({"preset": args.preset, **comparison}))
    print(table, file=sys.stderr)
    print(comparisons_table(comparisons), file=sys.stderr)
    return {**results, "per_episode": per_episode}


if __name__ == "__main__":
    main()
