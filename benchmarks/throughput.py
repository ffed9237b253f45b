"""Throughput of the package's own training and evaluation code paths, per backbone.

For each ``backbone@size`` it measures, on one device: pre-training images/s (the
``phases.pretrain`` loop body), meta-train episodes/s (``phases.meta_train.meta_step`` +
backward + Adam, 5-way, 15 queries, 100 inner steps, first and second order) next to one
SS-backbone forward+backward of the same images, the meta-batch speed-up (k tasks in one
pass vs k separate tasks), meta-test episodes/s (per-episode embedding vs the cached,
batched ``evaluation.evaluate``), the data pipeline alone, peak memory, model FLOPs
(``torch.utils.flop_counter``) and the achieved FLOP rate as a fraction of the dense
matmul rate measured in the same run. One JSON object per measurement on stdout.

    python benchmarks/throughput.py                       # CPU default, <= 10 min
    python benchmarks/throughput.py --quick --backbones conv4@16   # seconds (smoke test)
    python benchmarks/throughput.py --device cuda --backbones resnet12@84 conv4@84 --compile
    python benchmarks/throughput.py --table results.jsonl   # markdown summary

Images are synthetic uint8 (compute does not depend on content), so no dataset is needed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metatransfer.config import RunConfig
from metatransfer.data.base import ImageSplit
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.transforms import Normalizer, augment_batch, augmentation, gather_uint8
from metatransfer.evaluation import Embedder, evaluate, per_episode_accuracy
from metatransfer.learners import adapt, linear_logits
from metatransfer.models import create_backbone
from metatransfer.phases.common import autocast, channels_last, use_amp
from metatransfer.phases.meta_train import MetaLearner, meta_step

log = logging.getLogger("throughput")
DEFAULT_BACKBONES = ["conv4@28", "conv4@84", "resnet12@84", "resnet25@80"]
HEAVY_GFLOP = 1.0  # backbones above this forward cost per image get the CPU-light schedule


# ----------------------------------------------------------------------------- helpers


def emit(record: dict) -> None:
    """One measurement as one JSON line on stdout."""
    print(json.dumps(record, sort_keys=False), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[int], object], iters: int, warmup: int, device: torch.device,
          sync_check: bool = False) -> tuple[float, int]:
    """Fastest seconds per call of ``fn(i)`` after ``warmup`` calls, and host syncs seen.

    The minimum, not the median: on a shared machine other processes only ever add time,
    so the fastest call is the best estimate of what the code costs on a quiet one.

    ``sync_check`` (CUDA) turns on PyTorch's sync debug mode during the timed calls and
    counts its warnings: each is a host<->device synchronisation the loop forces.
    """
    for i in range(warmup):
        fn(i)
    sync(device)
    times, syncs = [], 0
    for i in range(warmup, warmup + iters):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if sync_check:
                torch.cuda.set_sync_debug_mode("warn")
            start = time.perf_counter()
            fn(i)
            sync(device)
            times.append(time.perf_counter() - start)
            if sync_check:
                torch.cuda.set_sync_debug_mode("default")
        syncs += sum("synchroniz" in str(w.message) for w in caught)
    return min(times), syncs


class PeakMemory:
    """Peak memory (MiB) inside a ``with`` block: CUDA allocator peak, or peak RSS on CPU.

    On Linux the RSS high-water mark is reset through ``/proc/self/clear_refs``; where
    that is impossible the process-wide peak is reported (``reset`` false).
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.reset, self.mib = device, False, float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset = True
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset = True
            except OSError:
                self.reset = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.mib = int(line.split()[1]) / 1024
        except OSError:
            import resource

            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions ``fn`` runs (``torch.utils.flop_counter``)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32,
                size: int | None = None, repeats: int = 5) -> float:
    """Best dense ``size x size`` matmul rate over ``repeats`` calls, in GFLOP/s."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def conv_gemm_rate(device: torch.device, size: int | None = None, repeats: int = 5) -> float:
    """The same dense product as :func:`matmul_rate`, run as a 1x1 convolution (GFLOP/s).

    Convolutions go through oneDNN on CPU, ``torch.mm`` through the BLAS; on some CPUs
    (e.g. MKL on AMD) the BLAS path is much slower, so the machine's dense rate is the
    faster of the two.
    """
    n = size or (8192 if device.type == "cuda" else 2048)
    side = max(1, n // 64)
    x = torch.randn(1, n, 64, side, device=device)
    w = torch.randn(n, n, 1, 1, device=device)
    F.conv2d(x, w)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        F.conv2d(x, w)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * n * 64 * side / best / 1e9


def synthetic_split(size: int, channels: int = 3, classes: int = 20, per_class: int = 40,
                    seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(classes * per_class, size, size, channels),
                          dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    return ImageSplit(images, labels, [f"c{i}" for i in range(classes)], f"synthetic{size}",
                      (0.5,) * channels, (0.25,) * channels)


def machine() -> dict:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "mkldnn": torch.backends.mkldnn.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------- benchmark


class Bench:
    """Measurements for one backbone at one image size on one device."""

    def __init__(self, args: argparse.Namespace, name: str, size: int,
                 device: torch.device) -> None:
        self.args, self.name, self.size, self.device = args, name, size, device
        self.cfg = RunConfig()
        self.cfg.model.backbone = name
        self.cfg.model.backbone_args = dict(args.backbone_args)
        self.cfg.compile = args.compile
        self.amp = use_amp(self.cfg, device)
        self.cl = channels_last(self.cfg, device)
        channels = 3
        self.split = synthetic_split(size, channels, per_class=max(40, 16 + 15 + 5))
        self.normalizer = Normalizer(self.split.mean, self.split.std, device)
        self.base = {"backbone": name, "size": size, "device": str(device),
                     "amp": "bf16" if self.amp else "off", "channels_last": self.cl,
                     "compile": args.compile}
        probe = self.new_backbone()
        self.fwd_flops = count_flops(lambda: self._forward(probe, 2)) / 2
        self.heavy = device.type == "cpu" and self.fwd_flops / 1e9 > HEAVY_GFLOP
        mm = matmul_rate(device, size=args.matmul_size)
        conv = conv_gemm_rate(device, size=args.matmul_size)
        self.peak_gflops = max(mm, conv)
        self.peak_bf16 = matmul_rate(device, torch.bfloat16, args.matmul_size) if self.amp else None
        emit({**self.base, "measure": "matmul", "fp32_gflops": round(self.peak_gflops, 1),
              "mm_gflops": round(mm, 1), "conv1x1_gflops": round(conv, 1),
              "bf16_gflops": self.peak_bf16 and round(self.peak_bf16, 1)})

    # -- building blocks

    def new_backbone(self) -> nn.Module:
        torch.manual_seed(0)
        model = create_backbone(self.name, in_channels=3, **self.cfg.model.backbone_args)
        model = model.to(self.device)
        if self.cl:
            model = model.to(memory_format=torch.channels_last)
        return model

    def maybe_compile(self, module: nn.Module) -> nn.Module:
        return torch.compile(module) if self.args.compile else module

    def _forward(self, model: nn.Module, n: int) -> None:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(n, 3, self.size, self.size, device=self.device))

    def peak_for(self) -> float:
        return self.peak_bf16 or self.peak_gflops

    def rate(self, flops: float, seconds: float) -> dict:
        """Achieved rate, as a fraction of the matmul rate measured right now.

        On a shared CPU the available rate drifts with other processes' load, so the
        matmul reference is re-measured after every timed section and the higher of it
        and the first reading is used (the conservative fraction).
        """
        gflops = flops / seconds / 1e9
        peak = self.peak_for()
        if self.device.type == "cpu":
            size = self.args.matmul_size
            peak = max(peak, matmul_rate(self.device, size=size, repeats=3),
                       conv_gemm_rate(self.device, size=size, repeats=3))
        return {"gflop": round(flops / 1e9, 3), "achieved_gflops": round(gflops, 2),
                "matmul_gflops": round(peak, 1), "fraction_of_matmul": round(gflops / peak, 4)}

    # -- measurements

    def flops(self) -> None:
        emit({**self.base, "measure": "flops", "forward_gflop_per_image":
              round(self.fwd_flops / 1e9, 4), "out_dim": self.new_backbone().out_dim})

    def pretrain(self) -> float:
        """The body of ``phases.pretrain``'s step loop, on synthetic images."""
        args, device, split = self.args, self.device, self.split
        batch = args.batch or (128 if device.type == "cuda" else (8 if self.heavy else 64))
        backbone = self.new_backbone()
        head = nn.Linear(backbone.out_dim, split.num_classes).to(device)
        model_fwd = self.maybe_compile(backbone)
        pc = self.cfg.pretrain
        optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=pc.lr,
                                    momentum=pc.momentum, nesterov=True,
                                    weight_decay=pc.weight_decay)
        transform = augmentation("standard", split.image_size, split.channels)
        rng = np.random.default_rng(0)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)

        def step(_: int) -> None:
            nonlocal loss_sum, correct
            backbone.train()
            indices = rng.choice(len(split), batch, replace=False)
            labels = torch.as_tensor(split.labels[indices], device=device)
            images = augment_batch(gather_uint8(split, indices, device), transform)
            images = self.normalizer(images)
            if self.cl:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.amp, device):
                logits = head(model_fwd(images))
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * batch
            correct += (logits.argmax(1) == labels).sum()

        def flop_step() -> None:
            x = torch.zeros(2, 3, self.size, self.size, device=device)
            backbone.train()
            F.cross_entropy(head(backbone(x)), torch.zeros(2, dtype=torch.long,
                                                           device=device)).backward()

        train_flops = count_flops(flop_step) / 2
        optimizer.zero_grad(set_to_none=True)
        warmup = 0 if self.heavy else args.warmup
        with PeakMemory(device) as mem:
            seconds, syncs = timed(step, args.iters, max(warmup, 1), device,
                                   sync_check=device.type == "cuda")
        ips = batch / seconds
        emit({**self.base, "measure": "pretrain", "batch": batch, "images_per_s": round(ips, 2),
              "step_s": round(seconds, 4), "train_gflop_per_image": round(train_flops / 1e9, 4),
              **self.rate(train_flops * batch, seconds), "peak_mib": round(mem.mib, 1),
              "host_syncs_per_step": syncs / args.iters if device.type == "cuda" else None})
        return ips

    def data(self, train_ips: float) -> None:
        """uint8 gather + augmentation + normalisation alone (``data/transforms.py``)."""
        split, device = self.split, self.device
        batch = 128
        transform = augmentation("standard", split.image_size, split.channels)
        rng = np.random.default_rng(1)

        def step(_: int) -> None:
            indices = rng.choice(len(split), batch, replace=False)
            images = self.normalizer(augment_batch(gather_uint8(split, indices, device),
                                                   transform))
            if self.cl:
                images.contiguous(memory_format=torch.channels_last)

        seconds, _ = timed(step, max(self.args.iters, 3), 1, device)
        ips = batch / seconds
        emit({**self.base, "measure": "data_pipeline", "batch": batch,
              "images_per_s": round(ips, 1), "vs_pretrain": round(ips / train_ips, 1)})

    def _meta_setup(self, shots: int, first_order: bool, meta_batch: int):
        cfg = copy.deepcopy(self.cfg)
        mc = cfg.meta
        mc.shots, mc.queries, mc.first_order = shots, self.args.queries, first_order
        mc.inner_steps, mc.meta_batch, mc.ht = self.args.inner_steps, meta_batch, "off"
        learner = MetaLearner(self.new_backbone(), mc.ways, "kernel", "all", False)
        learner = learner.to(self.device)
        learner.backbone = self.maybe_compile(learner.backbone)
        optimizer = torch.optim.Adam([
            {"params": learner.ss_params, "lr": mc.lr_ss},
            {"params": [learner.weight0, learner.bias0], "lr": mc.lr_head}])
        sampler = EpisodeSampler(self.split.indices_by_class, mc.ways, shots, mc.queries, 0)
        learner.train(mc.bn_mode == "train")

        def step(i: int) -> None:
            loss, _ = meta_step(learner, self.split, sampler, i, cfg, self.normalizer,
                                self.device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return cfg, learner, sampler, step

    def _ss_flops_per_image(self) -> float:
        learner = MetaLearner(self.new_backbone(), 5, "kernel", "all", False).to(self.device)
        learner.eval()
        x = torch.zeros(2, 3, self.size, self.size, device=self.device)
        return count_flops(lambda: learner.backbone(x).sum().backward()) / 2

    def _inner_flops(self, shots: int, first_order: bool, tasks: int = 1) -> float:
        d, ways, q = self.new_backbone().out_dim, 5, self.args.queries
        feats = torch.randn(tasks, ways * (shots + q), d, requires_grad=True)
        w0 = torch.zeros(ways, d, requires_grad=True)
        b0 = torch.zeros(ways, requires_grad=True)
        labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
        qlabels = torch.arange(ways).repeat_interleave(q)

        def run() -> None:
            w, b = adapt(w0, b0, feats[:, :ways * shots], labels, ways,
                         self.args.inner_steps, 0.01, first_order)
            logits = linear_logits(w, b, feats[:, ways * shots:])
            F.cross_entropy(logits.reshape(-1, ways), qlabels.repeat(tasks)).backward()

        return count_flops(run)

    def meta_train(self) -> None:
        args, device = self.args, self.device
        ss_flops = self._ss_flops_per_image()
        shots_list = [1, 5] if (args.full or not self.heavy) else [1]
        orders = [False, True] if (args.full or not self.heavy) else [False]
        iters = 1 if self.heavy and not args.full else args.iters
        warmup = 0 if self.heavy else args.warmup
        for shots in shots_list:
            images = 5 * (shots + args.queries)
            # reference: one SS-backbone forward+backward of the episode's images
            _, learner, sampler, _ = self._meta_setup(shots, False, 1)
            batch = sampler.episode(0)
            idx = np.concatenate([batch.support.ravel(), batch.query.ravel()])
            pixels = self.normalizer(gather_uint8(self.split, idx, device))
            if self.cl:
                pixels = pixels.contiguous(memory_format=torch.channels_last)

            def ref(_: int, learner=learner, pixels=pixels) -> None:
                with autocast(self.amp, device):
                    feats = learner.backbone(pixels)
                feats.float().sum().backward()

            ref_s, _ = timed(ref, iters, max(warmup, 0), device)
            emit({**self.base, "measure": "meta_backbone_fwd_bwd", "shots": shots,
                  "images": images, "step_s": round(ref_s, 4),
                  **self.rate(ss_flops * images, ref_s)})
            del learner
            for first_order in orders:
                _, learner, _, step = self._meta_setup(shots, first_order, 1)
                inner = self._inner_flops(shots, first_order)
                with PeakMemory(device) as mem:
                    seconds, syncs = timed(step, iters, warmup, device,
                                           sync_check=device.type == "cuda")
                emit({**self.base, "measure": "meta_train", "shots": shots, "queries":
                      args.queries, "inner_steps": args.inner_steps,
                      "order": "first" if first_order else "second",
                      "episodes_per_s": round(1 / seconds, 3), "step_s": round(seconds, 4),
                      "overhead_vs_backbone": round(seconds / ref_s - 1, 3),
                      "inner_loop_gflop": round(inner / 1e9, 4),
                      **self.rate(ss_flops * images + inner, seconds),
                      "peak_mib": round(mem.mib, 1),
                      "host_syncs_per_step": syncs / iters if device.type == "cuda" else None})
                del learner

    def meta_batch(self, k: int) -> None:
        """k tasks through one backbone pass and one batched inner loop, vs k separate."""
        args, device = self.args, self.device
        _, _, _, together = self._meta_setup(1, False, k)
        _, _, _, single = self._meta_setup(1, False, 1)
        t_k, t_1 = float("inf"), float("inf")
        for i in range(max(args.iters, 2)):  # interleaved, so load drift hits both alike
            t_k = min(t_k, timed(lambda _, i=i: together(i), 1, args.warmup if i == 0 else 0,
                                 device)[0])
            t_1 = min(t_1, timed(lambda _, i=i: [single(i * k + j) for j in range(k)], 1,
                                 args.warmup if i == 0 else 0, device)[0])
        emit({**self.base, "measure": "meta_batch", "k": k, "shots": 1,
              "batched_tasks_per_s": round(k / t_k, 2), "separate_tasks_per_s":
              round(k / t_1, 2), "speedup": round(t_1 / t_k, 2)})

    def meta_test(self) -> None:
        """Per-episode embedding (the reference path) vs cached, batched evaluation."""
        args, device = self.args, self.device
        backbone = self.new_backbone()
        learner = MetaLearner(backbone, 5, "kernel", "all", False).to(device)
        head = (learner.weight0.detach(), learner.bias0.detach())
        normalizer = Normalizer(self.split.mean, self.split.std, device, channels_last=self.cl)
        embedder = Embedder(self.maybe_compile(learner.backbone), normalizer, device,
                            amp=self.amp)
        embed_batch = 16 if self.heavy else 256
        idx = np.arange(min(embed_batch, len(self.split)))
        embedder.embed(self.split, idx[:2])
        embed_s, _ = timed(lambda _: embedder.embed(self.split, idx, batch_size=len(idx)),
                           1 if self.heavy else args.iters, 0, device)
        embed_ips = len(idx) / embed_s
        emit({**self.base, "measure": "embed", "batch": len(idx),
              "images_per_s": round(embed_ips, 2),
              **self.rate(self.fwd_flops * len(idx), embed_s)})
        d = backbone.out_dim
        for shots in (1, 5):
            sampler = EpisodeSampler(self.split.indices_by_class, 5, shots, args.queries, 7)
            images = 5 * (shots + args.queries)
            if self.heavy and not args.full:  # one episode's forward costs minutes here
                adapt_s, _ = timed(lambda _, s=sampler: evaluate(
                    "mtl", embedder, self.split, s, 1, args.inner_steps, 0.01, head,
                    cache=_random_cache(len(self.split), d, device)), 2, 1, device)
                per_s, measured = images / embed_ips + adapt_s, False
            else:
                per_s, _ = timed(lambda i, s=sampler: per_episode_accuracy(
                    "mtl", embedder, self.split, s, i, args.inner_steps, 0.01, head),
                    args.iters, 1, device)
                measured = True
            cache = _random_cache(len(self.split), d, device)
            n_eps = args.eval_episodes
            cached_s, _ = timed(lambda _, s=sampler, c=cache: evaluate(
                "mtl", embedder, self.split, s, args.eval_episodes, args.inner_steps, 0.01, head,
                cache=c), 1, 1, device)
            emit({**self.base, "measure": "meta_test", "shots": shots, "queries": args.queries,
                  "inner_steps": args.inner_steps,
                  "per_episode_episodes_per_s": round(1 / per_s, 3),
                  "per_episode_measured": measured,
                  "cached_episodes_per_s": round(n_eps / cached_s, 1),
                  "cached_episodes": n_eps,
                  "embed_images_per_s": round(embed_ips, 2)})


def _random_cache(n: int, d: int, device: torch.device) -> dict:
    """An embedding cache for every image (the episode phase does not depend on values)."""
    gen = torch.Generator().manual_seed(0)
    return {"indices": np.arange(n), "feats": torch.randn(n, d, generator=gen).to(device)}


# ----------------------------------------------------------------------------- table


def table(lines: list[str]) -> str:
    """Markdown summary of this script's JSON lines (for ``benchmarks/RESULTS.md``)."""
    recs = [json.loads(x) for x in lines if x.strip().startswith("{")]
    rows = ["| backbone | measure | setting | rate | GFLOP | GFLOP/s | of matmul | notes |",
            "|---|---|---|---|---|---|---|---|"]

    def frac(r: dict) -> str:
        return f"{100 * r['fraction_of_matmul']:.0f}%" if "fraction_of_matmul" in r else ""

    for r in recs:
        name = f"{r.get('backbone', '')}@{r.get('size', '')}"
        m = r["measure"]
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


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES,
                   help="name@size items (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--batch", type=int, default=0,
                   help="pre-training batch (0: 128 on CUDA; 64, or 8 for ResNets, on CPU)")
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--inner-steps", type=int, default=100)
    p.add_argument("--eval-episodes", type=int, default=600,
                   help="episodes of the cached meta-test measurement")
    p.add_argument("--matmul-size", type=int, default=0,
                   help="side of the reference matmul (0: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--meta-batch-k", type=int, default=4)
    p.add_argument("--backbone-args", type=json.loads, default={},
                   help='JSON keyword arguments for every backbone, e.g. \'{"width": 8}\'')
    p.add_argument("--full", action="store_true",
                   help="every shot/order and measured per-episode test for ResNets on CPU too")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (conv4 width 8, few steps and episodes)")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["pretrain", "data", "meta", "metabatch", "metatest"])
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.warmup, args.inner_steps = 1, 0, 5
        args.queries, args.eval_episodes, args.batch = 3, 20, args.batch or 8
        args.backbone_args = {"width": 8, **args.backbone_args}
        args.matmul_size = args.matmul_size or 512
    return args


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--table"]:  # summarise earlier results: --table FILE.jsonl
        print(table(Path(argv[1]).read_text().splitlines()))
        return
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    emit({"measure": "machine", "device": str(device), **machine()})
    total = time.perf_counter()
    for item in args.backbones:
        name, _, size = item.partition("@")
        start = time.perf_counter()
        bench = Bench(args, name, int(size or 84), device)
        bench.flops()
        if "pretrain" not in args.skip:
            ips = bench.pretrain()
            if "data" not in args.skip:
                bench.data(ips)
        if "meta" not in args.skip:
            bench.meta_train()
        if "metabatch" not in args.skip and (not bench.heavy or args.full):
            bench.meta_batch(args.meta_batch_k)
        if "metatest" not in args.skip:
            bench.meta_test()
        log.info("%s done in %.0f s", item, time.perf_counter() - start)
    emit({"measure": "total", "seconds": round(time.perf_counter() - total, 1)})


if __name__ == "__main__":
    main()
