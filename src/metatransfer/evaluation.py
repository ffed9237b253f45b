"""Few-shot evaluation that embeds each image once.

With the backbone fixed, BN in eval mode and no augmentation, an image's embedding does
not depend on the episode it appears in. So we embed every image the episodes use once
(batched, no autograd), then run all episodes on the cached embeddings: a method
(:class:`~metatransfer.methods.FewShotMethod`) fits many episodes' support sets together
and gives their query logits in one batched call. ``per_episode_accuracy`` is the plain
one-episode-at-a-time reference the fast path is tested against.
"""

from __future__ import annotations

import numpy as np
import torch

from .data.base import ImageSplit
from .data.episodes import EpisodeBatch, EpisodeSampler
from .data.transforms import to_device
from .embedding import Embedder, embed_one_call, uses_batch_stats
from .methods.base import FewShotMethod


def episode_ids(count: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The episode numbers one process evaluates (all of them when not distributed)."""
    return np.arange(rank, count, world)


def evaluate(
    method: FewShotMethod,
    embedder: Embedder,
    split: ImageSplit,
    sampler: EpisodeSampler,
    episodes: np.ndarray | int,
    episode_batch: int = 200,
    cache: dict | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Per-episode query accuracy (fractions) of ``method`` on the given episode numbers.

    ``cache`` (optional) maps image index -> row of already-computed embeddings for this
    embedder, so several methods or settings sharing a backbone embed each image once. A
    method that cannot embed once (``ft-all``) scores each episode from its images.
    """
    ids = np.arange(episodes) if isinstance(episodes, int) else np.asarray(episodes)
    if len(ids) == 0:
        return np.zeros(0)
    if not method.embeds_once:
        return np.array([method.episode_accuracy(embedder, split, sampler.episode(int(i)))
                         for i in ids])
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
            logits = method.fit(support, support_labels.expand(tasks, -1), ways).logits(query)
            hits = (logits.argmax(-1) == query_labels).float().mean(1)
            correct.append(hits)
    return torch.cat(correct).cpu().numpy()


def evaluate_all_ranks(
    method: FewShotMethod,
    embedder: Embedder,
    split: ImageSplit,
    sampler: EpisodeSampler,
    count: int,
    **kwargs,
) -> np.ndarray:
    """``(count,)`` per-episode accuracies of episodes ``0 .. count-1``, data parallel.

    Under torchrun each rank evaluates its share (:func:`episode_ids`) and the shares are
    gathered, so every rank gets exactly the array one process would compute; alone, this
    is :func:`evaluate`. Every rank must call it (it is a collective).
    """
    from . import distributed

    ids = episode_ids(count, distributed.rank(), distributed.world_size())
    acc = evaluate(method, embedder, split, sampler, ids, **kwargs)
    return distributed.gather_by_index(ids, acc, count)


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
    method: FewShotMethod,
    embedder: Embedder,
    split: ImageSplit,
    sampler: EpisodeSampler,
    episode: int,
) -> float:
    """Reference path: embed one episode's images and evaluate it alone."""
    batch = sampler.episode(episode)
    if not method.embeds_once:
        return method.episode_accuracy(embedder, split, batch)
    support = embedder.embed(split, batch.support[0])[None]
    query = embedder.embed(split, batch.query[0])[None]
    labels = torch.as_tensor(batch.support_labels(), device=embedder.device)[None]
    with torch.no_grad():
        logits = method.fit(support, labels, batch.ways).logits(query)
    truth = torch.as_tensor(batch.query_labels(), device=embedder.device)
    return float((logits[0].argmax(-1) == truth).float().mean())
