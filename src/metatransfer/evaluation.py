"""Few-shot evaluation that embeds each image once.

With the backbone fixed, BN in eval mode and no augmentation, an image's embedding does
not depend on the episode it appears in. So we embed every image the episodes use once
(batched, no autograd), then run all episodes on the cached embeddings, adapting many
episodes' heads together in one batched inner loop. ``per_episode_accuracy`` is the
plain one-episode-at-a-time reference the fast path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data.base import ImageSplit
from .data.episodes import EpisodeBatch, EpisodeSampler
from .data.transforms import Normalizer, gather_uint8, to_device
from .devices import autocast
from .learners import episode_logits, normalize_features


@dataclass
class Embedder:
    """A frozen backbone plus the preprocessing its inputs need."""

    backbone: nn.Module
    normalizer: Normalizer
    device: torch.device
    amp: bool = False
    feature_norm: str = "none"

    def autocast(self):
        """bf16 autocast of the embed-once pass when ``amp`` (CUDA or a bf16-native CPU);
        the embeddings are returned as fp32 either way."""
        return autocast(self.amp, self.device)

    @torch.no_grad()
    def embed(self, split: ImageSplit, indices: np.ndarray, batch_size: int = 256,
              progress: bool = False) -> torch.Tensor:
        """``(len(indices), D)`` float32 embeddings of ``split.images[indices]``."""
        was_training = self.backbone.training
        self.backbone.eval()
        out = []
        chunks = range(0, len(indices), batch_size)
        for start in tqdm(chunks, desc="embed", disable=not progress, leave=False):
            images = self.normalizer(gather_uint8(split, indices[start:start + batch_size],
                                                  self.device))
            with self.autocast():
                out.append(self.backbone(images).float())
        self.backbone.train(was_training)
        feats = torch.cat(out) if out else torch.zeros(0, 0, device=self.device)
        return normalize_features(feats, self.feature_norm)


def episode_ids(count: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The episode numbers one process evaluates (all of them when not distributed)."""
    return np.arange(rank, count, world)


def evaluate(
    method: str,
    embedder: Embedder,
    split: ImageSplit,
    sampler: EpisodeSampler,
    episodes: np.ndarray | int,
    steps: int,
    lr: float,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
    episode_batch: int = 200,
    cache: dict | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Per-episode query accuracy (fractions) of ``method`` on the given episode numbers.

    ``cache`` (optional) maps image index -> row of already-computed embeddings for this
    embedder, so several methods or settings sharing a backbone embed each image once.
    """
    ids = np.arange(episodes) if isinstance(episodes, int) else np.asarray(episodes)
    if len(ids) == 0:
        return np.zeros(0)
    batch = EpisodeBatch.concat([sampler.episode(int(i)) for i in ids])
    support_labels = to_device(batch.support_labels(), embedder.device)
    query_labels = to_device(batch.query_labels(), embedder.device)
    ways = batch.ways
    if uses_batch_stats(embedder.backbone):
        # BN normalises with each call's batch statistics (the MTL authors' TensorFlow
        # model): an embedding depends on its batch, so embed each episode's support set
        # in one call and its query set in another, as their meta-test does; no cache
        def chunk_feats(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            tasks = range(start, min(start + episode_batch, batch.tasks))
            return (torch.stack([embed_one_call(embedder, split, batch.support[t])
                                 for t in tasks]),
                    torch.stack([embed_one_call(embedder, split, batch.query[t])
                                 for t in tasks]))
    else:
        feats, row_of = _embed_needed(embedder, split, batch, cache, progress)
        # feature rows of every episode, moved to the device in one transfer (no per-chunk
        # sync)
        support_rows = to_device(row_of[batch.support], feats.device)
        query_rows = to_device(row_of[batch.query], feats.device)

        def chunk_feats(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (feats[support_rows[start:start + episode_batch]],
                    feats[query_rows[start:start + episode_batch]])
    correct = []
    with torch.no_grad():
        for start in range(0, batch.tasks, episode_batch):
            support, query = chunk_feats(start)
            tasks = support.shape[0]
            logits = episode_logits(method, support, support_labels.expand(tasks, -1), query,
                                    ways, steps, lr, head)
            hits = (logits.argmax(-1) == query_labels).float().mean(1)
            correct.append(hits)
    return torch.cat(correct).cpu().numpy()


def evaluate_all_ranks(
    method: str,
    embedder: Embedder,
    split: ImageSplit,
    sampler: EpisodeSampler,
    count: int,
    steps: int,
    lr: float,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> np.ndarray:
    """``(count,)`` per-episode accuracies of episodes ``0 .. count-1``, data parallel.

    Under torchrun each rank evaluates its share (:func:`episode_ids`) and the shares are
    gathered, so every rank gets exactly the array one process would compute; alone, this
    is :func:`evaluate`. Every rank must call it (it is a collective).
    """
    from . import distributed

    ids = episode_ids(count, distributed.rank(), distributed.world_size())
    acc = evaluate(method, embedder, split, sampler, ids, steps, lr, head, **kwargs)
    return distributed.gather_by_index(ids, acc, count)


def uses_batch_stats(backbone: nn.Module) -> bool:
    """Whether some BatchNorm normalises with per-call batch statistics (no running ones)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
               for m in backbone.modules())


def embed_one_call(embedder: Embedder, split: ImageSplit, indices: np.ndarray) -> torch.Tensor:
    """Embed ``indices`` in a single backbone call (their batch is the BN batch)."""
    return embedder.embed(split, np.asarray(indices), batch_size=max(len(indices), 1))


def _embed_needed(embedder: Embedder, split: ImageSplit, batch, cache: dict | None,
                  progress: bool):
    """Embed the images ``batch`` uses (once each); return features and an index map."""
    needed = np.unique(np.concatenate([batch.support.ravel(), batch.query.ravel()]))
    if cache is not None and "indices" in cache:
        known = cache["indices"]
        missing = np.setdiff1d(needed, known)
        if len(missing):
            cache["feats"] = torch.cat([cache["feats"],
                                        embedder.embed(split, missing, progress=progress)])
            cache["indices"] = np.concatenate([known, missing])
        indices, feats = cache["indices"], cache["feats"]
    else:
        indices, feats = needed, embedder.embed(split, needed, progress=progress)
        if cache is not None:
            cache.update(indices=indices, feats=feats)
    row_of = np.full(len(split), -1, dtype=np.int64)
    row_of[indices] = np.arange(len(indices))
    return feats, row_of


def per_episode_accuracy(
    method: str,
    embedder: Embedder,
    split: ImageSplit,
    sampler: EpisodeSampler,
    episode: int,
    steps: int,
    lr: float,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """Reference path: embed one episode's images and evaluate it alone."""
    batch = sampler.episode(episode)
    support = embedder.embed(split, batch.support[0])[None]
    query = embedder.embed(split, batch.query[0])[None]
    labels = torch.as_tensor(batch.support_labels(), device=embedder.device)[None]
    with torch.no_grad():
        logits = episode_logits(method, support, labels, query, batch.ways, steps, lr, head)
    truth = torch.as_tensor(batch.query_labels(), device=embedder.device)
    return float((logits[0].argmax(-1) == truth).float().mean())
