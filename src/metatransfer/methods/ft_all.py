"""``ft-all``: fine-tune the whole pre-trained backbone on each task (the paper's baseline).

Unlike the other methods the backbone changes per episode, so nothing can be embedded
once: each episode copies the pre-trained network, fits ``ft``'s head on its frozen
support features (the same inner loop, feature normalisation included), then trains the
backbone and that head together on the support set for a few steps, and classifies the
queries. Starting from ``ft``'s solution ("linear probe, then fine-tune") makes zero
fine-tuning steps exactly ``ft``: a zero head trained jointly with the backbone at one
small learning rate left the head near zero and scored at chance on an ImageNet network
fed characters. It is far more expensive, so it runs on the first
``eval.ft_all_episodes`` of the shared episodes (the same episodes the other methods see
first).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..config import EvalConfig
from ..data.base import ImageSplit
from ..data.episodes import EpisodeBatch
from ..data.transforms import gather_uint8
from ..embedding import Embedder
from ..learners import normalize_features
from .base import FewShotMethod
from .ft import FineTune
from .registry import register_method


@register_method("ft-all")
class FineTuneAll(FewShotMethod):
    """``ft``'s head on the frozen features, then ``steps`` joint steps: the backbone by SGD
    (momentum 0.9, lr ``lr``), the head by ``ft``'s plain SGD at ``head_lr``; on the first
    ``episodes`` episodes."""

    embeds_once = False
    offer_rank = 3

    def __init__(self, steps: int, lr: float, episodes: int | None = None,
                 head_steps: int = 100, head_lr: float = 0.01) -> None:
        self.steps, self.lr, self.max_episodes = steps, lr, episodes
        self.head_steps, self.head_lr = head_steps, head_lr

    @classmethod
    def from_config(cls, ec: EvalConfig, head=None) -> FineTuneAll:
        ft = FineTune.from_config(ec)
        return cls(ec.ft_all_steps, ec.ft_all_lr, ec.ft_all_episodes, ft.steps, ft.lr)

    def episode_accuracy(self, embedder: Embedder, split: ImageSplit,
                         batch: EpisodeBatch) -> float:
        """Query accuracy of ``batch`` (one episode) after fine-tuning a copy of the
        embedder's backbone on its support images (fp32, whatever the embedder's amp)."""
        device, normalizer, norm = embedder.device, embedder.normalizer, embedder.feature_norm
        model = copy.deepcopy(embedder.backbone).to(device)
        model.eval()  # BN statistics of 5-25 support images would be noise: keep the base ones
        for p in model.parameters():
            p.requires_grad_(True)
        support = normalizer(gather_uint8(split, batch.support[0], device))
        labels = torch.as_tensor(batch.support_labels(), device=device)

        def features(images: torch.Tensor) -> torch.Tensor:
            return normalize_features(model(images).float(), norm)

        with torch.no_grad():
            frozen = features(support)
        probe = FineTune(self.head_steps, self.head_lr).fit(frozen[None], labels[None],
                                                            batch.ways)  # one task
        weight = probe.weight[0].detach().clone().requires_grad_(True)
        bias = probe.bias[0].detach().clone().requires_grad_(True)
        backbone_opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)
        head_opt = torch.optim.SGD([weight, bias], lr=self.head_lr)
        for _ in range(self.steps):
            loss = F.cross_entropy(F.linear(features(support), weight, bias), labels)
            backbone_opt.zero_grad(set_to_none=True)
            head_opt.zero_grad(set_to_none=True)
            loss.backward()
            backbone_opt.step()
            head_opt.step()
        with torch.no_grad():
            query = normalizer(gather_uint8(split, batch.query[0], device))
            pred = F.linear(features(query), weight, bias).argmax(1)
        truth = torch.as_tensor(batch.query_labels(), device=device)
        return float((pred == truth).float().mean())
