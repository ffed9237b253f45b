"""The interface every few-shot method implements (easyfsl's shape, batched over episodes).

A method sees a batch of ``T`` episodes at a time: :meth:`FewShotMethod.fit` on their
support features ``(T, S, D)`` and labels ``(T, S)``, then :meth:`FewShotMethod.logits` of
their query features ``(T, Q, D)``, ``(T, Q, N)``. What a method needs from the tools is
class metadata: which trained network it runs on (:data:`META`: the SS backbone and θ_0 of
meta-training; :data:`PRETRAINED`: the plain pre-trained one), whether it needs θ_0, and
whether it can work on embeddings computed once (a method that changes the backbone per
episode cannot, and scores whole episodes in :meth:`FewShotMethod.episode_accuracy`).

Each instance carries its own settings (inner-loop steps, learning rate, θ_0), built from
the evaluation config by :meth:`FewShotMethod.from_config`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from ..config import EvalConfig
    from ..data.base import ImageSplit
    from ..data.episodes import EpisodeBatch
    from ..embedding import Embedder

    Head = tuple[torch.Tensor, torch.Tensor]

META = "meta"  # the meta-trained network: SS backbone (+ θ_0)
PRETRAINED = "pretrained"  # the pre-trained network, without SS


class FewShotMethod:
    """Base of the few-shot methods; subclasses register with ``@register_method``."""

    name: ClassVar[str] = ""  # set by register_method
    #: the network it runs on: META or PRETRAINED
    model: ClassVar[str] = PRETRAINED
    #: whether it needs the meta-learned head θ_0 (then ``model`` is META)
    needs_head: ClassVar[bool] = False
    #: whether the backbone is fixed, so each image is embedded once for all episodes
    embeds_once: ClassVar[bool] = True
    #: the order ``mtl adapt`` / ``mtl serve`` offer methods in (lower first); the first
    #: one a checkpoint supports is their default
    offer_rank: ClassVar[int] = 100
    #: evaluate at most this many of the shared episodes (None: all of them)
    max_episodes: int | None = None

    @classmethod
    def from_config(cls, ec: EvalConfig, head: Head | None = None) -> FewShotMethod:
        """The method with its settings from the evaluation config (``eval.*``)."""
        return cls()

    def fit(self, support: torch.Tensor, labels: torch.Tensor, ways: int) -> FewShotMethod:
        """Adapt to ``T`` episodes' support features ``(T, S, D)``, labels ``(T, S)`` in
        ``[0, ways)``; returns ``self``."""
        raise NotImplementedError(f"method '{self.name}' does not work on embeddings")

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(T, Q, N)`` logits of the fitted episodes' query features ``(T, Q, D)``."""
        raise NotImplementedError(f"method '{self.name}' does not work on embeddings")

    def episode_accuracy(self, embedder: Embedder, split: ImageSplit,
                         batch: EpisodeBatch) -> float:
        """Query accuracy of one episode from its images (methods that cannot embed once)."""
        raise NotImplementedError(f"method '{self.name}' embeds once; use fit and logits")
