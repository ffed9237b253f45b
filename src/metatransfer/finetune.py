"""``ft-all``: fine-tune the whole pre-trained backbone on each task (the paper's baseline).

Unlike the other methods the backbone changes per episode, so nothing can be embedded
once: each episode copies the pre-trained network, trains it and a zero-initialised
linear head on the support set for a few SGD steps, then classifies the queries. It is
far more expensive, so it runs on the first ``eval.ft_all_episodes`` of the shared
episodes (the same episodes the other methods see first).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.base import ImageSplit
from .data.episodes import EpisodeSampler
from .data.transforms import Normalizer, gather_uint8


def finetune_episode(
    backbone: nn.Module,
    split: ImageSplit,
    sampler: EpisodeSampler,
    episode: int,
    normalizer: Normalizer,
    device: torch.device,
    steps: int,
    lr: float,
) -> float:
    """Query accuracy of episode ``episode`` after fine-tuning a copy of ``backbone``."""
    batch = sampler.episode(episode)
    model = copy.deepcopy(backbone).to(device)
    model.eval()  # BN statistics of 5-25 support images would be noise: keep the base ones
    for p in model.parameters():
        p.requires_grad_(True)
    head = nn.Linear(model.out_dim, batch.ways).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=lr,
                                momentum=0.9)
    support = normalizer(gather_uint8(split, batch.support[0], device))
    labels = torch.as_tensor(batch.support_labels(), device=device)
    for _ in range(steps):
        loss = F.cross_entropy(head(model(support)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        query = normalizer(gather_uint8(split, batch.query[0], device))
        pred = head(model(query)).argmax(1)
    truth = torch.as_tensor(batch.query_labels(), device=device)
    return float((pred == truth).float().mean())


def evaluate_ft_all(
    backbone: nn.Module,
    split: ImageSplit,
    sampler: EpisodeSampler,
    episodes: np.ndarray,
    device: torch.device,
    steps: int,
    lr: float,
) -> np.ndarray:
    """Per-episode accuracies of ``ft-all`` on the given episode numbers."""
    normalizer = Normalizer(split.mean, split.std, device)
    return np.array([finetune_episode(backbone, split, sampler, int(i), normalizer, device,
                                      steps, lr) for i in episodes])
