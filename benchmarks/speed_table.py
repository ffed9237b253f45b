"""Markdown summary of the speed benchmarks' JSON lines, as in ``benchmarks/RESULTS.md``.

    python benchmarks/speed_table.py cpu_results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(lines: list[str]) -> str:
    """Markdown rows for the JSON lines of the speed benchmarks (one dense-rate row per
    backbone, though every script measures it)."""
    recs = [json.loads(x) for x in lines if x.strip().startswith("{")]
    rows = ["| backbone | measure | setting | rate | GFLOP | GFLOP/s | of matmul | notes |",
            "|---|---|---|---|---|---|---|---|"]

    def frac(r: dict) -> str:
        return f"{100 * r['fraction_of_matmul']:.0f}%" if "fraction_of_matmul" in r else ""

    dense_shown = set()
    for r in recs:
        name = f"{r.get('backbone', '')}@{r.get('size', '')}"
        m = r["measure"]
        if m == "matmul":
            if name in dense_shown:
                continue
            dense_shown.add(name)
        gf = r.get("gflop", "")
        ach = r.get("achieved_gflops", "")
        if m == "pretrain":
            rows.append(f"| {name} | pre-train | batch {r['batch']} | {r['images_per_s']} img/s "
                        f"| {gf} | {ach} | {frac(r)} | peak {r['peak_mib']:.0f} MiB |")
        elif m == "data_pipeline":
            rows.append(f"| {name} | data pipeline | batch {r['batch']} | "
                        f"{r['images_per_s']} img/s | | | | {r['vs_pretrain']}x pre-train |")
        elif m == "meta_backbone_fwd_bwd":
            rows.append(f"| {name} | SS fwd+bwd only | {r['images']} images | "
                        f"{r['step_s']} s | {gf} | {ach} | {frac(r)} | reference |")
        elif m == "meta_train":
            rows.append(f"| {name} | meta-train | {r['shots']}-shot, {r['order']} order | "
                        f"{r['episodes_per_s']} ep/s | {gf} | {ach} | {frac(r)} | "
                        f"{100 * r['overhead_vs_backbone']:+.0f}% vs fwd+bwd, "
                        f"peak {r['peak_mib']:.0f} MiB |")
        elif m == "meta_batch":
            rows.append(f"| {name} | meta-batch k={r['k']} | 1-shot | "
                        f"{r['batched_tasks_per_s']} vs {r['separate_tasks_per_s']} tasks/s | "
                        f"| | | {r['speedup']}x batched |")
        elif m == "embed":
            rows.append(f"| {name} | embed (no grad) | batch {r['batch']} | "
                        f"{r['images_per_s']} img/s | {gf} | {ach} | {frac(r)} | |")
        elif m == "meta_test":
            how = "measured" if r["per_episode_measured"] else "from embed rate"
            rows.append(f"| {name} | meta-test | {r['shots']}-shot | "
                        f"{r['per_episode_episodes_per_s']} ep/s per-episode ({how}); "
                        f"{r['cached_episodes_per_s']} ep/s cached | | | | "
                        f"{r['cached_episodes']} episodes |")
        elif m == "matmul":
            rows.append(f"| {name} | dense fp32 | | {r['fp32_gflops']} GFLOP/s | | | | "
                        f"torch.mm {r.get('mm_gflops', '')}, 1x1 conv "
                        f"{r.get('conv1x1_gflops', '')} |")
        elif m == "flops":
            rows.append(f"| {name} | model | forward | {r['forward_gflop_per_image']} GFLOP/img "
                        f"| | | | {r['out_dim']}-d |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    lines = [line for path in argv for line in Path(path).read_text().splitlines()]
    print(table(lines))


if __name__ == "__main__":
    main()
