"""Episode sampling (N-way K-shot) and the hard-task (HT) meta-batch.

Episode ``i`` of a sampler is a pure function of ``(seed, stream, i)``: evaluation episodes
are reproducible and identical for every method, training resumes at any episode, and
episodes can be split across processes without changing them. The ``selection`` stream
(validation during training) is seeded apart from the ``test`` stream (reported
episodes), so checkpoint selection never sees the episodes a report is made of, even with
equal seeds.
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


STREAMS = {"test": (), "selection": (0x5E1EC7,)}  # extra entropy words per stream


class EpisodeSampler:
    """Draws ``ways``-way ``shots``-shot episodes with ``queries`` queries per class.

    ``stream``: ``test`` for reported episodes (meta-test), ``selection`` for the
    validation episodes that pick checkpoints during training.
    """

    def __init__(
        self,
        indices_by_class: list[np.ndarray],
        ways: int,
        shots: int,
        queries: int,
        seed: int,
        name: str = "split",
        stream: str = "test",
    ) -> None:
        if stream not in STREAMS:
            raise ValueError(f"unknown episode stream '{stream}' ({' | '.join(STREAMS)})")
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
        self.stream = stream

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *STREAMS[self.stream], i])

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


def completion_order(batch: EpisodeBatch, pred: np.ndarray,
                     accuracy: np.ndarray | None = None) -> list[int]:
    """The meta-batch's classes ranked for completing a hard task, hardest first.

    A class ranks by how often it was confused with its task's failure class (queries of
    the failure class predicted as it, plus its queries predicted as the failure class),
    then by its own query accuracy (lowest first), then by first appearance. So a hard
    task short of failure classes is completed with the classes the base learner mixes
    up with them, never with random (easy) ones. ``accuracy``: the tasks' per-class
    accuracy when the caller already has it.
    """
    labels = np.broadcast_to(batch.query_labels(), pred.shape)
    if accuracy is None:
        accuracy = per_class_accuracy(pred, labels, batch.ways)
    failures = accuracy.argmin(1)
    confusion: dict[int, int] = {}
    worst: dict[int, float] = {}
    for t in range(batch.tasks):
        f = failures[t]
        for j in range(batch.ways):
            cls = int(batch.classes[t, j])
            mixed = int(((labels[t] == f) & (pred[t] == j)).sum()
                        + ((labels[t] == j) & (pred[t] == f)).sum()) if j != f else 0
            confusion[cls] = confusion.get(cls, 0) + mixed
            worst[cls] = min(worst.get(cls, 1.0), float(accuracy[t, j]))
    first = {cls: i for i, cls in enumerate(confusion)}  # dicts keep first appearance
    return sorted(first, key=lambda c: (-confusion[c], worst[c], first[c]))


def hard_tasks(
    batch: EpisodeBatch,
    pred: np.ndarray,
    count: int,
    variant: HTVariant,
    sampler: EpisodeSampler,
    rng: np.random.Generator,
) -> EpisodeBatch:
    """Build ``count`` hard tasks from the failure classes of ``batch``'s tasks.

    ``pred``: ``(T, n_query)`` the tasks' query predictions (episode labels). Each hard
    task holds every distinct failure class (a random subset when there are more than
    ``ways``); when there are fewer, it is completed with the meta-batch classes most
    confused with the failure classes (:func:`completion_order`). ``reuse`` takes the
    images the failing tasks used, in the same support/query roles; ``resample`` draws
    fresh images of the same classes (the authors found it better).
    """
    if variant == "off" or count == 0:
        return EpisodeBatch(*(np.zeros((0, n), np.int64) for n in
                              (batch.ways, batch.support.shape[1], batch.query.shape[1])))
    ways, shots, queries = batch.ways, batch.shots, batch.queries
    accuracy = per_class_accuracy(pred, np.broadcast_to(batch.query_labels(), pred.shape), ways)
    failures = accuracy.argmin(1)  # failure_classes, from the accuracy computed once
    failed = list(dict.fromkeys(int(batch.classes[t, f]) for t, f in enumerate(failures)))
    ranked = completion_order(batch, pred, accuracy)
    # where each class of the meta-batch appeared first: (task, column)
    seen: dict[int, tuple[int, int]] = {}
    for t in range(batch.tasks):
        for j in range(ways):
            seen.setdefault(int(batch.classes[t, j]), (t, j))
    tasks = []
    for _ in range(count):
        chosen = list(rng.permutation(failed)[:ways]) if len(failed) > ways else list(failed)
        chosen = [int(c) for c in chosen]
        chosen += [c for c in ranked if c not in chosen][: ways - len(chosen)]
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
