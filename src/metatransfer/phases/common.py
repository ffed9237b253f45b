"""What the phases share: device settings, model building, validation episodes."""

from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig
from ..data.base import ImageSplit
from ..data.episodes import EpisodeSampler
from ..data.transforms import Normalizer
from ..devices import autocast, autocast_enabled  # noqa: F401  (autocast: the phases' import)
from ..embedding import Embedder
from ..evaluation import evaluate_all_ranks
from ..methods.base import FewShotMethod
from ..models import create_backbone, place_backbone
from ..results import mean_ci95


def use_amp(cfg: RunConfig, device: torch.device) -> bool:
    """bf16 autocast of the backbone (``cfg.amp``): by default wherever the device has bf16
    natively (CUDA; CPUs with AVX512_BF16 or AMX), about 2x faster there. Losses, the inner
    loop, BN statistics and optimiser states stay fp32 (see :func:`autocast`)."""
    return autocast_enabled(cfg.amp, device)


class Float32(nn.Module):
    """Runs ``module`` in fp32 even inside autocast: a classifier head whose logits feed the
    loss. bf16 logits keep 8 bits (a logit of 10 is rounded to a multiple of 1/16); with a
    bf16 head the glyphs demo's pre-training ended at loss 1.15 (fp32 head: 1.07, all fp32:
    1.00, same seed). The head's matmul is a negligible share of the FLOPs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float())


def channels_last(cfg: RunConfig) -> bool:
    """NHWC activations (``cfg.channels_last``): faster convolutions on CUDA and with oneDNN
    on CPU alike, so the setting does not depend on the device."""
    return cfg.channels_last


def new_backbone(cfg: RunConfig, in_channels: int, device: torch.device) -> nn.Module:
    model = create_backbone(cfg.model.backbone, in_channels=in_channels,
                            **cfg.model.backbone_args).to(device)
    return prepare_backbone(cfg, model, device)


def prepare_backbone(cfg: RunConfig, model: nn.Module, device: torch.device) -> nn.Module:
    """:func:`~metatransfer.models.place_backbone` with the run's memory format and
    ``compile``."""
    return place_backbone(model, device, channels_last(cfg), cfg.compile)


def make_embedder(cfg: RunConfig, backbone: nn.Module, split: ImageSplit,
                  device: torch.device, feature_norm: str = "none") -> Embedder:
    """The validation embedder of a network being trained, normalising with ``split``'s
    statistics (a loaded model makes its own: :meth:`LoadedModel.embedder`)."""
    return Embedder(backbone, make_normalizer(cfg, split, device), device,
                    amp=use_amp(cfg, device), feature_norm=feature_norm, fold_bn=cfg.fold_bn)


def make_normalizer(cfg: RunConfig, split: ImageSplit, device: torch.device) -> Normalizer:
    """The training phases' normaliser: ``split``'s statistics, the run's memory format."""
    return Normalizer(split.mean, split.std, device, channels_last(cfg))


def validation_accuracy(method: FewShotMethod, embedder: Embedder, split: ImageSplit, ways: int,
                        shots: int, queries: int, episodes: int, seed: int) -> tuple[float, float]:
    """Mean and CI (percent) of ``method`` on seeded validation episodes.

    The episodes come from the ``selection`` stream (seed ``eval.val_seed``), never from
    the stream meta-test reports on.
    """
    sampler = EpisodeSampler(split.indices_by_class, ways, shots, queries, seed, split.name,
                             stream="selection")
    acc = evaluate_all_ranks(method, embedder, split, sampler, episodes)
    return mean_ci95(acc)
