"""Side by side with the authors' code: seconds per pre-training step, meta-training step
and meta-test episode of the MTL authors' unmodified PyTorch code (Sun et al., CVPR 2019,
github.com/yaoyao-liu/meta-transfer-learning) and of ours, on the same machine, one after
the other, with the same backbone (their ResNet-25 ``ResNetMtl`` at 80x80), batch, episode
(5-way 1-shot 15 queries), inner steps (their ``update_step``: 100), precision and threads.
So a speed claim against the paper's code is measured, not asserted.

    python benchmarks/vs_authors.py --authors /tmp/authors --threads 2
    python benchmarks/vs_authors.py --authors /tmp/authors --data ../shared/data/miniimagenet
    python benchmarks/vs_authors.py --authors /tmp/authors --quick       # smoke test, seconds

``--authors`` is a checkout holding their ``pytorch/`` (``git clone
https://github.com/yaoyao-liu/meta-transfer-learning``); nothing is fetched at run time and
none of their files is changed or copied: their model classes are imported from the
checkout, given an argparse-like ``args``, and run as their trainers run them (their
model files call no ``.cuda()``; should a call be met on CPU it returns its object, counted
in the output). Their code has no mixed precision of its own: ``--amp bf16`` wraps it in
``torch.autocast``. Their data loading (PIL in DataLoader workers) is not timed, nor
ours: both get the same ready batch. Where their settings and ours differ, the
``setup`` record lists it.

One JSON line per (phase, implementation) and one with the ratio authors/ours per phase
on stdout; a table on stderr. Images: random unless ``--data`` (speed does not depend on
the pixel values).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timing import emit, machine, synthetic_split, timed
from torch import nn

from metatransfer.config import DataConfig, RunConfig
from metatransfer.data import load_split
from metatransfer.data.base import ImageSplit
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.devices import precision, subnormals_flushed
from metatransfer.embedding import Embedder
from metatransfer.errors import MTLError
from metatransfer.evaluation import evaluate, per_episode_accuracy
from metatransfer.methods.mtl import MTL
from metatransfer.models import create_backbone, place_backbone
from metatransfer.phases.common import Float32, autocast, make_normalizer, use_amp
from metatransfer.phases.meta_train import MetaLearner, meta_step
from metatransfer.phases.pretrain import parameter_groups

REPO = "https://github.com/yaoyao-liu/meta-transfer-learning"
SIZE = 80  # their ResNetMtl ends in AvgPool2d(10): 80x80 inputs only
PRE_CLASSES = 64  # their pre-training head: miniImageNet's 64 base classes
# their main.py defaults (meta_lr1/2, pre_*) and run_meta.py's (update_step=100)
THEIR_ARGS = dict(meta_lr1=1e-4, meta_lr2=1e-3, pre_lr=0.1, pre_custom_momentum=0.9,
                  pre_custom_weight_decay=5e-4, model_type="ResNet", dataset="MiniImageNet")
PHASES = {"pretrain": "pre-train step", "meta_train": "meta-train step",
          "meta_test": "meta-test episode"}


# ----------------------------------------------------------------------------- their code


def authors_root(path: str | None) -> Path | None:
    """The checkout's ``pytorch/`` folder, or None after printing what to do (one line)."""
    get = f"get it with: git clone {REPO} PATH"
    if not path:
        print(f"vs_authors: give --authors PATH, a checkout of the authors' code holding "
              f"pytorch/ ({get})", file=sys.stderr)
        return None
    root = Path(path).expanduser()
    for pytorch in (root / "pytorch", root):  # the checkout, or its pytorch/ itself
        if (pytorch / "models" / "mtl.py").is_file():
            return pytorch.resolve()
    why = "does not exist" if not root.exists() else "has no pytorch/models/mtl.py"
    print(f"vs_authors: --authors {root} {why}; it must be a checkout of the authors' code "
          f"holding pytorch/ ({get})", file=sys.stderr)
    return None


def import_authors(pytorch: Path):
    """Their ``models.mtl`` and ``models.resnet_mtl`` modules, imported from the checkout
    (their files import each other as top-level ``models.*``)."""
    sys.path.insert(0, str(pytorch))
    loaded = sys.modules.get("models")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(pytorch)):
        raise MTLError(f"another top-level 'models' package ({loaded.__file__}) is imported; "
                       f"run this script in a fresh process")
    import models.mtl as mtl
    import models.resnet_mtl as resnet_mtl
    return mtl, resnet_mtl


def checkout_commit(pytorch: Path) -> str | None:
    """The checkout's git commit, when it is a git clone (not, say, a ``git archive``)."""
    if not (pytorch.parent / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(pytorch.parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


CUDA_CALLS = [0]  # .cuda() calls turned into no-ops on CPU


@contextlib.contextmanager
def cuda_calls_stay(device: torch.device) -> Iterator[None]:
    """On a CPU run, ``Tensor.cuda`` / ``Module.cuda`` return their object unchanged (and
    are counted), so code that hard-codes ``.cuda()`` runs here as it is."""
    if device.type != "cpu":
        yield
        return
    originals = torch.Tensor.cuda, nn.Module.cuda

    def stay(self, *args, **kwargs):
        CUDA_CALLS[0] += 1
        return self

    torch.Tensor.cuda, nn.Module.cuda = stay, stay
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = originals


def their_args(a: argparse.Namespace) -> argparse.Namespace:
    """The fields of their main.py's ``args`` that their classes and trainers read."""
    return argparse.Namespace(way=a.ways, shot=a.shots, train_query=a.queries,
                              val_query=a.queries, base_lr=a.inner_lr,
                              update_step=a.inner_steps, pre_batch_size=a.batch, **THEIR_ARGS)


def their_learner(ctx: Context, mode: str, **kwargs) -> nn.Module:
    """Their ``MtlLearner``; with ``--blocks`` other than their 4 (``--quick``), its encoder
    is their ``ResNetMtl(layers=[b, b, b])`` instead."""
    torch.manual_seed(0)
    model = ctx.mtl.MtlLearner(ctx.their_args, mode=mode, **kwargs)
    if ctx.args.blocks != 4:
        model.encoder = ctx.resnet_mtl.ResNetMtl(layers=[ctx.args.blocks] * 3,
                                                 mtl=mode == "meta")
    return model.to(ctx.device)  # their trainers: self.model.cuda()


# ----------------------------------------------------------------------------- shared set-up


class Context:
    """Options, device, data, one episode and one pre-training batch, both layouts."""

    def __init__(self, args: argparse.Namespace, pytorch: Path, split: ImageSplit) -> None:
        self.args, self.split = args, split
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                   if args.device == "auto" else args.device)
        with cuda_calls_stay(self.device):
            self.mtl, self.resnet_mtl = import_authors(pytorch)
        self.their_args = their_args(args)
        self.cfg = our_config(args)
        self.amp = use_amp(self.cfg, self.device)
        self.normalizer = make_normalizer(self.cfg, split, self.device)  # ours: NHWC
        self.sampler = EpisodeSampler(split.indices_by_class, args.ways, args.shots,
                                      args.queries, seed=0, name=split.name)
        episode = self.sampler.episode(0)  # both implementations get this episode
        a = args
        # their CategoriesSampler layout: class-interleaved (labels arange(way).repeat(n))
        self.shot_x = self.images(episode.support.reshape(a.ways, a.shots).T.ravel())
        self.query_x = self.images(episode.query.reshape(a.ways, a.queries).T.ravel())
        self.shot_y = torch.arange(a.ways, device=self.device).repeat(a.shots)
        self.query_y = torch.arange(a.ways, device=self.device).repeat(a.queries)
        rng = np.random.default_rng(0)
        idx = rng.choice(len(split), a.batch, replace=len(split) < a.batch)
        self.pre_x = self.images(idx)
        self.pre_y = torch.as_tensor(split.labels[idx] % PRE_CLASSES, device=self.device)

    def images(self, indices: np.ndarray) -> torch.Tensor:
        """Normalised NCHW float images, as their DataLoader hands them over."""
        return self.normalizer(torch.from_numpy(self.split.images[indices]).to(self.device)
                               .permute(0, 3, 1, 2)).contiguous()

    def ours(self, x: torch.Tensor) -> torch.Tensor:
        """The same images in our memory format."""
        return x.contiguous(memory_format=self.normalizer.memory_format)

    def their_amp(self):
        """Their code has no autocast of its own: bf16 wraps it from outside."""
        return (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp
                else contextlib.nullcontext())

    def flushed(self, impl: str):
        """Subnormals flushed to zero: ours as its runs do (``--ftz as-run``), theirs not
        (their code leaves IEEE arithmetic on), or both / neither."""
        on = {"as-run": impl == "ours", "both": True, "neither": False}[self.args.ftz]
        return subnormals_flushed() if on else contextlib.nullcontext(False)

    def measure(self, step: Callable[[int], object], impl: str) -> float:
        guard = cuda_calls_stay(self.device) if impl == "authors" else contextlib.nullcontext()
        with guard, self.flushed(impl):
            return timed(step, self.args.iters, self.args.warmup, self.device)[0]


def our_config(a: argparse.Namespace) -> RunConfig:
    """Our defaults, with their episode, inner loop and, for one task per step, no HT."""
    cfg = RunConfig()
    cfg.amp = a.amp
    cfg.model.backbone, cfg.model.backbone_args = "resnet25", {"blocks": a.blocks}
    mc = cfg.meta
    mc.ways, mc.shots, mc.queries = a.ways, a.shots, a.queries
    mc.inner_steps, mc.inner_lr, mc.first_order = a.inner_steps, a.inner_lr, a.order == "first"
    mc.meta_batch, mc.ht, mc.bn_mode = 1, "off", a.bn_mode
    return cfg


def our_backbone(ctx: Context) -> nn.Module:
    torch.manual_seed(0)
    model = create_backbone("resnet25", in_channels=3, **ctx.cfg.model.backbone_args)
    return place_backbone(model, ctx.device, ctx.cfg.channels_last)


# ----------------------------------------------------------------------------- phases


def authors_pretrain(ctx: Context) -> float:
    """One step of their ``PreTrainer.train`` loop body: forward, loss, backward, SGD."""
    a, x, y = ctx.their_args, ctx.pre_x, ctx.pre_y
    model = their_learner(ctx, "pre", num_cls=PRE_CLASSES)
    model.train()
    model.mode = "pre"
    opt = torch.optim.SGD([{"params": model.encoder.parameters(), "lr": a.pre_lr},
                           {"params": model.pre_fc.parameters(), "lr": a.pre_lr}],
                          momentum=a.pre_custom_momentum, nesterov=True,
                          weight_decay=a.pre_custom_weight_decay)

    def step(_: int) -> None:
        with ctx.their_amp():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return ctx.measure(step, "authors")


def ours_pretrain(ctx: Context) -> float:
    """The same step of ``phases.pretrain`` (its network, head, optimiser and autocast)."""
    backbone = our_backbone(ctx)
    head = nn.Linear(backbone.out_dim, PRE_CLASSES).to(ctx.device)
    net = nn.Sequential(backbone, Float32(head))
    pc = ctx.cfg.pretrain
    opt = torch.optim.SGD(parameter_groups(backbone, head, ctx.cfg), lr=pc.lr,
                          momentum=pc.momentum, nesterov=pc.nesterov,
                          weight_decay=pc.weight_decay)
    x, y = ctx.ours(ctx.pre_x), ctx.pre_y

    def step(_: int) -> None:
        net.train()
        with autocast(ctx.amp, ctx.device):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return ctx.measure(step, "ours")


def authors_meta_train(ctx: Context) -> float:
    """One task of their ``MetaTrainer.train`` loop body: forward with the inner loop,
    query loss, backward, Adam."""
    a = ctx.their_args
    model = their_learner(ctx, "meta")
    model.train()  # as their meta-train loop: BN with batch statistics
    opt = torch.optim.Adam([
        {"params": filter(lambda p: p.requires_grad, model.encoder.parameters())},
        {"params": model.base_learner.parameters(), "lr": a.meta_lr2}], lr=a.meta_lr1)

    def step(_: int) -> None:
        with ctx.their_amp():
            logits = model((ctx.shot_x, ctx.shot_y, ctx.query_x))
            loss = F.cross_entropy(logits, ctx.query_y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return ctx.measure(step, "authors")


def ours_meta_train(ctx: Context) -> float:
    """One task of ``phases.meta_train``: ``meta_step``, backward, Adam (as ``meta_train``
    builds them)."""
    cfg, mc = ctx.cfg, ctx.cfg.meta
    learner = MetaLearner(our_backbone(ctx), mc.ways, cfg.model.ss_granularity,
                          cfg.model.ss_scope, cfg.model.ss_bn_affine, mc.head_init)
    learner = learner.to(ctx.device)
    groups = [{"params": learner.ss_params, "lr": mc.lr_ss}]
    if mc.head_init == "learned":
        groups.append({"params": [learner.weight0, learner.bias0], "lr": mc.lr_head})
    opt = torch.optim.Adam(groups)
    learner.train(mc.bn_mode == "train")

    def step(_: int) -> None:  # meta-batch 0 is episode 0 of the sampler: their episode
        loss, _ = meta_step(learner, ctx.split, ctx.sampler, 0, cfg, ctx.normalizer,
                            ctx.device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return ctx.measure(step, "ours")


def authors_meta_test(ctx: Context) -> tuple[float, float]:
    """One episode of their ``MetaTrainer.eval`` loop body; then their inner loop alone
    (their ``MtlLearner`` with an identity encoder, on ready embeddings)."""
    model = their_learner(ctx, "meta")
    model.eval()  # their meta-test: eval-mode BN, autograd on (their inner loop needs it)

    def episode(_: int) -> float:
        with ctx.their_amp():
            logits = model((ctx.shot_x, ctx.shot_y, ctx.query_x))
        return (logits.argmax(1) == ctx.query_y).float().mean().item()  # their count_acc

    episode_s = ctx.measure(episode, "authors")
    with torch.no_grad():
        shot, query = model.encoder(ctx.shot_x), model.encoder(ctx.query_x)
    model.encoder = nn.Identity()

    def inner(_: int) -> float:
        with ctx.their_amp():
            return model((shot, ctx.shot_y, query))[0, 0].item()

    return episode_s, ctx.measure(inner, "authors")


def ours_meta_test(ctx: Context) -> tuple[float, float]:
    """One episode of our per-episode evaluation path (embed its support and query
    images, no grad, then the inner loop on features); then the inner loop alone
    (``evaluate`` on an embedding cache)."""
    cfg = ctx.cfg
    learner = MetaLearner(our_backbone(ctx), cfg.meta.ways, cfg.model.ss_granularity,
                          cfg.model.ss_scope, cfg.model.ss_bn_affine).to(ctx.device)
    mtl = MTL((learner.weight0.detach(), learner.bias0.detach()), ctx.args.inner_steps,
              ctx.args.inner_lr)
    embedder = Embedder(learner.backbone, ctx.normalizer, ctx.device, amp=ctx.amp,
                        fold_bn=cfg.fold_bn)
    split, sampler = ctx.split, ctx.sampler
    episode_s = ctx.measure(
        lambda _: per_episode_accuracy(mtl, embedder, split, sampler, 0), "ours")
    gen = torch.Generator().manual_seed(0)  # the inner loop's cost does not depend on values
    cache = {"indices": np.arange(len(split)),
             "feats": torch.randn(len(split), learner.backbone.out_dim,
                                  generator=gen).to(ctx.device)}
    inner_s = ctx.measure(lambda _: evaluate(mtl, embedder, split, sampler, 1, cache=cache),
                          "ours")
    return episode_s, inner_s


# ----------------------------------------------------------------------------- driver


def differences(a: argparse.Namespace) -> list[str]:
    """Where the two sides do not run the same settings (speed-relevant ones first)."""
    notes = [
        "meta-train BN: theirs in train mode (batch statistics; support and query embedded "
        f"in separate calls); ours meta.bn_mode={a.bn_mode}"
        + (" (running statistics, BN folded into the convs, images embedded in chunks)"
           if a.bn_mode == "eval" else ""),
        "meta-train parameters: theirs Adam over the SS weights, the BN affine parameters "
        "and theta_0; ours over the SS weights only (defaults: model.ss_bn_affine=false, "
        "meta.head_init=zero)",
        f"meta-gradient: theirs first order (autograd.grad without create_graph); ours "
        f"{a.order} order" + (" (our runs default to second: meta.first_order=false)"
                              if a.order == "first" else ""),
        "meta-test: theirs with autograd on (its inner loop calls torch.autograd.grad, so "
        "the encoder forward records a graph too); ours under no_grad with BN folded; a "
        "full evaluation of ours embeds each distinct image once for all episodes "
        "(benchmarks/eval_speedup.py), cheaper per episode than the per-episode path here",
        "pre-train head: theirs 640-1000-ReLU-64 MLP; ours linear 640-64 (fp32 under amp)",
        "memory format: theirs NCHW; ours channels_last (channels_last=true)",
        f"subnormals flushed to zero: --ftz {a.ftz} (as-run: ours flushed as its runs are, "
        "theirs IEEE as their code leaves it)",
        "inner loop: theirs autograd.grad per step; ours closed-form gradients in the span "
        "of the support features",
        "HT meta-batch: theirs has none; ours here 1 task per step, ht off (our runs: "
        "meta_batch 2 + 1 hard task)",
        "data: not timed on either side; both get the same normalised images (our "
        "miniImageNet statistics); ours also gathers its episode from uint8 in meta_step",
    ]
    if a.amp == "bf16":
        notes.append("precision: their code has no amp of its own; it runs inside "
                     "torch.autocast(bf16) here, forward and loss")
    if a.blocks != 4:
        notes.append(f"backbone: {a.blocks} block(s) per stage on both sides (theirs: "
                     f"ResNetMtl(layers=[{a.blocks}]*3) as MtlLearner.encoder), not ResNet-25")
    return notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors", help="checkout of the authors' code, the folder holding "
                                     f"pytorch/ (git clone {REPO})")
    p.add_argument("--data", help="miniImageNet root (images/ + CSVs, or class folders): "
                                  "real images, resized to 80x80; default: random images")
    p.add_argument("--split", default="val", help="split of --data to draw from (default: "
                                                  "%(default)s, the smaller one to load)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=2, help="CPU threads, both sides")
    p.add_argument("--amp", choices=["off", "bf16"], default="off")
    p.add_argument("--iters", type=int, default=3, help="timed steps (the fastest is kept)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=0,
                   help="pre-training batch (0: 16 on CPU, their 128 on CUDA)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--inner-steps", type=int, default=100, help="their update_step")
    p.add_argument("--inner-lr", type=float, default=0.01, help="their base_lr")
    p.add_argument("--order", choices=["first", "second"], default="first",
                   help="our meta-gradient (theirs is first order)")
    p.add_argument("--bn-mode", choices=["eval", "train"], default="eval",
                   help="our meta.bn_mode (theirs: train)")
    p.add_argument("--ftz", choices=["as-run", "both", "neither"], default="as-run",
                   help="flush subnormals: as each code runs (ours only), both or neither")
    p.add_argument("--blocks", type=int, default=None,
                   help="residual blocks per stage, both sides (default: their 4; 1 with "
                        "--quick)")
    p.add_argument("--skip", nargs="*", default=[], choices=list(PHASES))
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 block per stage, batch 4, 1 query, 2 inner steps, "
                        "1 warm-up and 1 timed step")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.warmup, args.inner_steps, args.queries = 1, 1, 2, 1
        args.batch = args.batch or 4
        args.blocks = args.blocks or 1
    args.blocks = args.blocks or 4
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (128 if device.startswith("cuda") else 16)
    return args


def load_images(args: argparse.Namespace) -> tuple[ImageSplit, str]:
    if args.data:
        cfg = DataConfig(name="miniimagenet", root=args.data, image_size=SIZE)
        split = load_split(cfg, args.split)
        return split, f"miniimagenet/{args.split} ({len(split)} real images, {SIZE}x{SIZE})"
    per_class = max(40, args.shots + args.queries)
    return (synthetic_split(SIZE, classes=20, per_class=per_class),
            f"random ({SIZE}x{SIZE} uint8 noise; speed does not depend on the pixels)")


def table(results: dict[str, dict[str, float]], inner: dict[str, float] | None) -> str:
    lines = [f"{'':20s}{'authors s':>12s}{'ours s':>12s}{'authors/ours':>14s}"]
    rows = [(PHASES[k], v) for k, v in results.items()]
    if inner:
        rows.append(("  inner loop only", inner))
    for name, r in rows:
        lines.append(f"{name:20s}{r['authors']:12.4f}{r['ours']:12.4f}"
                     f"{r['authors'] / r['ours']:13.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    pytorch = authors_root(args.authors)
    if pytorch is None:
        return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        split, source = load_images(args)
        ctx = Context(args, pytorch, split)
    except MTLError as exc:
        print(f"vs_authors: {exc}", file=sys.stderr)
        return 2
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as both trainers set
    prec = precision(ctx.amp)
    emit({"measure": "machine", "device": str(ctx.device), **machine(), "precision": prec})
    emit({"measure": "setup", "authors": str(pytorch.parent),
          "authors_commit": checkout_commit(pytorch), "images": source,
          "backbone": f"resnet25@{SIZE}" if args.blocks == 4 else
          f"resnet25@{SIZE} ({args.blocks} block(s)/stage)",
          "precision": prec, "threads": torch.get_num_threads(), "batch": args.batch,
          "ways": args.ways, "shots": args.shots, "queries": args.queries,
          "inner_steps": args.inner_steps, "inner_lr": args.inner_lr, "iters": args.iters,
          "warmup": args.warmup, "quick": args.quick, "differences": differences(args)})
    base = {"precision": prec, "device": str(ctx.device), "threads": torch.get_num_threads()}
    results: dict[str, dict[str, float]] = {}
    inner = None
    for phase in PHASES:
        if phase in args.skip:
            continue
        if phase == "pretrain":  # theirs first, then ours, each freed before the next
            results[phase] = {"authors": authors_pretrain(ctx), "ours": ours_pretrain(ctx)}
            extra = {"batch": args.batch}
        elif phase == "meta_train":
            results[phase] = {"authors": authors_meta_train(ctx),
                              "ours": ours_meta_train(ctx)}
            extra = {"images": args.ways * (args.shots + args.queries),
                     "inner_steps": args.inner_steps}
        else:
            (a_ep, a_in), (o_ep, o_in) = authors_meta_test(ctx), ours_meta_test(ctx)
            results[phase], inner = {"authors": a_ep, "ours": o_ep}, {"authors": a_in,
                                                                       "ours": o_in}
            extra = {"images": args.ways * (args.shots + args.queries),
                     "inner_steps": args.inner_steps}
        for impl, seconds in results[phase].items():
            record = {"measure": "vs_authors", "phase": phase, "impl": impl,
                      "step_s": round(seconds, 4), **extra, **base}
            if phase == "pretrain":
                record["images_per_s"] = round(args.batch / seconds, 2)
            if phase == "meta_test":
                record["inner_loop_s"] = round(inner[impl], 4)
            emit(record)
        r = results[phase]
        emit({"measure": "vs_authors_ratio", "phase": phase, "authors_s": round(r["authors"], 4),
              "ours_s": round(r["ours"], 4),
              "authors_over_ours": round(r["authors"] / r["ours"], 3), **base})
    emit({"measure": "total", "seconds": round(time.perf_counter() - start, 1),
          "cuda_calls_kept_on_cpu": CUDA_CALLS[0]})
    if results:
        print(table(results, inner), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
