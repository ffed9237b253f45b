"""``amp=auto`` made per network: bf16 only where it is faster for *this* backbone on *this*
CPU, measured once and cached.

Why: a CPU's bf16 flags alone mislead. On AMD Zen 4 / Zen 5 (AVX512_BF16, no AMX)
EfficientNet-Lite0 runs 0.5-0.7x as fast in bf16 as in fp32 (oneDNN has no fast bf16
depthwise convolution there), while Conv-4 and the ResNets run faster. So where the CPU has
native bf16, ``auto`` times a few forward+backward passes of the run's backbone at its input
size in both precisions and keeps the faster. The answer is cached by CPU, torch version,
thread count, backbone and input size (``<cache>/amp_choice.json``), so a run pays for the
probe (a few seconds) once. CUDA keeps the flag rule: bf16 wherever it is native.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import autocast, native_bf16

log = logging.getLogger(__name__)

#: bf16 is chosen only when it is at least this much faster than fp32 (timing noise on a
#: busy machine is a few percent; a tie goes to fp32, the more exact precision)
MIN_SPEEDUP = 1.05
CACHE_NAME = "amp_choice.json"
PROBE_SIZE = 84  # input side when the config leaves the dataset's default (0)
_MEASURED: dict[str, dict] = {}  # this process's probes, should the cache be unwritable


@dataclass(frozen=True)
class AmpChoice:
    """The precision a run uses (``amp``: ``bf16`` or ``off``) and, in words, why."""

    amp: str
    reason: str
    speedup: float | None = None  # fp32 time / bf16 time, where measured


def cpu_identity() -> str:
    """Model name, family, model and stepping from /proc/cpuinfo (two "AMD EPYC" of
    different generations differ there), else what :mod:`platform` says."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        pass
    if not fields:
        return platform.processor() or platform.machine()
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}, stepping {fields.get('stepping', '?')})")


def step_seconds(backbone: torch.nn.Module, images: torch.Tensor, bf16: bool,
                 iters: int = 3) -> float:
    """The fastest of ``iters`` forward+backward passes (after one warm-up) of ``backbone``
    on ``images``, under bf16 autocast or in fp32: the work every training phase repeats."""
    device = images.device
    times = []
    for i in range(iters + 1):
        backbone.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast(bf16, device):
            out = backbone(images)
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def measure(backbone_name: str, backbone_args: dict, in_channels: int, size: int,
            device: torch.device) -> tuple[float, float]:
    """Seconds per forward+backward step in fp32 and in bf16 for a freshly built
    ``backbone_name`` (random weights: speed does not depend on them) at ``size`` px, in
    the runs' memory format (channels_last)."""
    from .models import create_backbone, place_backbone

    backbone = create_backbone(backbone_name, in_channels=in_channels, **backbone_args)
    backbone = place_backbone(backbone.train(), device, channels_last=True)
    batch = 32 if size <= 128 else 16
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, in_channels, size, size, generator=generator).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    fp32 = step_seconds(backbone, images, bf16=False)
    bf16 = step_seconds(backbone, images, bf16=True)
    return fp32, bf16


def _cache_file() -> Path:
    from .data.cache import cache_root

    return cache_root() / CACHE_NAME


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    """Atomically; a cache that cannot be written only costs the next run a probe."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError as err:
        log.debug("amp choice not cached (%s)", err)


def choose_amp(amp: str, device: torch.device, backbone: str, backbone_args: dict | None = None,
               in_channels: int = 3, size: int = 0, cache: Path | None = None) -> AmpChoice:
    """The precision for ``backbone`` at ``size`` px on ``device``: ``bf16`` / ``off`` as
    given, or for ``auto`` the measured rule of this module (see its docstring)."""
    if amp == "off":
        return AmpChoice("off", "fp32: amp=off")
    if amp == "bf16":
        return AmpChoice("bf16", "bf16: amp=bf16")
    if amp != "auto":
        from .errors import ConfigError

        raise ConfigError(f"amp must be auto, bf16 or off, got '{amp}'")
    if not native_bf16(device):
        return AmpChoice("off", f"fp32: {device.type} has no native bf16 (amp=auto)")
    if device.type != "cpu":
        return AmpChoice("bf16", f"bf16: native on {device.type} (amp=auto)")
    size = size or PROBE_SIZE
    args = dict(backbone_args or {})
    key = (f"{cpu_identity()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
           f" | {backbone} {json.dumps(args, sort_keys=True)} | {in_channels}x{size}x{size}")
    path = cache or _cache_file()
    known = _read_cache(path)
    if key in _MEASURED and key not in known:  # this process measured it; the file failed
        known[key] = _MEASURED[key]
    if key in known:
        fp32, bf16 = known[key]["fp32_s"], known[key]["bf16_s"]
        where = f"cached in {path}"
    else:
        fp32, bf16 = measure(backbone, args, in_channels, size, device)
        known[key] = _MEASURED[key] = {"fp32_s": round(fp32, 5), "bf16_s": round(bf16, 5)}
        _write_cache(path, known)
        where = "measured now"
    speedup = fp32 / bf16 if bf16 > 0 else float("inf")
    chosen = "bf16" if speedup >= MIN_SPEEDUP else "off"
    name = "bf16" if chosen == "bf16" else "fp32"
    reason = (f"{name}: bf16 ran {speedup:.2f}x the speed of fp32 for {backbone} at {size} px "
              f"on this CPU ({where}; amp=auto keeps bf16 from {MIN_SPEEDUP:.2f}x)")
    return AmpChoice(chosen, reason, round(speedup, 3))


def resolve_run_amp(cfg, device: torch.device) -> AmpChoice:
    """:func:`choose_amp` for a run's config; the run then saves the concrete choice
    (``amp: off`` / ``bf16`` in its config.yaml, the reason in environment.json), so a
    resume and a meta-test of the run compute in the same precision."""
    from .data import input_size

    channels = cfg.data.channels if cfg.data.channels in (1, 3) else 3
    return choose_amp(cfg.amp, device, cfg.model.backbone, cfg.model.backbone_args, channels,
                      input_size(cfg.data))


def resolve_checkpoint_amp(cfg, device: torch.device, checkpoint: Path) -> AmpChoice:
    """:func:`choose_amp` for evaluating ``checkpoint``: its backbone at its input size,
    not the config's (an imported or foreign checkpoint differs from the preset), so
    ``mtl meta-test`` computes in the precision :class:`~metatransfer.FewShotClassifier`,
    ``mtl adapt`` and ``mtl serve`` choose for the same file."""
    from .checkpoints import read_info

    info = read_info(checkpoint)
    return choose_amp(cfg.amp, device, info.backbone, info.backbone_args, info.in_channels,
                      info.image_size)

