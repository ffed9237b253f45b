"""Which device a process computes on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    return device


# ----------------------------------------------------------------------------- precision

#: x86 CPU features that make oneDNN's bf16 convolutions and matmuls about twice as fast
#: as fp32 (AVX512_BF16: AMD Zen 4+, Intel Cooper Lake; AMX: Intel Sapphire Rapids+).
_CPU_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 convolutions natively, i.e. faster than fp32.

    On CPUs without bf16 instructions oneDNN emulates bf16, typically slower than fp32, so
    ``amp=auto`` must not turn it on there. Only x86 is detected; elsewhere ``amp=bf16``
    forces it.
    """
    if device.type == "cuda":  # Ampere and later; older GPUs only emulate bf16
        if not torch.cuda.is_available():
            return False
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3
            return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in _CPU_BF16_CHECKS)


def autocast_enabled(amp: str, device: torch.device) -> bool:
    """bf16 autocast for the backbone: ``auto`` = where the device has bf16 natively,
    ``bf16`` = always, ``off`` = never (fp32)."""
    if amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"amp must be auto, bf16 or off, got '{amp}'")
    return amp == "bf16" or (amp == "auto" and native_bf16(device))


def autocast(enabled: bool, device: torch.device):
    """Autocast around backbone forward passes only: convolutions and matmuls run in bf16,
    while callers cast the features to fp32 before any loss, softmax or inner-loop update,
    BN keeps fp32 running statistics and parameters (so Adam's states) stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def precision(enabled: bool) -> str:
    """The name results.json and environment.json record: ``bf16`` (autocast) or ``fp32``."""
    return "bf16" if enabled else "fp32"


@contextmanager
def subnormals_flushed() -> Iterator[bool]:
    """Treat subnormal floats (|x| < 1.2e-38) as zero on the CPU inside the block (x86
    FTZ/DAZ; yields False where unsupported). Gradients that shrink through a deep network
    reach that range, and every operation on a subnormal takes a slow microcode path: one
    fp32 resnet25 meta-training step took 257 s instead of 16 s on an Intel Xeon. The
    setting is global to the process, so it is put back to PyTorch's default afterwards
    (whatever else runs in the process, e.g. a notebook, sees IEEE arithmetic again)."""
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(False)
