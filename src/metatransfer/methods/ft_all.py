"""``ft-all``: fine-tune the whole pre-trained backbone on each task (the paper's baseline).

Unlike the other methods the backbone changes per episode, so nothing can be embedded
once: each episode copies the pre-trained network, trains it and a zero-initialised
linear head on the support set for a few SGD steps, then classifies the queries. It is
far more expensive, so it runs on the first ``eval.ft_all_episodes`` of the shared
episodes (the same episodes the other methods see first).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EvalConfig
from ..data.base import ImageSplit
from ..data.episodes import EpisodeBatch
from ..data.transforms import gather_uint8
from ..embedding import Embedder
from .base import FewShotMethod
from .registry import register_method


@register_method("ft-all")
class FineTuneAll(FewShotMethod):
    """``steps`` SGD steps (momentum 0.9, lr ``lr``) of a copy of the backbone and a zero
    head per episode, on the first ``episodes`` episodes."""

    embeds_once = False
    offer_rank = 3

    def __init__(self, steps: int, lr: float, episodes: int | None = None) -> None:
        self.steps, self.lr, self.max_episodes = steps, lr, episodes

    @classmethod
    def from_config(cls, ec: EvalConfig, head=None) -> FineTuneAll:
        return cls(ec.ft_all_steps, ec.ft_all_lr, ec.ft_all_episodes)

    def episode_accuracy(self, embedder: Embedder, split: ImageSplit,
                         batch: EpisodeBatch) -> float:
        """Query accuracy of ``batch`` (one episode) after fine-tuning a copy of the
        embedder's backbone on its support images (fp32, whatever the embedder's amp)."""
        device, normalizer = embedder.device, embedder.normalizer
        model = copy.deepcopy(embedder.backbone).to(device)
        model.eval()  # BN statistics of 5-25 support images would be noise: keep the base ones
        for p in model.parameters():
            p.requires_grad_(True)
        head = nn.Linear(model.out_dim, batch.ways).to(device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=self.lr,
                                    momentum=0.9)
        support = normalizer(gather_uint8(split, batch.support[0], device))
        labels = torch.as_tensor(batch.support_labels(), device=device)
        for _ in range(self.steps):
            loss = F.cross_entropy(head(model(support)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            query = normalizer(gather_uint8(split, batch.query[0], device))
            pred = head(model(query)).argmax(1)
        truth = torch.as_tensor(batch.query_labels(), device=device)
        return float((pred == truth).float().mean())
