"""``mtl``: the base learner of meta-transfer learning (Sun et al., CVPR 2019, Alg. 2).

On the SS-modulated backbone's features, a linear head starts from the meta-learned θ_0
and takes ``steps`` SGD steps (lr β) on each episode's support cross-entropy.
"""

from __future__ import annotations

import torch

from ..config import EvalConfig
from ..errors import MTLError
from ..learners import adapt, linear_logits
from .base import META, FewShotMethod
from .registry import register_method


def head_for_ways(weight0: torch.Tensor, bias0: torch.Tensor, ways: int):
    """theta_0 for ``ways`` classes: itself when it has that many rows, else its mean row.

    theta_0 is learned on episodes whose labels are random permutations, so its rows are
    exchangeable; the mean row is the natural start for a different number of ways.
    """
    if weight0.shape[0] == ways:
        return weight0, bias0
    return (weight0.mean(0, keepdim=True).expand(ways, -1).contiguous(),
            bias0.mean().expand(ways).contiguous())


@register_method("mtl")
class MTL(FewShotMethod):
    """Inner loop from θ_0 (``head``: weight ``(N, D)``, bias ``(N,)``)."""

    model = META
    needs_head = True
    offer_rank = 0

    def __init__(self, head: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float) -> None:
        if head is None:
            raise MTLError("method 'mtl' needs the meta-learned head theta_0: give a "
                           "meta-trained checkpoint")
        self.head, self.steps, self.lr = head, steps, lr

    @classmethod
    def from_config(cls, ec: EvalConfig, head=None) -> MTL:
        return cls(head, ec.inner_steps, ec.inner_lr)

    def fit(self, support: torch.Tensor, labels: torch.Tensor, ways: int) -> MTL:
        weight0, bias0 = head_for_ways(*self.head, ways)
        self.weight, self.bias = adapt(weight0, bias0, support, labels, ways, self.steps,
                                       self.lr, first_order=True)
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return linear_logits(self.weight, self.bias, query)
