"""Scaling and shifting (SS): the meta-transfer operation of Sun et al. (CVPR 2019).

``SS(X; W, b; Phi_S1, Phi_S2) = (W * Phi_S1) conv X + (b + Phi_S2)`` with W and b frozen.
Phi_S1 starts at 1 and Phi_S2 at 0, so an SS network at initialisation is exactly the
pre-trained one. Every conv of every backbone is an :class:`SSConv2d`; SS parameters exist
only after :func:`enable_ss`, so a plain backbone's state dict has no SS keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Granularity = Literal["kernel", "channel"]


class SSConv2d(nn.Conv2d):
    """A ``Conv2d`` that can be scaled and shifted by meta-learned parameters."""

    ss_scale: nn.Parameter | None
    ss_shift: nn.Parameter | None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ss_scale = None
        self.ss_shift = None

    @property
    def ss_enabled(self) -> bool:
        return self.ss_scale is not None

    def enable_ss(self, granularity: Granularity = "kernel") -> list[nn.Parameter]:
        """Add Phi_S1 (per kernel ``(out, in, 1, 1)`` or per channel ``(out, 1, 1, 1)``)
        and Phi_S2 ``(out,)``; freeze W and b. Returns the new parameters."""
        out_ch, in_ch = self.weight.shape[:2]
        shape = (out_ch, in_ch, 1, 1) if granularity == "kernel" else (out_ch, 1, 1, 1)
        if granularity not in ("kernel", "channel"):
            raise ValueError(f"SS granularity must be 'kernel' or 'channel', got {granularity}")
        device, dtype = self.weight.device, self.weight.dtype
        self.ss_scale = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.ss_shift = nn.Parameter(torch.zeros(out_ch, device=device, dtype=dtype))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        return [self.ss_scale, self.ss_shift]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ss_scale is None:
            return super().forward(x)
        weight = self.weight * self.ss_scale
        bias = self.ss_shift if self.bias is None else self.bias + self.ss_shift
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def ss_convs(module: nn.Module) -> Iterator[SSConv2d]:
    return (m for m in module.modules() if isinstance(m, SSConv2d))


def enable_ss(
    backbone: nn.Module,
    granularity: Granularity = "kernel",
    scope: Literal["all", "last"] = "all",
    bn_affine: bool = False,
) -> list[nn.Parameter]:
    """Freeze the whole backbone, then add SS to its convs (all, or the last stage only).

    Returns the meta-learnable parameters: the SS parameters, plus BN affine parameters of
    the same scope when ``bn_affine`` is set.
    """
    for p in backbone.parameters():
        p.requires_grad_(False)
    if scope == "all":
        targets: Iterable[nn.Module] = [backbone]
    elif scope == "last":
        targets = [backbone.stages()[-1]]
    else:
        raise ValueError(f"SS scope must be 'all' or 'last', got {scope}")
    params: list[nn.Parameter] = []
    for target in targets:
        for conv in ss_convs(target):
            if conv.ss_enabled:  # restored from a checkpoint: keep its values
                conv.ss_scale.requires_grad_(True)
                conv.ss_shift.requires_grad_(True)
                params.extend([conv.ss_scale, conv.ss_shift])
            else:
                params.extend(conv.enable_ss(granularity))
        if bn_affine:
            for m in target.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                    m.weight.requires_grad_(True)
                    m.bias.requires_grad_(True)
                    params.extend([m.weight, m.bias])
    return params


def ss_state_keys(backbone: nn.Module) -> list[str]:
    """State-dict keys of the SS parameters (for checkpoints and import checks)."""
    return [k for k in backbone.state_dict() if k.endswith(("ss_scale", "ss_shift"))]


def restore_ss_layout(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Enable SS on exactly the convs whose SS tensors appear in ``state``, before loading.

    Lets a checkpoint rebuild its own SS layout (scope and granularity) without a config.
    """
    for name, module in backbone.named_modules():
        if isinstance(module, SSConv2d) and f"{name}.ss_scale" in state:
            shape = state[f"{name}.ss_scale"].shape
            module.enable_ss("channel" if shape[1] == 1 and module.in_channels > 1 else "kernel")
