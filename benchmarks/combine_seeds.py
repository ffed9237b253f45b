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
            "selections": record.get("selections", {}),
            "episodes": {k: np.asarray(v, dtype=np.float64) for k, v in episodes.items()}}


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
    parser.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    seeds = [load_seed(f) for f in args.folders]
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
