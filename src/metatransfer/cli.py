"""The ``mtl`` command: parse, load the config, call a phase. Nothing else lives here.

Every command is registered the same way: its parser is built in :func:`build_parser`
and it runs a ``cmd_*`` function of this module, which imports what the command needs
only when it runs (torch is slow to import: ``mtl --help`` must stay fast). User errors
(:class:`MTLError`) are caught once, here, and printed as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .config import CONFIG_NAME, RunConfig, load_config, preset_description, preset_names
from .errors import ConfigError, MTLError
from .methods.registry import EMBED_ONCE_METHODS
from .serve import DEFAULT_MAX_UPLOAD_MB

log = logging.getLogger("metatransfer")
_current_run: list[str] = []  # the run directory in use, for the interrupt message
# process-wide settings a command changes (subnormal flushing), undone when it ends
_command_settings = contextlib.ExitStack()
DEFAULT_PRESET = "glyphs-conv4"  # what a command without --preset or --config runs


# ----------------------------------------------------------------------------- options


def add_config_options(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    parser.add_argument("--preset", help="a preset name (see `mtl presets`)")
    parser.add_argument("--config", help="a YAML config file (applied after the preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a field, e.g. meta.inner_steps=50")
    if not resume:  # meta-test: evaluations go to a new folder and resume nothing
        parser.add_argument("--out", help="a new output directory (default: "
                            "CHECKPOINT/eval-<time> for a run directory, else "
                            "runs/<dataset>-<backbone>-eval-<time>)")
        parser.set_defaults(resume=None)
    else:
        parser.add_argument("--out",
                            help="run directory (default: runs/<dataset>-<backbone>-<time>)")
        parser.add_argument("--resume", metavar="RUN_DIR",
                            help="continue the run in RUN_DIR with its saved config")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_run_config(args: argparse.Namespace) -> RunConfig:
    """Config from --resume (the run's own config.yaml) or preset/file/overrides."""
    if args.resume:
        saved = Path(args.resume) / CONFIG_NAME
        if not saved.is_file():
            raise ConfigError(f"{args.resume} is not a run directory (no config.yaml)")
        cfg = load_config(file=saved, overrides=args.overrides)
        cfg.out = str(args.resume)
        return with_class_split(cfg)
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    # no preset and no file: the built-in demo's tuned preset (the dataclass defaults are
    # the paper's settings, which need far longer training than a demo has)
    preset = args.preset or (None if args.config else DEFAULT_PRESET)
    cfg = load_config(preset, args.config, overrides)
    if not cfg.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.out = f"runs/{cfg.data.name}-{cfg.model.backbone}-{stamp}"
    elif not args.resume and (Path(cfg.out) / "state").is_dir() and any(
            (Path(cfg.out) / "state").glob("*.pt")) and args.command in ("run", "pretrain",
                                                                          "meta-train"):
        raise ConfigError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out} "
                          "or choose another --out")
    return with_class_split(cfg)


def with_class_split(cfg: RunConfig) -> RunConfig:
    """A flat folder's classes split once, here, into the config the run saves (see
    :func:`metatransfer.data.folder.frozen_class_split`): its resume and meta-test then
    read the same classes. Anything else is returned as it is."""
    if cfg.data.name != "folder" or cfg.data.class_split:
        return cfg
    import dataclasses

    from .data.folder import describe_class_split, frozen_class_split

    data = frozen_class_split(cfg.data)
    if data.class_split:
        log.info("%s: %s; the run's config.yaml keeps them (data.class_split)", data.root,
                 describe_class_split(data))
    return dataclasses.replace(cfg, data=data)


def start(cfg: RunConfig, evaluated: Path | None = None):
    """Join torchrun's process group if launched by it, seed, pick the device, open the
    run directory (written by rank 0 only) and record the config. ``evaluated``: the
    checkpoint a meta-test evaluates, whose network and input size ``amp=auto`` probes."""
    import torch

    from . import distributed
    from .devices import subnormals_flushed
    from .runs import RunDir, seed_everything

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    _command_settings.enter_context(subnormals_flushed())
    device = distributed.init_from_env(cfg.device)
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1:
        _quiet_other_ranks(rank)
        cfg.out = distributed.broadcast_object(cfg.out)  # rank 0's time-stamped default
    from .amp_choice import resolve_checkpoint_amp, resolve_run_amp

    def resolve():
        if evaluated is not None:
            return resolve_checkpoint_amp(cfg, device, evaluated)
        return resolve_run_amp(cfg, device)

    # rank 0 probes (when amp=auto needs it) and every rank takes its answer
    choice = distributed.broadcast_object(resolve() if rank == 0 else None)
    cfg.amp = choice.amp
    seed_everything(cfg.seed)
    run = RunDir(cfg.out, is_main=rank == 0)
    _current_run.append(str(run.path))
    run.write_config(cfg, device, world_size=world, amp_reason=choice.reason)
    log.info("run directory %s, device %s%s", run.path, device,
             f", {world} processes (torchrun)" if world > 1 else "")
    log.info("precision %s", choice.reason)
    return run, device


def check_data(cfg: RunConfig, phases: tuple[str, ...], checkpoint: Path | None = None) -> None:
    """Before :func:`start` writes anything: the data of ``phases`` loads and fits their
    episodes (:func:`metatransfer.runs.preflight`), so bad inputs leave no run directory."""
    from . import distributed
    from .runs import preflight

    distributed.init_from_env(cfg.device)  # under torchrun: one process per node decodes
    with distributed.local_main_first():
        preflight(cfg, phases, checkpoint)


def _quiet_other_ranks(rank: int) -> None:
    """Only rank 0 logs progress; the others log warnings and errors, tagged with their rank."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    if rank != 0:
        logging.getLogger("metatransfer").setLevel(max(log.getEffectiveLevel(), logging.WARNING))


def say(text: str) -> None:
    """Print to stdout from rank 0 only."""
    from .distributed import is_main

    if is_main():
        print(text)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``adapt`` and ``serve``."""
    p.add_argument("--checkpoint", required=True,
                   help="run directory (meta_best, else pretrain_best) or .safetensors file")
    p.add_argument("--method", choices=EMBED_ONCE_METHODS,
                   help="mtl (SS + inner loop from theta_0), ft or protonet on pre-trained "
                        "features (default: mtl when the checkpoint is meta-trained)")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--inner-steps", type=int, help="base-learner steps (default: checkpoint's)")
    p.add_argument("--inner-lr", type=float, help="base-learner lr (default: checkpoint's)")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 backbone: auto = where the device has bf16 natively "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads; 0 = torch's default (default: %(default)s)")


# ----------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> None:
    from . import distributed
    from .phases.meta_test import meta_test
    from .phases.meta_train import meta_train
    from .phases.pretrain import pretrain
    from .results import write_timing
    from .runs import preflight

    cfg = resolve_run_config(args)
    distributed.init_from_env(cfg.device)  # under torchrun: one process per node decodes
    with distributed.local_main_first():
        preflight(cfg)  # bad ways/shots fail now, not after hours of pre-training
    run, device = start(cfg)
    started = time.perf_counter()
    show = not args.quiet
    pretrained = pretrain(cfg, run, device, show)
    meta = meta_train(cfg, run, device, pretrained, show)
    results = meta_test(cfg, run, device, meta, pretrained, show)
    results["run_seconds"] = round(time.perf_counter() - started, 1)
    if run.is_main:  # meta-test wrote timing.json before the run's total was known
        write_timing(run.path, results)
    print_results(run, results, f" ({results['run_seconds']:.0f} s)")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .phases.pretrain import pretrain

    cfg = resolve_run_config(args)
    check_data(cfg, ("pretrain",))
    run, device = start(cfg)
    path = pretrain(cfg, run, device, not args.quiet)
    say(f"pre-trained model: {path}")
    run.close()


def cmd_meta_train(args: argparse.Namespace) -> None:
    from .checkpoints import PRETRAIN_NAME, resolve_checkpoint
    from .phases.meta_train import meta_train

    cfg = resolve_run_config(args)
    pretrained = Path(args.pretrained) if args.pretrained else Path(cfg.out) / PRETRAIN_NAME
    if not pretrained.exists():
        raise MTLError(f"pre-trained checkpoint {pretrained} not found; run `mtl pretrain` "
                       "first or pass --pretrained FILE")

    pretrained = resolve_checkpoint(pretrained)
    check_data(cfg, ("meta",), pretrained)
    run, device = start(cfg)
    path = meta_train(cfg, run, device, pretrained, not args.quiet)
    say(f"meta-trained model: {path}")
    run.close()


def cmd_meta_test(args: argparse.Namespace) -> None:
    """Evaluate into a new directory: the evaluated run's files are never rewritten."""
    from .loader import find_checkpoints

    source = Path(args.checkpoint)
    paths = find_checkpoints(source, args.pretrained)  # validated before anything is made
    if args.methods:
        args.overrides.append(f"eval.methods=[{args.methods}]")
    if args.episodes:
        args.overrides.append(f"eval.episodes={args.episodes}")
    if source.is_dir() and (source / CONFIG_NAME).is_file() \
            and not (args.preset or args.config):
        args.config = str(source / CONFIG_NAME)
    explicit = args.out or any(o.strip().startswith("out=") for o in args.overrides)
    cfg = resolve_run_config(args)
    cfg = _methods_it_supports(cfg, paths, explicit_methods=bool(args.methods) or any(
        o.strip().startswith("eval.methods") for o in args.overrides))
    from .phases.meta_test import meta_test
    from .results import RESULTS_JSON

    if explicit:
        out = Path(cfg.out)
        for name in (RESULTS_JSON, CONFIG_NAME):
            if (out / name).exists():
                raise ConfigError(f"{out} already holds {name} (a run or an earlier "
                                  "evaluation); choose another --out")
    else:
        cfg.out = str(eval_dir(source, cfg))
    first = paths.meta if paths.meta and "mtl" in cfg.eval.methods else paths.pretrained
    check_data(cfg, ("test",), first or paths.meta)
    fresh = not Path(cfg.out).exists()
    try:
        run, device = start(cfg, evaluated=first or paths.meta)
        results = meta_test(cfg, run, device, paths.meta, paths.pretrained, not args.quiet)
    except BaseException:
        from .distributed import is_main

        if fresh and is_main() and Path(cfg.out).is_dir():  # leave no stray folder
            import shutil

            shutil.rmtree(cfg.out, ignore_errors=True)
        _current_run.clear()  # an evaluation is rerun, not resumed
        raise
    print_results(run, results)


def _methods_it_supports(cfg: RunConfig, paths, explicit_methods: bool) -> RunConfig:
    """Methods a preset or config names but the checkpoint cannot run (``mtl`` of an
    imported pre-trained network) are left out, with a line saying so; methods asked for
    with --method or eval.methods are run, or refused, as asked."""
    import dataclasses

    from .loader import available_methods

    if explicit_methods:
        return cfg
    usable = set(available_methods(paths)) | {"ft-all"}
    kept = [m for m in cfg.eval.methods if m in usable]
    dropped = [m for m in cfg.eval.methods if m not in usable]
    if dropped and kept:
        log.info("evaluating %s: %s cannot run on this checkpoint (it has no meta-trained "
                 "network)", ", ".join(kept), ", ".join(dropped))
        return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, methods=kept))
    return cfg


def print_results(run, results: dict, suffix: str = "") -> None:
    """The accuracy table, the paired differences and where the results are; closes the run."""
    from .results import printout

    say(printout(results, run.path, suffix))
    run.close()


def eval_dir(source: Path, cfg: RunConfig) -> Path:
    """Where ``mtl meta-test`` writes by default: ``RUN_DIR/eval-<time>`` for a run
    directory, else ``runs/<dataset>-<backbone>-eval-<time>``; never an existing folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if source.is_dir():
        base = source / f"eval-{stamp}"
    else:
        base = Path("runs") / f"{cfg.data.name}-{cfg.model.backbone}-eval-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def cmd_adapt(args: argparse.Namespace) -> None:
    from .adapt import cmd_adapt as adapt

    adapt(args)


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import cmd_serve as serve

    serve(args)


def cmd_export(args: argparse.Namespace) -> None:
    from .export import cmd_export as export

    export(args)


def cmd_report(args: argparse.Namespace) -> None:
    import json

    from .report import render, selection_notes
    from .results import RESULTS_JSON

    print("\n".join(str(p) for p in render(args.run_dir)))
    results = Path(args.run_dir) / RESULTS_JSON
    if results.is_file():
        for note in selection_notes(json.loads(results.read_text())):
            print(note)


def cmd_presets(args: argparse.Namespace) -> None:
    for name in preset_names():
        print(f"{name:24s} {preset_description(name)}")


def cmd_config_keys(args: argparse.Namespace) -> None:
    from .config import config_keys

    rows = config_keys()
    width = max(len(key) for key, *_ in rows)
    for key, kind, default, text in rows:
        print(f"{key:{width}s}  {kind} = {default}" + (f"  # {text}" if text else ""))


def cmd_config_show(args: argparse.Namespace) -> None:
    import yaml

    from .config import to_dict

    # the config a training command would run: without --preset or --config, the demo's
    preset = args.preset or (None if args.config else DEFAULT_PRESET)
    cfg = load_config(preset, args.config, args.overrides)
    if preset == DEFAULT_PRESET and not args.preset:
        print(f"(preset {DEFAULT_PRESET}: what commands run without --preset or --config)",
              file=sys.stderr)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def cmd_data_list(args: argparse.Namespace) -> None:
    from .data.registry import dataset_layouts

    for name, layout in dataset_layouts().items():
        print(f"{name:16s} {layout}")


def cmd_data_verify(args: argparse.Namespace) -> None:
    import dataclasses

    from .config import merge
    from .data.verify import episode_needs, verify_dataset
    from .runs import run_data_config

    cfg = load_config(args.preset, args.config, args.overrides)
    data = merge(cfg.data, {"name": args.name, **({"root": args.root} if args.root else {})})
    cfg = dataclasses.replace(cfg, data=data)
    report, ok = verify_dataset(run_data_config(cfg),  # decoded (and cached) as a run would
                                args.splits.split(",") if args.splits else None,
                                progress=lambda text: print(text, file=sys.stderr, flush=True),
                                needs=episode_needs(cfg))
    print(report)
    if not ok:
        sys.exit(1)


def cmd_import(args: argparse.Namespace) -> None:
    from . import importers_timm
    from .importers import IMPORT_FORMATS, main_import

    if args.list:
        for name, fmt in IMPORT_FORMATS.items():
            print(f"{name:18s} {fmt.description} -> {fmt.backbone}")
        for name, text in importers_timm.formats().items():
            print(f"{name:18s} {text} -> timm")
        return
    if args.format in importers_timm.formats():  # ImageNet networks: PATH is optional
        if not args.out:
            raise ConfigError(f"usage: mtl import {args.format} "
                              + ("NAME --weights FILE" if args.format == "timm" else
                                 "[--weights FILE]") + " --out FILE")
        if len(args.path) > 1:
            raise ConfigError(f"mtl import {args.format} takes one "
                              + ("architecture name" if args.format == "timm" else "file"))
        print(importers_timm.main_import(args.format, args.path[0] if args.path else None,
                                         args.weights, args.out, args.image_size))
        return
    if not (args.format and args.path and args.out):
        raise ConfigError("usage: mtl import FORMAT PATH --out FILE (`mtl import --list` "
                          "shows the formats)")
    print(main_import(args.format, args.path, args.out, args.dataset, args.image_size))


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtl", description="Meta-Transfer Learning for few-shot image classification.")
    parser.add_argument("--version", action="version", version=f"metatransfer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="pre-train, meta-train and meta-test in one go")
    add_config_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pretrain", help="phase 1: pre-train the backbone on the base classes")
    add_config_options(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("meta-train", help="phase 2: meta-transfer learning (SS + theta_0, HT)")
    add_config_options(p)
    p.add_argument("--pretrained", help="pre-trained checkpoint (default: OUT/pretrain_best)")
    p.set_defaults(func=cmd_meta_train)

    p = sub.add_parser("meta-test", help="phase 3: evaluate methods on seeded episodes")
    add_config_options(p, resume=False)
    p.add_argument("--checkpoint", required=True,
                   help="run directory or meta-trained checkpoint file")
    p.add_argument("--pretrained", help="pre-trained checkpoint for the ft/protonet baselines")
    p.add_argument("--method", dest="methods", help="comma-separated methods, e.g. mtl,ft")
    p.add_argument("--episodes", type=int, help="episodes per setting (default 600)")
    p.set_defaults(func=cmd_meta_test)

    p = sub.add_parser("presets", help="list the YAML presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="the config keys (--set KEY=VALUE) and resolved configs")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    k = config_sub.add_parser("keys", help="every --set key with its type, default and meaning")
    k.set_defaults(func=cmd_config_keys)
    s = config_sub.add_parser("show", help="print the config a preset/file/--set resolve to "
                              f"(without --preset or --config: {DEFAULT_PRESET}, as run uses)")
    s.add_argument("--preset", help="a preset name (see `mtl presets`)")
    s.add_argument("--config", help="a YAML config file (applied after the preset)")
    s.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a field, e.g. meta.inner_steps=50")
    s.set_defaults(func=cmd_config_show)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    data_sub.add_parser("list", help="the dataset names (data.name) and their layout on disk") \
        .set_defaults(func=cmd_data_list)
    v = data_sub.add_parser("verify", help="check a dataset on disk and summarise it")
    v.add_argument("name", help="dataset name, e.g. miniimagenet")
    v.add_argument("--root", help="dataset root folder")
    v.add_argument("--splits", help="comma-separated splits (default: all the format has)")
    v.add_argument("--preset", help="check against this preset's episodes (ways, shots, "
                   "queries), class split and preprocessing (see `mtl presets`)")
    v.add_argument("--config", help="a YAML config file to check against (after the preset)")
    v.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="data options, e.g. data.image_size=80")
    v.set_defaults(func=cmd_data_verify)

    p = sub.add_parser("import", help="convert published weights to a metatransfer checkpoint")
    p.add_argument("format", nargs="?", help="a format from --list: authors-pretrain, "
                   "authors-meta, authors-tf, feat, rfs, efficientnet-lite0 (-lite1, "
                   "-lite2) or timm")
    p.add_argument("path", nargs="*", help="the file to convert (authors-tf: the folder of "
                   "one setting, or its weights.npy, ss_weights.npy, fc_weights.npy; "
                   "timm: the architecture's name; efficientnet-liteN: none, the installed "
                   "weights package's file)")
    p.add_argument("--weights", help="efficientnet-liteN: a weights file in the package's "
                   "layout instead of the installed one; timm: the state-dict file")
    p.add_argument("--dataset", help="what the source was trained on, when it decides the "
                   "preprocessing: miniimagenet | tieredimagenet | cifarfs | fc100 (rfs: "
                   "read from the checkpoint's options)")
    p.add_argument("--image-size", type=int, help="the source's input size, when it was "
                   "trained at another than its code's default (ImageNet networks: the "
                   "size to run them at, e.g. 128 on a CPU)")
    p.add_argument("--out", help="output checkpoint (.safetensors); required")
    p.add_argument("--list", action="store_true", help="list the formats and exit")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "adapt", help="classify your own images from a few examples per class",
        description="Fit a few-shot classifier on SUPPORT (one sub-folder of images per "
                    "class) and print the predicted class of each query image.")
    add_model_options(p)
    p.add_argument("--support", required=True, metavar="DIR",
                   help="folder with one sub-folder of images per class (>= 2 classes)")
    p.add_argument("--query", required=True, nargs="+", metavar="PATH",
                   help="query image files or folders of images")
    p.add_argument("--top", type=int, default=1, metavar="K",
                   help="show the K best classes (default: %(default)s)")
    p.add_argument("--output", metavar="FILE", help="write predictions to FILE (.csv or .json)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser(
        "serve", help="a local web page: drop images per class, classify new ones",
        description="Start a local web page for few-shot classification with a checkpoint.")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000,
                   help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="N",
                   help=f"refuse requests larger than N MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "export", help="write the network, or a classifier fitted on your images, as ONNX",
        description="Write an ONNX model and, beside it, the JSON of its preprocessing "
                    "(examples/onnx_predict.py applies it). Without --support: the embedding "
                    "network, SS folded into its weights. With --support: a fixed-class "
                    "classifier, the class names in the model's metadata.")
    p.add_argument("--checkpoint", required=True,
                   help="run directory (meta_best, else pretrain_best) or .safetensors file")
    p.add_argument("--support", metavar="DIR",
                   help="one sub-folder of images per class (>= 2 classes): export the "
                        "network with the head `mtl adapt` fits on them")
    p.add_argument("--method", choices=EMBED_ONCE_METHODS,
                   help="the head to fit (default: the checkpoint's, as for `mtl adapt`)")
    p.add_argument("--out", required=True, metavar="MODEL.onnx",
                   help="the ONNX file to write (the preprocessing goes to MODEL.json)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="plot learning curves and accuracy of a run")
    p.add_argument("run_dir", help="a run directory or benchmark folder")
    p.set_defaults(func=cmd_report)
    return parser


def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: save and stop
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with _command_settings:
            args.func(args)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except BrokenPipeError:
        _quiet_closed_stdout()  # e.g. `mtl presets | head -1`: the reader had enough
        sys.exit(141)  # as if killed by SIGPIPE, like other command-line tools
    except MTLError as exc:
        print(f"error: {_rank_tag()}{exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        hint = f"; continue with --resume {_current_run[-1]}" if _current_run else ""
        print(f"{_rank_tag()}interrupted{hint}", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as exc:
        from . import distributed

        if not distributed.is_peer_failure(exc):
            raise
        # another rank died and printed its own error; this one just stops
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {_rank_tag()}stopped because another process failed ({first})",
              file=sys.stderr)
        sys.exit(3)
    if "metatransfer.distributed" in sys.modules:  # only commands that use torch load it
        sys.modules["metatransfer.distributed"].shutdown()


def _quiet_closed_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of the output left
    in its buffer does not raise BrokenPipeError again at exit."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced, e.g. under a test
        pass


def _rank_tag() -> str:
    if "metatransfer.distributed" not in sys.modules:  # no torch command ran
        return ""
    from . import distributed

    return f"[rank {distributed.rank()}] " if distributed.is_distributed() else ""
