"""Markdown summary of the speed benchmarks' JSON lines, as in ``benchmarks/RESULTS.md``:
one row per measurement with its fp32 and bf16 figures side by side, the bf16 speed-up, and
each precision's fraction of the best reference kernel of that precision.

    python benchmarks/speed_table.py cpu_results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# measure -> (what is shown, how a record names its setting, its headline figure, unit,
#             True when larger is faster, None when the precision does not apply: the
#             model's FLOPs and the data pipeline, which is uint8/fp32 either way)
MEASURES = {
    "kernels": ("peak kernel", lambda r: "best of mm, 1x1, 3x3 conv", "peak_gflops",
                "GFLOP/s", True),
    "flops": ("model", lambda r: f"forward, {r['out_dim']}-d", "forward_gflop_per_image",
              "GFLOP/img", None),
    "pretrain": ("pre-train", lambda r: f"batch {r['batch']}", "images_per_s", "img/s", True),
    "data_pipeline": ("data pipeline", lambda r: f"batch {r['batch']}", "images_per_s",
                      "img/s", None),
    "meta_backbone_fwd_bwd": ("SS fwd+bwd only", lambda r: f"{r['images']} images", "step_s",
                              "s", False),
    "meta_train": ("meta-train", lambda r: f"{r['shots']}-shot, {r['order']} order",
                   "episodes_per_s", "ep/s", True),
    "meta_batch": ("meta-batch", lambda r: f"k={r['k']} batched, 1-shot",
                   "batched_tasks_per_s", "tasks/s", True),
    "embed": ("embed (no grad)", lambda r: f"batch {r['batch']}", "images_per_s", "img/s",
              True),
    # episodes on cached embeddings: the inner loops only, fp32 in both precisions
    "meta_test": ("meta-test episodes, cached", lambda r: f"{r['shots']}-shot, "
                  f"{r['cached_episodes']} episodes", "cached_episodes_per_s", "ep/s", None),
}
PRECISIONS = ("fp32", "bf16")


def table(lines: list[str]) -> str:
    """Markdown rows for the JSON lines of the speed benchmarks (the first record of each
    backbone, measure, setting and precision). The peak row shows the highest reference
    rate seen for that backbone and precision, the one the last fractions were taken
    against (every script measures the kernels again, and the fractions re-measure them)."""
    recs = [json.loads(x) for x in lines if x.strip().startswith("{")]
    peaks: dict[tuple, float] = {}
    for r in recs:
        if "peak_gflops" in r:
            key = (r["backbone"], r["size"], r.get("precision", "fp32"))
            peaks[key] = max(peaks.get(key, 0.0), r["peak_gflops"])
    rows: dict[tuple, dict[str, dict]] = {}
    for r in recs:
        if r["measure"] == "kernels":
            r = {**r, "peak_gflops": peaks[(r["backbone"], r["size"],
                                            r.get("precision", "fp32"))]}
        if r["measure"] not in MEASURES:
            continue
        what, setting, *_ = MEASURES[r["measure"]]
        unfolded = " (BN unfolded)" if r.get("fold_bn") is False else ""
        key = (f"{r['backbone']}@{r['size']}{unfolded}", what, setting(r), r["measure"])
        rows.setdefault(key, {}).setdefault(r.get("precision", "fp32"), r)

    out = ["| backbone | measure | setting | fp32 | bf16 | bf16 speed-up | fp32 of peak "
           "| bf16 of peak |", "|---|---|---|---|---|---|---|---|"]
    for (name, what, setting, measure), by_precision in rows.items():
        _, _, field, unit, faster_up = MEASURES[measure]
        values = [by_precision.get(p, {}).get(field) for p in PRECISIONS]
        cells = [f"{v} {unit}" if v is not None else "" for v in values]
        speedup = ""
        if faster_up is not None and None not in values and 0 not in values:
            ratio = values[1] / values[0] if faster_up else values[0] / values[1]
            speedup = f"{ratio:.2f}x"
        if faster_up is None:  # does not depend on the precision: one figure
            cells = [cells[0] or cells[1], ""]
        fractions = [f"{100 * by_precision[p]['fraction_of_peak']:.0f}%"
                     if "fraction_of_peak" in by_precision.get(p, {}) else ""
                     for p in PRECISIONS]
        out.append(f"| {name} | {what} | {setting} | {cells[0]} | {cells[1]} | {speedup} | "
                   f"{fractions[0]} | {fractions[1]} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    lines = [line for path in argv for line in Path(path).read_text().splitlines()]
    print(table(lines))


if __name__ == "__main__":
    main()
