"""What ``mtl export`` writes: the embedding network, or it and a fitted head.

Both take what the network takes, ``(n, channels, size, size)`` float32 images already
standardised (the preprocessing JSON beside the ONNX file says how), so the exported
graph is the network and nothing else: any runtime feeds it the way
``examples/onnx_predict.py`` does. :func:`fitted_head` turns the base learner
``mtl adapt`` fits on a support set into a fixed layer: a linear head (``mtl``, ``ft``)
or the class prototypes (``protonet``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..embedding import uses_batch_stats
from ..errors import MTLError
from ..learners import normalize_features
from .fold import fold_ss


class Embedding(nn.Module):
    """``(n, c, h, w)`` standardised images -> ``(n, D)`` float32 features: the backbone
    with SS folded in (:func:`fold_ss`), then the checkpoint's feature normalisation."""

    def __init__(self, backbone: nn.Module, feature_norm: str = "none") -> None:
        super().__init__()
        if uses_batch_stats(backbone):
            raise MTLError("this checkpoint's BatchNorm normalises with each call's batch "
                           "statistics, which a fixed ONNX graph cannot reproduce; export "
                           "a checkpoint with running BN statistics")
        self.backbone = copy.deepcopy(backbone).float().eval()
        self.backbone.to(memory_format=torch.contiguous_format)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        fold_ss(self.backbone)
        self.feature_norm = feature_norm

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return normalize_features(self.backbone(image).float(), self.feature_norm)


class LinearHead(nn.Module):
    """Logits ``f W^T + b`` of a fitted linear head (``mtl``, ``ft``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight.T + self.bias


class PrototypeHead(nn.Module):
    """Logits ``-||f - c_k||²`` to each class prototype ``c_k`` (``protonet``)."""

    def __init__(self, centroids: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centroids", centroids.detach().float().clone())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return -(feats[:, None, :] - self.centroids[None]).pow(2).sum(-1)


def fitted_head(method: str, learner) -> nn.Module:
    """The fixed head of a base learner fitted on one support set (one task)."""
    if method == "protonet":
        return PrototypeHead(learner.centroids[0])
    if method in ("mtl", "ft"):
        return LinearHead(learner.weight[0], learner.bias[0])
    raise MTLError(f"method '{method}' has no fixed head to export; use mtl, ft or protonet")


class Classifier(nn.Module):
    """``(n, c, h, w)`` standardised images -> ``(n, classes)`` probabilities."""

    def __init__(self, embedding: Embedding, head: nn.Module) -> None:
        super().__init__()
        self.embedding, self.head = embedding, head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.embedding(image)), dim=-1)
