"""ResNet backbones: ``resnet12``, ``resnet12-tf`` and ``resnet25``.

Parameter and buffer names follow the public checkpoints they must load without renaming:

- ``resnet12``: RFS (Tian et al. 2020) and FEAT (Ye et al. 2020) share one ResNet-12 key
  layout: ``layer{1..4}.0.conv{1,2,3}.weight``, ``layer{i}.0.bn{1,2,3}.*``,
  ``layer{i}.0.downsample.{0,1}.*``; no stem, no conv biases.
- ``resnet25``: the MTL authors' PyTorch ``ResNetMtl``: ``conv1.{weight,bias}``, ``bn1.*``,
  ``layer{1..3}.{0..3}.conv{1,2}.weight``, ``layer{i}.0.downsample.{0,1}.*``.
- ``resnet12-tf``: the authors' TensorFlow ResNet-12 (never imported, so it reuses the
  ``resnet12`` names for its blocks).

Every conv is an :class:`SSConv2d`, so SS adds ``ss_scale``/``ss_shift`` beside each
``weight`` without disturbing the names above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import conv3x3, register_backbone
from .ss import SSConv2d


def init_weights(model: nn.Module, nonlinearity: str) -> None:
    """He init for convs (fan-out, as in the source projects), identity BN."""
    for m in model.modules():
        if isinstance(m, SSConv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., NeurIPS 2018): drop whole ``block_size`` squares of a map.

    Acts only in training; at eval it is the identity, so imported weights reproduce the
    source network exactly. ``drop_rate`` is the fraction of units dropped; the block is
    clamped to the feature map so small inputs (e.g. 32x32) work. Kept units are rescaled
    by the inverse kept fraction, as in RFS/FEAT.
    """

    def __init__(self, drop_rate: float, block_size: int) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate = drop_rate
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        n, c, h, w = x.shape
        bs = max(1, min(self.block_size, h, w))
        # seed rate so that blocks cover ~drop_rate of the map (Ghiasi et al., eq. 1)
        gamma = self.drop_rate / bs**2 * (h * w) / ((h - bs + 1) * (w - bs + 1))
        seeds = (torch.rand(n, c, h - bs + 1, w - bs + 1, device=x.device) < gamma).to(x.dtype)
        # each seed at (i, j) blanks [i, i+bs) x [j, j+bs): pad then max-pool back to (h, w)
        dropped = F.max_pool2d(F.pad(seeds, (bs - 1,) * 4), kernel_size=bs, stride=1)
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


class Block12(nn.Module):
    """One ResNet-12 residual block: 3 x conv3x3-BN with LeakyReLU(0.1), 1x1 shortcut,
    2x2 max-pool, then dropout or DropBlock (training only).

    ``tf_style`` follows the authors' TensorFlow block: conv biases, an activation after
    the third conv, a bare 1x1 shortcut (no BN) and no activation after the sum. Otherwise
    it is the RFS/FEAT/MetaOptNet block: no conv biases, BN'd shortcut, activation after
    the sum.
    """

    def __init__(self, in_ch: int, out_ch: int, drop: nn.Module, tf_style: bool = False) -> None:
        super().__init__()
        self.tf_style = tf_style
        self.conv1 = conv3x3(in_ch, out_ch, bias=tf_style)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, bias=tf_style)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv3 = conv3x3(out_ch, out_ch, bias=tf_style)
        self.bn3 = nn.BatchNorm2d(out_ch)
        shortcut: list[nn.Module] = [SSConv2d(in_ch, out_ch, 1, bias=False)]
        if not tf_style:
            shortcut.append(nn.BatchNorm2d(out_ch))
        self.downsample = nn.Sequential(*shortcut)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.tf_style:
            out = self.act(out) + self.downsample(x)
        else:
            out = self.act(out + self.downsample(x))
        return self.drop(self.pool(out))


class _ResNet12Base(nn.Module):
    """Four (or ``len(widths)``) :class:`Block12` stages ``layer1..layerN``, global average
    pool; ``(batch, widths[-1])`` features at any input size."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        drop_rate: float,
        dropblock_size: int,
        dropblock_stages: int,
        tf_style: bool,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths:
            raise ValueError("widths must name at least one stage width")
        self.n_stages = len(widths)
        prev = in_channels
        for i, width in enumerate(widths):
            if i >= len(widths) - dropblock_stages:
                drop: nn.Module = DropBlock(drop_rate, dropblock_size)
            else:
                drop = nn.Dropout(drop_rate)
            # nn.Sequential with one block keeps RFS/FEAT's `layerI.0.` key prefix
            setattr(self, f"layer{i + 1}", nn.Sequential(Block12(prev, width, drop, tf_style)))
            prev = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]
        init_weights(self, "leaky_relu")

    def stages(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.n_stages)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return self.pool(x).flatten(1)


@register_backbone("resnet12")
class ResNet12(_ResNet12Base):
    """The ResNet-12 of MetaOptNet / RFS / FEAT: 64-160-320-640, 640-d, 84x84 in papers.

    Dropout ``drop_rate`` after the first two blocks and DropBlock (same rate,
    ``dropblock_size``) after the last two, as RFS and FEAT (they use 0.1 and 5 on
    ImageNet-style data, 2 on CIFAR). The drop rate is constant; RFS/FEAT ramp it up over
    their first 40k forward passes.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 160, 320, 640),
        drop_rate: float = 0.1,
        dropblock_size: int = 5,
    ) -> None:
        super().__init__(in_channels, widths, drop_rate, dropblock_size,
                         dropblock_stages=2, tf_style=False)


@register_backbone("resnet12-tf")
class ResNet12TF(_ResNet12Base):
    """The authors' TensorFlow ResNet-12: 64-128-256-512, LeakyReLU 0.1, max-pool, 512-d.

    Differences from ``resnet12`` (theirs, kept): conv biases, activation before the
    residual sum, shortcut without BN, plain dropout (keep 0.9 in their pre-training).
    Their BN has no learned scale; ours has one (initialised to 1).

    ``bn_stats="batch"`` evaluates as their code does: ``tf.contrib.layers.batch_norm``
    with its defaults normalises with the statistics of each call's batch, at test time
    too, and keeps no running statistics (none are in their released files); ``bn_eps``
    is that layer's epsilon (1e-3 in TensorFlow, 1e-5 in PyTorch).
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        drop_rate: float = 0.1,
        bn_stats: str = "running",
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__(in_channels, widths, drop_rate, dropblock_size=1,
                         dropblock_stages=0, tf_style=True)
        if bn_stats not in ("running", "batch"):
            raise ValueError(f"bn_stats must be 'running' or 'batch', got {bn_stats}")
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = float(bn_eps)
                if bn_stats == "batch":  # per-call batch statistics, in eval mode too
                    m.track_running_stats = False
                    m.register_buffer("running_mean", None)
                    m.register_buffer("running_var", None)
                    m.register_buffer("num_batches_tracked", None)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                SSConv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


@register_backbone("resnet25")
class ResNet25(nn.Module):
    """The authors' PyTorch "ResNet-25" (``ResNetMtl``): 3x3 stem conv (80 ch, with bias)
    + BN + ReLU, three stages 160/320/640 of ``blocks`` BasicBlocks, the first of each with
    stride 2, global average pool: 640-d (80x80 input in their code, any size here).

    ``stages()`` is the three residual stages; the stem belongs to none (SS scope 'last'
    is ``layer3``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (160, 320, 640),
        blocks: int = 4,
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        stem = int(stem_width) if stem_width else widths[0] // 2
        self.conv1 = SSConv2d(in_channels, stem, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        prev = stem
        for i, width in enumerate(widths):
            layer = [BasicBlock(prev if b == 0 else width, width, 2 if b == 0 else 1)
                     for b in range(blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            prev = width
        self.n_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]
        init_weights(self, "relu")

    def stages(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.n_stages)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in self.stages():
            x = stage(x)
        return self.pool(x).flatten(1)
