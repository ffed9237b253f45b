"""One table over seeds from seed folders that ``accuracy.py --seeds`` wrote in separate runs.

Why: a long benchmark cut short, or one seed run first to look and the others later,
leaves each finished seed on record (``seed-S/seed_results.json`` and
``seed-S/episodes.json``). Re-running a finished seed would cost its whole pipeline
again; this reads the folders and summarises them exactly as ``accuracy.py`` does over
seeds (:func:`metatransfer.results.over_seeds`: one interval over seeds and episodes,
``holds``, ``one network`` where every seed's values are the same). Each seed must have
drawn its own episodes (their eval seeds differ) and the folders must come from one
preset and one set of overrides - that is the caller's to keep; the eval seeds and the
episode counts are checked.

    python benchmarks/combine_seeds.py runs/a/seed-0 runs/b/seed-1 runs/b/seed-2 \\
        --pairs "mtl+ht-ft,mtl+ht-forced-ft" --out runs/combined.md

``--with NAME=F0,F1,F2`` brings in another pipeline (another preset or network) run on the
*same* episodes - seed folders whose eval seeds equal the main folders', one per seed in
the same order - with its methods renamed ``method@NAME``, so that two networks are
compared paired, episode by episode (e.g. ``--pairs "ft-ft@conv4"``). Its eval seeds,
episode counts and, where recorded, episode shapes are checked against the main folders'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from accuracy import parse_pairs

from metatransfer.results import common_prefix_difference, over_seeds


def load_seed(folder: Path) -> dict:
    """A seed folder's record and per-episode accuracies (``method/WwSs`` -> fractions)."""
    try:
        record = json.loads((folder / "seed_results.json").read_text())
        episodes = json.loads((folder / "episodes.json").read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{folder}: not a finished seed of accuracy.py --seeds ({err}); "
                         "give folders holding seed_results.json and episodes.json") from None
    return {"folder": str(folder), "seed": record["seed"], "eval_seed": record["eval_seed"],
            "selections": record.get("selections", {}), "shape": record.get("episode_shape"),
            "episodes": {k: np.asarray(v, dtype=np.float64) for k, v in episodes.items()}}


def parse_with(text: str) -> tuple[str, list[Path]]:
    """``NAME=F0,F1,...`` -> the pipeline's name and its seed folders."""
    name, sep, folders = text.partition("=")
    if not sep or not name or not folders:
        raise argparse.ArgumentTypeError(f"'{text}': give --with NAME=SEED0,SEED1,... "
                                         "(one seed folder per main folder, same order)")
    return name, [Path(f) for f in folders.split(",") if f]


def join_pipeline(seeds: list[dict], name: str, others: list[dict]) -> None:
    """Add another pipeline's per-episode accuracies to each seed as ``method@name``, after
    checking that they were scored on that seed's very episodes."""
    if len(others) != len(seeds):
        raise SystemExit(f"--with {name}: {len(others)} folders for {len(seeds)} seeds; give "
                         "one per main folder, in the same order")
    for mine, other in zip(seeds, others, strict=True):
        if other["eval_seed"] != mine["eval_seed"]:
            raise SystemExit(f"{other['folder']}: eval seed {other['eval_seed']}, but "
                             f"{mine['folder']} has {mine['eval_seed']}: not the same "
                             "episodes, so no paired comparison (run it with the same --seeds)")
        if mine["shape"] and other["shape"] and mine["shape"] != other["shape"]:
            raise SystemExit(f"{other['folder']}: episodes {other['shape']}, but "
                             f"{mine['folder']} has {mine['shape']}: not the same episodes")
        lengths = {len(v) for k, v in mine["episodes"].items()
                   if not k.startswith("ft-all")}
        for key, acc in other["episodes"].items():
            method, setting = key.rsplit("/", 1)
            if not method.startswith("ft-all") and lengths and len(acc) not in lengths:
                raise SystemExit(f"{other['folder']}: {key} has {len(acc)} episodes, "
                                 f"{mine['folder']} {sorted(lengths)}: not the same episodes")
            mine["episodes"][f"{method}@{name}/{setting}"] = acc
        for variant, kept in other["selections"].items():
            mine["selections"][f"{variant}@{name}"] = kept


def settings_of(keys) -> list[tuple[str, str]]:
    """``(method, setting)`` of each ``method/5w1s`` key."""
    return [tuple(k.rsplit("/", 1)) for k in keys]


def combine(seeds: list[dict], pairs: list[tuple[str, str]]) -> dict:
    """Accuracy per method and setting, and each pair's paired difference, over seeds."""
    drawn = [s["eval_seed"] for s in seeds]
    if len(set(drawn)) < len(drawn):
        raise SystemExit(f"seeds {[s['seed'] for s in seeds]} share episodes (eval seeds "
                         f"{drawn}); an interval over seeds needs episodes of each seed's own")
    common = [k for k in seeds[0]["episodes"] if all(k in s["episodes"] for s in seeds)]
    accuracy = {k: over_seeds([s["episodes"][k] for s in seeds]) for k in common}
    settings = list(dict.fromkeys(setting for _, setting in settings_of(common)))
    comparisons = {}
    for a, b in pairs:
        for setting in settings:
            ka, kb = f"{a}/{setting}", f"{b}/{setting}"
            if ka in common and kb in common:
                diffs = [common_prefix_difference(s["episodes"][ka], s["episodes"][kb])
                         for s in seeds]
                comparisons[f"{a} − {b} {setting}"] = over_seeds(diffs)
    return {"seeds": [s["seed"] for s in seeds], "eval_seeds": drawn,
            "folders": [s["folder"] for s in seeds], "accuracy": accuracy,
            "comparisons": comparisons,
            "selections": {str(s["seed"]): s["selections"] for s in seeds}}


def markdown(result: dict) -> str:
    """The two tables (accuracy; differences with per-seed values and the verdict)."""
    def cell(stats: dict, sign: str = "") -> str:
        ci = "–" if stats["ci95"] is None else f"{stats['ci95']:.2f}"
        return f"{stats['mean']:{sign}.2f} ± {ci}"

    lines = [f"Seeds {result['seeds']} (eval seeds {result['eval_seeds']}), mean ± 95% CI "
             "over seeds and episodes.", "", "| method / setting | accuracy | per seed |",
             "|---|---|---|"]
    for key, stats in result["accuracy"].items():
        lines.append(f"| {key} | {cell(stats)} | "
                     + ", ".join(f"{v:.2f}" for v in stats["per_seed"]) + " |")
    lines += ["", "| difference | mean ± CI | per seed | verdict |", "|---|---|---|---|"]
    for key, stats in result["comparisons"].items():
        verdict = ("holds" if stats["holds"] else
                   "one network" if stats["scope"] != "across seeds" else "not shown")
        lines.append(f"| {key} | {cell(stats, '+')} | "
                     + ", ".join(f"{v:+.2f}" for v in stats["per_seed"]) + f" | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="seed-S folders, one per seed")
    parser.add_argument("--pairs", default="", help="A-B,A-B comparisons (paired per seed)")
    parser.add_argument("--with", dest="pipelines", action="append", default=[],
                        type=parse_with, metavar="NAME=F0,F1,...",
                        help="another pipeline's seed folders on the same episodes; its "
                             "methods join as method@NAME (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    seeds = [load_seed(f) for f in args.folders]
    for name, folders in args.pipelines:
        join_pipeline(seeds, name, [load_seed(f) for f in folders])
    methods = sorted({k.rsplit("/", 1)[0] for s in seeds for k in s["episodes"]})
    result = combine(seeds, parse_pairs(args.pairs, methods))
    print(json.dumps(result, default=str))
    text = markdown(result)
    print(text, file=sys.stderr)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
