"""Paired comparison of two finished runs scored on the same episodes: did a change (bf16
instead of fp32, another seed of training, a config key) move accuracy?

Each run's meta-test wrote per-episode accuracies (``episodes.json``); when both runs drew
the same test episodes (same dataset, split, evaluation seed and episode sizes: checked),
the per-episode difference of each method gives a paired 95% CI several times narrower than
either run's own CI. Prints one JSON line per method and setting, and a markdown table.

    python benchmarks/compare_runs.py runs/glyphs-fp32 runs/glyphs-bf16 --names fp32,bf16

Several runs per side (comma-separated, one per training seed, paired in order) give each
seed's paired difference and one 95% CI over seeds and episodes
(:func:`metatransfer.results.over_seeds`): it covers the training as well as the episodes
when each seed drew episodes of its own (distinct ``eval_seed``; a claim needs at least 3
seeds). Runs whose seeds share one eval seed never hold: their interval leaves the
episodes out.

    python benchmarks/compare_runs.py runs/a-s0,runs/a-s1,runs/a-s2 runs/b-s0,runs/b-s1,runs/b-s2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from metatransfer.results import (
    common_prefix_difference,
    mean_ci95,
    over_seeds,
    paired_row,
    setting_key,
    verdict,
)

# results.json keys that decide which episodes were drawn
EPISODE_SOURCE = ("dataset", "split", "eval_seed", "data_fingerprint")


def load_run(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A run's (or an eval folder's) results.json and per-episode accuracies."""
    paths = [folder / "results.json", folder / "episodes.json"]
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"{path}: not found; give a run (or eval-*) directory whose "
                             "meta-test finished")
    results = json.loads(paths[0].read_text())
    episodes = {k: np.asarray(v, dtype=np.float64)
                for k, v in json.loads(paths[1].read_text()).items()}
    return results, episodes


def check_same_episodes(a: dict, b: dict, names: tuple[str, str]) -> None:
    """Refuse runs whose episodes differ: a paired difference between them means nothing."""
    for key in EPISODE_SOURCE:
        if a.get(key) != b.get(key):
            raise SystemExit(f"{names[0]} and {names[1]} were not scored on the same episodes: "
                             f"{key} {a.get(key)!r} vs {b.get(key)!r}")
    size = [r.get("preprocessing", {}).get("image_size") for r in (a, b)]
    if size[0] != size[1]:
        raise SystemExit(f"image size differs ({size[0]} vs {size[1]}): not the same images")


def compare(a: tuple[dict, dict], b: tuple[dict, dict], names: tuple[str, str]) -> list[dict]:
    """``b - a`` per method and setting both runs have, on their common episodes."""
    (res_a, ep_a), (res_b, ep_b) = a, b
    check_same_episodes(res_a, res_b, names)
    queries = {(r["method"], r["ways"], r["shots"]): r["queries"] for r in res_a["results"]}
    rows = []
    for r in res_b["results"]:
        key = (r["method"], r["ways"], r["shots"])
        if key not in queries:
            continue
        if queries[key] != r["queries"]:
            raise SystemExit(f"{key}: {queries[key]} vs {r['queries']} queries per class")
        name = setting_key(*key)
        paired = paired_row(ep_b[name], ep_a[name])  # b - a
        n = paired["episodes"]
        rows.append({"method": r["method"], "ways": r["ways"], "shots": r["shots"],
                     "episodes": n, names[0]: round(mean_ci95(ep_a[name][:n])[0], 2),
                     names[1]: round(mean_ci95(ep_b[name][:n])[0], 2),
                     "diff": paired["diff"], "ci95": paired["ci95"],
                     "significant": paired["significant"],
                     "identical_episodes": int(np.sum(ep_a[name][:n] == ep_b[name][:n]))})
    if not rows:
        raise SystemExit("the runs have no method and setting in common")
    return rows


def table(rows: list[dict], names: tuple[str, str]) -> str:
    lines = [f"| method | setting | {names[0]} | {names[1]} | {names[1]} − {names[0]} "
             "(paired) | episodes scored alike |", "|---|---|---|---|---|---|"]
    for r in rows:
        star = " *" if r["significant"] else ""
        lines.append(f"| {r['method']} | {r['ways']}-way {r['shots']}-shot | {r[names[0]]:.2f} "
                     f"| {r[names[1]]:.2f} | {r['diff']:+.2f} ± {r['ci95']:.2f}{star} | "
                     f"{r['identical_episodes']}/{r['episodes']} |")
    return "\n".join(lines)


Run = tuple[dict, dict[str, np.ndarray]]


def summarise_seeds(runs: list[tuple[Run, Run]], per_seed: list[list[dict]]) -> list[dict]:
    """Per method and setting: each seed's paired difference ``b - a`` and the summary of
    their episodes over seeds (:func:`metatransfer.results.over_seeds`). ``holds`` needs
    each seed on episodes of its own (distinct eval seeds)."""
    own = len({a[0].get("eval_seed") for a, _ in runs}) == len(runs)
    keys = [(r["method"], r["ways"], r["shots"]) for r in per_seed[0]]
    out = []
    for key in keys:
        if not all(any((r["method"], r["ways"], r["shots"]) == key for r in rows)
                   for rows in per_seed):
            continue
        name = setting_key(*key)
        stats = over_seeds([common_prefix_difference(b[1][name], a[1][name]) for a, b in runs])
        if not own:
            stats["holds"] = False
            stats["ci_method"] += "; the seeds share an eval seed: episodes not covered"
        out.append({"method": key[0], "ways": key[1], "shots": key[2], **stats})
    return out


def seeds_table(rows: list[dict], names: tuple[str, str]) -> str:
    lines = [f"| method | setting | {names[1]} − {names[0]} per seed | mean ± 95% CI "
             "| ci_method | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        ci = "–" if r["ci95"] is None else f"{r['ci95']:.2f}"
        lines.append(f"| {r['method']} | {r['ways']}-way {r['shots']}-shot | "
                     + ", ".join(f"{d:+.2f}" for d in r["per_seed"])
                     + f" | {r['mean']:+.2f} ± {ci} | {r['ci_method']} | {verdict(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", help="a run directory, or several (one per seed) joined by commas")
    p.add_argument("run_b", help="as run_a, as many, in the same seed order")
    p.add_argument("--names", default="a,b", help="labels of the two runs (default: a,b)")
    args = p.parse_args(argv)
    names = tuple(args.names.split(","))
    if len(names) != 2 or len(set(names)) != 2:
        p.error("--names takes two different labels, e.g. fp32,bf16")
    side_a = [Path(x) for x in args.run_a.split(",") if x]
    side_b = [Path(x) for x in args.run_b.split(",") if x]
    if len(side_a) != len(side_b):
        p.error(f"{len(side_a)} runs against {len(side_b)}: give one run per seed on each side")
    runs = [(load_run(a), load_run(b)) for a, b in zip(side_a, side_b, strict=True)]
    per_seed = [compare(a, b, names) for a, b in runs]
    if len(per_seed) == 1:
        for row in per_seed[0]:
            print(json.dumps(row))
        print(table(per_seed[0], names), file=sys.stderr)
        return per_seed[0]
    rows = summarise_seeds(runs, per_seed)
    for row in rows:
        print(json.dumps(row))
    print(seeds_table(rows, names), file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
