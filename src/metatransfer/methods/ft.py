"""``ft``: the same inner loop as ``mtl``, from a zero head, on the pre-trained features.

The paper's "fine-tune the classifier" baseline: what meta-transfer adds is measured as
``mtl - ft`` on the same episodes.
"""

from __future__ import annotations

import torch

from ..config import EvalConfig
from ..learners import adapt, linear_logits
from .base import FewShotMethod
from .registry import register_method


@register_method("ft")
class FineTune(FewShotMethod):
    """``steps`` SGD steps (lr ``lr``) of a zero-initialised linear head per episode."""

    offer_rank = 2

    def __init__(self, steps: int, lr: float) -> None:
        self.steps, self.lr = steps, lr

    @classmethod
    def from_config(cls, ec: EvalConfig, head=None) -> FineTune:
        """``eval.ft_inner_steps`` / ``ft_inner_lr`` when set (a baseline tuned on its
        own), else the inner loop ``mtl`` evaluates with."""
        steps = ec.inner_steps if ec.ft_inner_steps is None else ec.ft_inner_steps
        lr = ec.inner_lr if ec.ft_inner_lr is None else ec.ft_inner_lr
        return cls(steps, lr)

    def fit(self, support: torch.Tensor, labels: torch.Tensor, ways: int) -> FineTune:
        weight0 = support.new_zeros(ways, support.shape[-1])
        bias0 = support.new_zeros(ways)
        self.weight, self.bias = adapt(weight0, bias0, support, labels, ways, self.steps,
                                       self.lr, first_order=True)
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return linear_logits(self.weight, self.bias, query)
