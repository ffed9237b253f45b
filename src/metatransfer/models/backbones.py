"""Backbone registry (timm style): ``@register_backbone`` and ``create_backbone(name, **kw)``.

Every backbone maps ``(batch, channels, h, w)`` images to ``(batch, out_dim)`` features,
works at any input size (adaptive pooling) and exposes ``stages()`` so SS can be limited
to the last stage. The built-in ones build all convs as :class:`SSConv2d`; ``timm:<name>``
wraps any timm network, to which SS is attached when it is enabled.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .ss import SSConv2d

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    """Class or factory decorator adding a backbone under ``name``."""

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone, or ``timm:<name>`` (any timm architecture, see
    :mod:`.timm_backbone`); unknown names list the valid ones."""
    if name.startswith("timm:"):
        from .timm_backbone import create_timm_backbone

        return create_timm_backbone(name, **kwargs)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone '{name}'; choose one of {', '.join(backbone_names())}"
                          ", or timm:<name> for a timm architecture")
    factory = _REGISTRY[name]
    target = factory.__init__ if isinstance(factory, type) else factory
    accepted = inspect.signature(target).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            valid = [k for k in accepted if k not in ("self", "in_channels")]
            raise ConfigError(f"backbone '{name}' has no argument '{unknown[0]}' (from "
                              f"model.backbone_args); valid: {', '.join(valid)}")
    return factory(**kwargs)


def place_backbone(model: nn.Module, device: torch.device, channels_last: bool = False,
                   compile: bool = False) -> nn.Module:
    """Device placement, memory format and optional ``torch.compile``, in place (so the
    state-dict keys and checkpoints stay those of the plain module): the one way every
    phase and tool puts a backbone where it runs."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False) -> SSConv2d:
    return SSConv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)


class ConvBlock(nn.Sequential):
    """conv3x3 - BN - ReLU - 2x2 max-pool: one stage of Conv-4."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            conv3x3(in_ch, out_ch, bias=True),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )


@register_backbone("conv4")
class Conv4(nn.Module):
    """Conv-4 of Vinyals et al. / MAML / ProtoNet: 4 x (conv3x3-64, BN, ReLU, max-pool).

    The last feature map is adaptively average-pooled to ``grid x grid`` and flattened:
    ``grid=1`` gives ``width`` features at any input size (28x28 maps are 1x1 already);
    ``grid=5`` at 84x84 is the classic 1600-d flattened Conv-4 embedding.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, grid: int = 1) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            ConvBlock(in_channels, width),
            ConvBlock(width, width),
            ConvBlock(width, width),
            ConvBlock(width, width),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_dim = width * grid * grid

    def stages(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x)).flatten(1)
