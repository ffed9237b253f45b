"""Per-task adaptation on embeddings, batched over tasks (the base learner of MTL).

Only the linear classifier theta changes in the inner loop, so each task's images are
embedded once and every inner step is two small batched matmuls. The cross-entropy
gradient is written out (``(softmax - onehot) / n``) instead of calling autograd per
step: the same numbers, several times faster, and still differentiable by autograd, which
is what the second-order meta-gradient needs. First order simply detaches it. With fewer
support images than feature dimensions the loop runs in the span of the support features
(``_adapt_dual``): the same numbers for a fraction of the work. The few-shot methods
built on this loop (``mtl``, ``ft``) are in :mod:`metatransfer.methods`.

Shapes: ``T`` tasks, ``S`` support and ``Q`` query images per task, ``D`` feature
dimension, ``N`` ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_logits(weight: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """``(T, M, N)`` logits of features ``(T, M, D)`` under per-task ``(T, N, D)``, ``(T, N)``."""
    return torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))


def cross_entropy_grads(
    weight: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of each task's mean cross-entropy w.r.t. its ``weight`` and ``bias``.

    ``targets``: ``(T, S, N)`` one-hot labels. Equal to ``torch.autograd.grad`` of
    ``F.cross_entropy`` per task (a test checks this).
    """
    probs = torch.softmax(linear_logits(weight, bias, feats), dim=-1)
    delta = (probs - targets) / feats.shape[1]  # (T, S, N)
    return torch.bmm(delta.transpose(1, 2), feats), delta.sum(1)


def adapt(
    weight0: torch.Tensor,
    bias0: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    ways: int,
    steps: int,
    lr: float,
    first_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner loop: ``steps`` SGD steps of the linear head on each task's support set.

    Args:
        weight0: ``(N, D)`` shared or ``(T, N, D)`` per-task initial weight (theta_0).
        bias0: ``(N,)`` or ``(T, N)``.
        feats: ``(T, S, D)`` support embeddings.
        labels: ``(T, S)`` episode labels in ``[0, N)``.
        first_order: treat the inner gradients as constants (the authors' PyTorch code);
            otherwise the result is differentiable through every step (second order).

    Returns: adapted ``(T, N, D)`` weight and ``(T, N)`` bias.
    """
    tasks, n_support, dim = feats.shape
    weight = weight0.expand(tasks, *weight0.shape[-2:]) if weight0.dim() == 2 else weight0
    bias = bias0.expand(tasks, bias0.shape[-1]) if bias0.dim() == 1 else bias0
    targets = F.one_hot(labels, ways).to(feats.dtype)
    if 0 < steps and n_support < dim:
        return _adapt_dual(weight, bias, feats, targets, steps, lr, first_order)
    for _ in range(steps):
        grad_w, grad_b = cross_entropy_grads(weight, bias, feats, targets)
        if first_order:
            grad_w, grad_b = grad_w.detach(), grad_b.detach()
        weight = weight - lr * grad_w
        bias = bias - lr * grad_b
    return weight, bias


def _adapt_dual(weight: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor,
                targets: torch.Tensor, steps: int, lr: float, first_order: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`adapt` in the span of the support features: the same result, less work.

    Every gradient step adds ``delta^T feats`` to the weight, so after any number of steps
    ``weight = weight0 + coef @ feats`` with ``coef`` of shape ``(T, N, S)``, and the
    support logits are ``feats @ weight0^T + gram @ coef^T + bias`` with the ``(T, S, S)``
    Gram matrix. Each step then costs ``O(S^2 N)`` instead of ``O(S N D)`` per task (5-way
    1-shot on 640-d features: 25 vs 3,200 multiply-adds per row), and the second-order
    graph keeps ``(T, N, S)`` instead of ``(T, N, D)`` tensors per step.

    The bias is the weight of a constant feature 1, so its updates (``delta`` summed over
    the support set) live in the same ``coef``: the Gram matrix gets a 1 added to every
    entry. A step is then four tensor ops (logits, softmax, residual, update) instead of
    eleven; at these sizes each op costs its dispatch rather than its arithmetic, in the
    forward loop and in the second-order backward alike.
    """
    if first_order:  # the update is a constant: compute it without a graph
        with torch.no_grad():
            step_w, step_b = _adapt_dual(weight.detach(), bias.detach(), feats.detach(),
                                         targets, steps, lr, False)
            step_w, step_b = step_w - weight, step_b - bias
        return weight + step_w, bias + step_b
    gram = torch.bmm(feats, feats.transpose(1, 2)) + 1  # (T, S, S), the bias's feature 1 in it
    base = torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))  # (T, S, N)
    coef_t = feats.new_zeros(targets.shape)  # (T, S, N): coef transposed
    step = lr / feats.shape[1]  # the mean over the support set
    for _ in range(steps):
        probs = torch.softmax(torch.baddbmm(base, gram, coef_t), dim=-1)
        coef_t = torch.add(coef_t, probs - targets, alpha=-step)
    return torch.baddbmm(weight, coef_t.transpose(1, 2), feats), bias + coef_t.sum(1)


def normalize_features(feats: torch.Tensor, mode: str) -> torch.Tensor:
    """Optional L2 normalisation of embeddings before the base learner."""
    if mode == "l2":
        return F.normalize(feats, dim=-1)
    if mode != "none":
        raise ValueError(f"unknown feature_norm '{mode}' (none | l2)")
    return feats
