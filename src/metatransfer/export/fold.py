"""Folding scaling and shifting into the weights: ``(W ⊙ Φ_S1, b + Φ_S2)``.

An SS layer computes ``(W ⊙ Φ_S1) * X + (b + Φ_S2)`` (:mod:`metatransfer.models.ss`):
once meta-training is over, Φ_S1 and Φ_S2 are constants, so the layer *is* a plain conv
(or linear layer) with weight ``W ⊙ Φ_S1`` and bias ``b + Φ_S2``. Folding them in gives
an exported network nothing but standard operators (ONNX has no SS), with the same
function: bit for bit for the built-in :class:`~metatransfer.models.ss.SSConv2d` (its
forward computes these very products), to float rounding for SS attached to another
network's layers (whose forward adds Φ_S2 after the layer instead of inside it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.ss import ScaleShift


@torch.no_grad()
def fold_ss(network: nn.Module) -> int:
    """Fold every enabled SS layer of ``network`` into its weight and bias, in place;
    returns how many layers were folded. Afterwards the network has no SS parameters and
    computes what it computed before (each layer's own forward runs, SS disabled)."""
    folded = 0
    for layer in network.modules():
        if not isinstance(layer, ScaleShift) or not layer.ss_enabled:
            continue
        weight = layer.weight * layer.ss_scale  # Φ_S1 broadcasts over the kernel
        bias = layer.ss_shift if layer.bias is None else layer.bias + layer.ss_shift
        layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        layer.ss_scale = None  # the registered parameters become None: SS off
        layer.ss_shift = None
        folded += 1
    return folded
