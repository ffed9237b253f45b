"""Embedding images with a frozen backbone: the step every few-shot method starts from.

An :class:`Embedder` is a backbone plus what its inputs need (normalisation and memory
format, bf16 autocast) and what its features get (optional L2 normalisation). Meta-test
embeds each image once with it; ``ft-all`` fine-tunes a copy of its backbone instead.
The backbone runs in eval mode, so its BatchNorms are folded into their convs
(:func:`~metatransfer.models.fold.folded_bn`) unless ``fold_bn`` is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data.base import ImageSplit
from .data.transforms import Normalizer, gather_uint8
from .devices import autocast
from .learners import normalize_features
from .models.fold import folded_bn


@dataclass
class Embedder:
    """A frozen backbone plus the preprocessing its inputs need."""

    backbone: nn.Module
    normalizer: Normalizer
    device: torch.device
    amp: bool = False
    feature_norm: str = "none"
    fold_bn: bool = True

    def autocast(self):
        """bf16 autocast of the embed-once pass when ``amp`` (CUDA or a bf16-native CPU);
        the embeddings are returned as fp32 either way."""
        return autocast(self.amp, self.device)

    @torch.no_grad()
    def embed(self, split: ImageSplit, indices: np.ndarray, batch_size: int = 256,
              progress: bool = False) -> torch.Tensor:
        """``(len(indices), D)`` float32 embeddings of ``split.images[indices]``."""
        was_training = self.backbone.training
        self.backbone.eval()
        out = []
        chunks = range(0, len(indices), batch_size)
        for start in tqdm(chunks, desc="embed", disable=not progress, leave=False):
            images = self.normalizer(gather_uint8(split, indices[start:start + batch_size],
                                                  self.device))
            with self.autocast(), folded_bn(self.backbone, self.fold_bn):
                out.append(self.backbone(images).float())
        self.backbone.train(was_training)
        feats = torch.cat(out) if out else torch.zeros(0, 0, device=self.device)
        return normalize_features(feats, self.feature_norm)


def uses_batch_stats(backbone: nn.Module) -> bool:
    """Whether some BatchNorm normalises with per-call batch statistics (no running ones)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
               for m in backbone.modules())


def embed_one_call(embedder: Embedder, split: ImageSplit, indices: np.ndarray) -> torch.Tensor:
    """Embed ``indices`` in a single backbone call (their batch is the BN batch)."""
    return embedder.embed(split, np.asarray(indices), batch_size=max(len(indices), 1))
