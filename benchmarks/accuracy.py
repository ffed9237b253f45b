"""Accuracy benchmark: a preset end to end, with the paper's ablation on the same episodes.

One pre-training, then one meta-training per MTL variant (SS on all layers or on the last
stage only; hard tasks off / resample / reuse), then every method evaluated on the same
seeded episodes. Writes ``results.json``, ``results.md``, ``learning_curves.png`` and
``accuracy.png`` into ``--out`` and prints one JSON line per result row.

    python benchmarks/accuracy.py --preset omniglot-conv4 --out runs/bench-omniglot
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from metatransfer.config import apply_override, load_config
from metatransfer.devices import resolve_device
from metatransfer.phases.meta_test import meta_test, results_table
from metatransfer.phases.meta_train import meta_train
from metatransfer.phases.pretrain import pretrain
from metatransfer.report import render
from metatransfer.runs import RunDir, seed_everything

VARIANTS = {
    "mtl+ht": {"model.ss_scope": "all", "meta.ht": "resample"},
    "mtl": {"model.ss_scope": "all", "meta.ht": "off"},
    "mtl-last+ht": {"model.ss_scope": "last", "meta.ht": "resample"},
    "mtl-last": {"model.ss_scope": "last", "meta.ht": "off"},
    "mtl+ht-reuse": {"model.ss_scope": "all", "meta.ht": "reuse"},
}
BASELINES = ["protonet", "ft"]


def with_overrides(cfg, items: dict):
    for key, value in items.items():
        cfg = apply_override(cfg, f"{key}={value}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated MTL variants (of {', '.join(VARIANTS)})")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="comma-separated baseline methods (protonet, ft, ft-all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    out = Path(args.out)
    cfg = load_config(args.preset, overrides=args.overrides)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}
    rows: list[dict] = []

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    base = dataclasses.replace(cfg, out=str(out / "pretrain"))
    pre_run = RunDir(base.out)
    pre_run.write_config(base, device)
    pretrained = timed("pretrain", lambda: pretrain(base, pre_run, device))

    baselines = [m for m in args.baselines.split(",") if m]
    if baselines:
        test_cfg = with_overrides(base, {"eval.methods": f"[{','.join(baselines)}]"})
        res = timed("test baselines",
                    lambda: meta_test(test_cfg, pre_run, device, None, pretrained))
        rows += res["results"]
    for name in [v for v in args.variants.split(",") if v]:
        variant = with_overrides(dataclasses.replace(cfg, out=str(out / name)), VARIANTS[name])
        run = RunDir(variant.out)
        run.write_config(variant, device)
        seed_everything(cfg.seed)
        meta = timed(f"meta-train {name}", lambda v=variant, r=run: meta_train(v, r, device,
                                                                                pretrained))
        test_cfg = with_overrides(variant, {"eval.methods": "[mtl]"})
        res = timed(f"test {name}",
                    lambda t=test_cfg, r=run, m=meta: meta_test(t, r, device, m, None))
        rows += [{**row, "method": name} for row in res["results"]]

    results = {
        "preset": args.preset, "dataset": cfg.data.name, "split": res["split"],
        "backbone": cfg.model.backbone, "seed": cfg.seed, "eval_seed": cfg.eval.seed,
        "overrides": args.overrides, "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "seconds": timings, "training_seconds": round(
            sum(v for k, v in timings.items() if not k.startswith("test")), 1),
        "variants": {name: VARIANTS[name] for name in args.variants.split(",") if name},
        "results": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = results_table(results)
    command = " ".join(["python", "benchmarks/accuracy.py", *(argv or sys.argv[1:])])
    (out / "results.md").write_text(
        f"# {args.preset}: {cfg.data.name} ({results['split']} split)\n\n"
        f"`{command}`\n\nMachine: {results['machine']}; training time "
        f"{results['training_seconds']:.0f} s; phase times (s): {json.dumps(timings)}\n\n"
        f"Accuracy (%) ± 95% CI, every method on the same {cfg.eval.episodes} episodes.\n\n"
        f"{table}\n\n![learning curves](learning_curves.png)\n\n![accuracy](accuracy.png)\n")
    render(out)
    for row in rows:
        print(json.dumps({"preset": args.preset, **row}))
    print(table, file=sys.stderr)


if __name__ == "__main__":
    main()
