"""``protonet``: nearest class centroid (Snell et al., NeurIPS 2017) on pre-trained features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FewShotMethod
from .registry import register_method


@register_method("protonet")
class ProtoNet(FewShotMethod):
    """Logits are negative squared distances to each class's mean support feature."""

    offer_rank = 1

    def fit(self, support: torch.Tensor, labels: torch.Tensor, ways: int) -> ProtoNet:
        onehot = F.one_hot(labels, ways).to(support.dtype)  # (T, S, N)
        self.centroids = (torch.bmm(onehot.transpose(1, 2), support)
                          / onehot.sum(1).unsqueeze(-1))  # (T, N, D)
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(query, self.centroids).pow(2)
