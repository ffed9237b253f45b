"""Episode sampling (N-way K-shot) and the hard-task (HT) meta-batch.

Episode ``i`` of a sampler is a pure function of ``(seed, i)``: evaluation episodes are
reproducible and identical for every method, training resumes at any episode, and
episodes can be split across processes without changing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import DataError


@dataclass
class EpisodeBatch:
    """``T`` episodes of the same shape, as split-level image indices.

    Attributes:
        classes: ``(T, ways)`` class ids of the split; column ``j`` is episode label ``j``.
        support: ``(T, ways * shots)`` image indices, class-major (label ``i // shots``).
        query: ``(T, ways * queries)`` image indices, class-major.
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray

    @property
    def tasks(self) -> int:
        return self.classes.shape[0]

    @property
    def ways(self) -> int:
        return self.classes.shape[1]

    @property
    def shots(self) -> int:
        return self.support.shape[1] // self.ways

    @property
    def queries(self) -> int:
        return self.query.shape[1] // self.ways

    def support_labels(self) -> np.ndarray:
        """``(ways * shots,)`` episode labels of the support set."""
        return np.repeat(np.arange(self.ways), self.shots)

    def query_labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.ways), self.queries)

    def __getitem__(self, item) -> EpisodeBatch:
        return EpisodeBatch(self.classes[item], self.support[item], self.query[item])

    @staticmethod
    def concat(batches: list[EpisodeBatch]) -> EpisodeBatch:
        return EpisodeBatch(
            np.concatenate([b.classes for b in batches]),
            np.concatenate([b.support for b in batches]),
            np.concatenate([b.query for b in batches]),
        )


class EpisodeSampler:
    """Draws ``ways``-way ``shots``-shot episodes with ``queries`` queries per class."""

    def __init__(
        self,
        indices_by_class: list[np.ndarray],
        ways: int,
        shots: int,
        queries: int,
        seed: int,
        name: str = "split",
    ) -> None:
        if ways < 2 or shots < 1 or queries < 1:
            raise DataError(
                f"impossible episode shape: {ways}-way {shots}-shot with {queries} queries; "
                "ways must be >= 2, shots and queries >= 1"
            )
        per_class = shots + queries
        self.eligible = np.array(
            [c for c, idx in enumerate(indices_by_class) if len(idx) >= per_class], dtype=np.int64
        )
        if len(self.eligible) < ways:
            raise DataError(
                f"{name}: {ways}-way episodes with {shots} shots + {queries} queries need "
                f"{ways} classes with >= {per_class} images, but only {len(self.eligible)} "
                f"of {len(indices_by_class)} classes have that many; lower ways, shots or queries"
            )
        self.indices_by_class = indices_by_class
        self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i])

    def draw_images(self, cls: int, count: int, rng: np.random.Generator) -> np.ndarray:
        pool = self.indices_by_class[cls]
        return pool[rng.choice(len(pool), size=count, replace=False)]

    def episode(self, i: int) -> EpisodeBatch:
        """Episode number ``i`` (a batch of one)."""
        rng = self._rng(i)
        classes = rng.choice(self.eligible, size=self.ways, replace=False)
        support, query = [], []
        for cls in classes:
            picked = self.draw_images(int(cls), self.shots + self.queries, rng)
            support.append(picked[: self.shots])
            query.append(picked[self.shots:])
        return EpisodeBatch(
            classes[None], np.concatenate(support)[None], np.concatenate(query)[None]
        )

    def batch(self, start: int, count: int) -> EpisodeBatch:
        """Episodes ``start .. start + count - 1`` stacked."""
        return EpisodeBatch.concat([self.episode(i) for i in range(start, start + count)])


# ------------------------------------------------------------------------ hard tasks

HTVariant = Literal["off", "reuse", "resample"]


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, ways: int) -> np.ndarray:
    """``(T, ways)`` query accuracy of each class of each task.

    ``pred``, ``labels``: ``(T, n_query)`` predicted and true episode labels.
    """
    correct = (pred == labels).astype(np.float64)
    onehot = labels[..., None] == np.arange(ways)
    counts = onehot.sum(1)
    return (correct[..., None] * onehot).sum(1) / np.maximum(counts, 1)


def failure_classes(pred: np.ndarray, labels: np.ndarray, ways: int) -> np.ndarray:
    """``(T,)`` episode label of each task's worst class (first one on ties)."""
    return per_class_accuracy(pred, labels, ways).argmin(1)


def hard_tasks(
    batch: EpisodeBatch,
    failures: np.ndarray,
    count: int,
    variant: HTVariant,
    sampler: EpisodeSampler,
    rng: np.random.Generator,
) -> EpisodeBatch:
    """Build ``count`` hard tasks from the failure classes of ``batch``'s tasks.

    Each hard task contains every distinct failure class (a random subset when there are
    more than ``ways``), completed to ``ways`` classes. ``reuse`` takes the images the
    failing tasks used (completion classes come from the meta-batch's other classes, with
    their images); ``resample`` draws fresh images (completion classes from the whole
    split). Support/query roles are kept under ``reuse``.
    """
    if variant == "off" or count == 0:
        return EpisodeBatch(*(np.zeros((0, n), np.int64) for n in
                              (batch.ways, batch.support.shape[1], batch.query.shape[1])))
    ways, shots, queries = batch.ways, batch.shots, batch.queries
    failed = list(dict.fromkeys(int(batch.classes[t, f]) for t, f in enumerate(failures)))
    # where each class of the meta-batch appeared first: (task, column)
    seen: dict[int, tuple[int, int]] = {}
    for t in range(batch.tasks):
        for j in range(ways):
            seen.setdefault(int(batch.classes[t, j]), (t, j))
    tasks = []
    for _ in range(count):
        chosen = list(rng.permutation(failed)[:ways]) if len(failed) > ways else list(failed)
        if variant == "reuse":
            others = [c for c in seen if c not in chosen]
        else:
            others = [int(c) for c in sampler.eligible if int(c) not in chosen]
        need = ways - len(chosen)
        if need > len(others):
            raise DataError(f"cannot complete a {ways}-way hard task: too few classes")
        chosen += [int(c) for c in rng.choice(others, size=need, replace=False)]
        chosen = [int(c) for c in rng.permutation(chosen)]
        support, query = [], []
        for cls in chosen:
            if variant == "reuse":
                t, j = seen[cls]
                support.append(batch.support[t, j * shots:(j + 1) * shots])
                query.append(batch.query[t, j * queries:(j + 1) * queries])
            else:
                picked = sampler.draw_images(cls, shots + queries, rng)
                support.append(picked[:shots])
                query.append(picked[shots:])
        tasks.append(EpisodeBatch(np.array([chosen]), np.concatenate(support)[None],
                                  np.concatenate(query)[None]))
    return EpisodeBatch.concat(tasks)
