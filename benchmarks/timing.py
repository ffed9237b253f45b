"""What the speed benchmarks share: timing, peak memory, FLOP counts, the machine's dense
rate, synthetic images, command-line options and the per-backbone driver.

Every benchmark prints one JSON object per measurement on stdout (``emit``), starting
with a ``machine`` record and, per ``backbone@size`` and precision (``--amp``: fp32 and
bf16 by default), a ``kernels`` record (the rates of a matmul, a 1x1 and a 3x3
convolution in that precision; the best of them is the peak the ``fraction_of_peak``
figures of that precision are relative to), and ending with ``total``. The options are the
same for every script, so one command line (``gpu.sh``'s ``EXTRA``) serves them all; each
script uses the ones it needs.
"""

from __future__ import annotations

import argparse
import functools
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
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from metatransfer.config import RunConfig
from metatransfer.data.base import ImageSplit
from metatransfer.devices import precision, subnormals_flushed
from metatransfer.models import create_backbone, place_backbone
from metatransfer.phases.common import channels_last, make_normalizer, use_amp

log = logging.getLogger("benchmarks")
DEFAULT_BACKBONES = ["conv4@28", "conv4@84", "resnet12@84", "resnet25@80"]
HEAVY_GFLOP = 1.0  # backbones above this forward cost per image get the CPU-light schedule


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
    that is impossible the process-wide peak is reported.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
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


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding,
                        _dilation, transposed, _output_padding, _groups, output_mask,
                        out_shape=None) -> int:
    """A convolution's backward: the input gradient and the weight gradient each cost what
    the forward does. torch's own formula counts a grouped (depthwise) convolution's
    backward as if it were dense, 22-66x too much for EfficientNet's depthwise layers,
    which made "fraction of peak" read above 100%."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions ``fn`` runs (``torch.utils.flop_counter``,
    with :func:`conv_backward_flops` for convolution backwards)."""
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def fastest(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32,
                size: int | None = None, repeats: int = 5) -> float:
    """Best dense ``size x size`` matmul rate over ``repeats`` calls, in GFLOP/s."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / fastest(lambda: torch.mm(a, b), device, repeats) / 1e9


def conv_gemm_rate(device: torch.device, dtype: torch.dtype = torch.float32,
                   size: int | None = None, repeats: int = 5) -> float:
    """The same dense product as :func:`matmul_rate`, run as a 1x1 convolution (GFLOP/s).

    Convolutions go through oneDNN on CPU, ``torch.mm`` through the BLAS; on some CPUs
    (e.g. MKL on AMD) the BLAS path is much slower, so the machine's dense rate is the
    fastest of the kernels measured.
    """
    n = size or (8192 if device.type == "cuda" else 2048)
    side = max(1, n // 64)
    x = torch.randn(1, n, 64, side, device=device, dtype=dtype)
    w = torch.randn(n, n, 1, 1, device=device, dtype=dtype)
    return 2 * n * n * 64 * side / fastest(lambda: F.conv2d(x, w), device, repeats) / 1e9


def conv3x3_rate(device: torch.device, dtype: torch.dtype = torch.float32,
                 channels: int | None = None, repeats: int = 5) -> float:
    """A 3x3 convolution (stride 1, padding 1, NHWC) of a wide ResNet stage, in GFLOP/s:
    the kernel the backbones spend their time in, at a size that runs it near its best."""
    c = channels or (512 if device.type == "cuda" else 256)
    batch, side = (256, 28) if device.type == "cuda" else (32, 21)
    x = torch.randn(batch, c, side, side, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    flops = 2 * batch * c * c * 9 * side * side
    return flops / fastest(lambda: F.conv2d(x, w, padding=1), device, repeats) / 1e9


def kernel_rates(device: torch.device, dtype: torch.dtype, size: int | None = None,
                 repeats: int = 5, channels: int | None = None) -> dict[str, float]:
    """GFLOP/s of the three reference kernels in ``dtype``; their maximum is the peak every
    fraction of that dtype is measured against (so no fraction reads above 100% for
    lack of a fast reference)."""
    return {"mm": matmul_rate(device, dtype, size, repeats),
            "conv1x1": conv_gemm_rate(device, dtype, size, repeats),
            "conv3x3": conv3x3_rate(device, dtype, channels, repeats)}


@functools.cache
def first_kernel_rates(device: torch.device, dtype: torch.dtype, size: int | None,
                       channels: int | None) -> dict[str, float]:
    """The first :func:`kernel_rates` reading of a device, dtype and size, measured once
    per process and shared by every :class:`Setup` (backbone) of that precision."""
    return kernel_rates(device, dtype, size, channels=channels)


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


# ----------------------------------------------------------------------------- per backbone


class Setup:
    """One backbone at one image size on one device: config, synthetic data, FLOPs, dense rate."""

    def __init__(self, args: argparse.Namespace, name: str, size: int,
                 device: torch.device, amp: str = "auto", fold_bn: bool = True) -> None:
        self.args, self.name, self.size, self.device = args, name, size, device
        self.cfg = RunConfig()
        self.cfg.amp = amp
        self.cfg.fold_bn = fold_bn
        self.cfg.model.backbone = name
        self.cfg.model.backbone_args = dict(args.backbone_args)
        if args.quick and not name.startswith("timm:"):  # a timm network keeps its own widths
            self.cfg.model.backbone_args.setdefault("width", 8)
        self.cfg.compile = args.compile
        self.amp = use_amp(self.cfg, device)
        self.precision = precision(self.amp)
        self.dtype = torch.bfloat16 if self.amp else torch.float32
        self.cl = channels_last(self.cfg)
        self.split = synthetic_split(size)
        self.normalizer = make_normalizer(self.cfg, self.split, device)
        self.base = {"backbone": name, "size": size, "device": str(device),
                     "precision": self.precision, "channels_last": self.cl,
                     "compile": args.compile, "fold_bn": fold_bn}
        probe = self.new_backbone()
        self.out_dim = probe.out_dim
        self.fwd_flops = count_flops(lambda: self._forward(probe, 2)) / 2
        self.heavy = device.type == "cpu" and self.fwd_flops / 1e9 > HEAVY_GFLOP
        self.kernel_args = (args.matmul_size, 64 if args.quick else None)
        rates = dict(first_kernel_rates(device, self.dtype, *self.kernel_args))
        self.peak_gflops = max(rates.values())
        emit({**self.base, "measure": "kernels", "peak_gflops": round(self.peak_gflops, 1),
              **{f"{k}_gflops": round(v, 1) for k, v in rates.items()}})

    # -- building blocks

    def new_backbone(self) -> nn.Module:
        torch.manual_seed(0)
        model = create_backbone(self.name, in_channels=3, **self.cfg.model.backbone_args)
        return place_backbone(model, self.device, self.cl)

    def maybe_compile(self, module: nn.Module) -> nn.Module:
        """``--compile`` compiles in place, as runs do (``place_backbone``): the module stays
        itself, so BatchNorm folding still finds its graph (an ``OptimizedModule`` wrapper
        cannot be traced and would measure the network unfolded)."""
        if self.args.compile:
            module.compile()
        return module

    def _forward(self, model: nn.Module, n: int) -> None:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(n, 3, self.size, self.size, device=self.device))

    def rate(self, flops: float, seconds: float) -> dict:
        """Achieved rate, as a fraction of the best reference kernel of the same precision
        (:func:`kernel_rates`).

        On a shared CPU the available rate drifts with other processes' load, so the
        references are re-measured after every timed section and the higher of them and
        the first reading is used (the conservative fraction).
        """
        gflops = flops / seconds / 1e9
        peak = self.peak_gflops
        if self.device.type == "cpu":
            size, channels = self.kernel_args
            again = kernel_rates(self.device, self.dtype, size, 3, channels)
            peak = max(peak, *again.values())
        return {"gflop": round(flops / 1e9, 3), "achieved_gflops": round(gflops, 2),
                "peak_gflops": round(peak, 1), "fraction_of_peak": round(gflops / peak, 4)}



# ----------------------------------------------------------------------------- driver


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES,
                   help="name@size items (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    p.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=["off", "bf16", "auto"],
                   help="precisions to measure, each backbone in each: off = fp32, bf16 = "
                        "bf16 autocast, auto = what runs use by default (default: %(default)s)")
    p.add_argument("--fold-bn", nargs="+", default=["on"], choices=["on", "off"],
                   help="eval-mode BatchNorm folded into the convs (the runs' fold_bn), "
                        "each backbone with each: 'on off' measures before/after "
                        "(default: %(default)s)")
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
                   choices=["pretrain", "data", "meta", "metabatch", "hardtasks", "metatest"],
                   help="measurements to leave out (each script honours its own)")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.warmup, args.inner_steps = 1, 0, 5
        args.queries, args.eval_episodes, args.batch = 3, 20, args.batch or 8
        args.matmul_size = args.matmul_size or 512
    return args


def run(measure: Callable[[Setup], object], doc: str, argv: list[str] | None = None) -> None:
    """Parse the options, then ``measure`` every ``--backbones`` item on the device."""
    args = parse_args(doc.split("\n\n")[0], sys.argv[1:] if argv is None else argv)
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
    with subnormals_flushed():  # as runs do
        measure_all(measure, args, device)


def measure_all(measure: Callable[[Setup], object], args: argparse.Namespace,
                device: torch.device) -> None:
    total = time.perf_counter()
    for item in args.backbones:
        name, _, size = item.partition("@")
        for amp in args.amp:
            for fold in args.fold_bn:
                start = time.perf_counter()
                bench = Setup(args, name, int(size or 84), device, amp, fold == "on")
                measure(bench)
                log.info("%s %s (BN folding %s) done in %.0f s", item, bench.precision, fold,
                         time.perf_counter() - start)
    emit({"measure": "total", "seconds": round(time.perf_counter() - total, 1)})
