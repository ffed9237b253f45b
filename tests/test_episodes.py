"""Episode sampler and hard-task construction."""

from __future__ import annotations

import numpy as np
import pytest

from metatransfer.data.episodes import (
    EpisodeBatch,
    EpisodeSampler,
    completion_order,
    failure_classes,
    hard_tasks,
    per_class_accuracy,
)
from metatransfer.errors import DataError

LABELS = np.repeat(np.arange(10), 20)
BY_CLASS = [np.flatnonzero(LABELS == c) for c in range(10)]


def test_episode_shapes_labels_and_disjoint_sets():
    sampler = EpisodeSampler(BY_CLASS, ways=5, shots=3, queries=4, seed=0)
    batch = sampler.batch(0, 6)
    assert batch.classes.shape == (6, 5)
    assert batch.support.shape == (6, 15) and batch.query.shape == (6, 20)
    assert list(batch.support_labels()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    for t in range(6):
        assert len(set(batch.classes[t])) == 5
        assert not set(batch.support[t]) & set(batch.query[t])
        # every image belongs to the class its episode label names
        assert np.array_equal(LABELS[batch.support[t]],
                              batch.classes[t][batch.support_labels()])
        assert np.array_equal(LABELS[batch.query[t]], batch.classes[t][batch.query_labels()])


def test_episodes_are_a_pure_function_of_seed_and_index():
    a = EpisodeSampler(BY_CLASS, 5, 1, 15, seed=7)
    b = EpisodeSampler(BY_CLASS, 5, 1, 15, seed=7)
    assert np.array_equal(a.batch(3, 4).query, b.batch(3, 4).query)
    assert np.array_equal(a.episode(5).support, a.batch(0, 10).support[5:6])
    assert not np.array_equal(a.episode(0).support, EpisodeSampler(BY_CLASS, 5, 1, 15, 8)
                              .episode(0).support)


@pytest.mark.parametrize("ways,shots,queries", [(11, 1, 1), (5, 15, 6), (1, 1, 1), (5, 0, 1)])
def test_impossible_episodes_fail_clearly(ways, shots, queries):
    with pytest.raises(DataError, match="ways|shots|queries"):
        EpisodeSampler(BY_CLASS, ways, shots, queries, seed=0)


def test_failure_class_is_the_argmin_of_per_class_accuracy():
    labels = np.array([[0, 0, 1, 1, 2, 2]])
    pred = np.array([[0, 0, 1, 0, 0, 1]])  # class accuracies 1.0, 0.5, 0.0
    np.testing.assert_allclose(per_class_accuracy(pred, labels, 3), [[1.0, 0.5, 0.0]])
    assert failure_classes(pred, labels, 3).tolist() == [2]
    # ties go to the first worst class
    assert failure_classes(np.array([[1, 1, 0, 0, 2, 2]]), labels, 3).tolist() == [0]


@pytest.mark.parametrize("variant", ["reuse", "resample"])
def test_hard_tasks_contain_the_failure_classes(variant):
    sampler = EpisodeSampler(BY_CLASS, 5, 2, 3, seed=1)
    batch = sampler.batch(0, 3)
    failures = np.array([0, 4, 2])
    failed = {int(batch.classes[t, f]) for t, f in enumerate(failures)}
    pred = np.broadcast_to(batch.query_labels(), (3, 15)).copy()
    for t, f in enumerate(failures):  # the failure class's queries all go wrong
        pred[t, batch.query_labels() == f] = (f + 1) % 5
    hard = hard_tasks(batch, pred, 2, variant, sampler, np.random.default_rng(0))
    assert hard.classes.shape == (2, 5) and hard.support.shape == (2, 10)
    for t in range(2):
        assert failed <= set(hard.classes[t].tolist())
        assert len(set(hard.classes[t])) == 5
        assert np.array_equal(LABELS[hard.support[t]], hard.classes[t][hard.support_labels()])
        assert np.array_equal(LABELS[hard.query[t]], hard.classes[t][hard.query_labels()])
        assert not set(hard.support[t]) & set(hard.query[t])
    used = set(batch.support.ravel()) | set(batch.query.ravel())
    if variant == "reuse":  # the very images the failing tasks used, in the same roles
        assert set(hard.support.ravel()) <= set(batch.support.ravel())
        assert set(hard.query.ravel()) <= set(batch.query.ravel())
    else:
        assert not set(hard.support.ravel()) <= used  # fresh images


def test_hard_tasks_off_is_empty():
    sampler = EpisodeSampler(BY_CLASS, 5, 1, 2, seed=1)
    hard = hard_tasks(sampler.batch(0, 2), np.zeros((2, 10), np.int64), 1, "off", sampler,
                      np.random.default_rng(0))
    assert isinstance(hard, EpisodeBatch) and hard.tasks == 0


def test_hard_tasks_are_completed_with_the_most_confused_classes():
    """Two 5-way tasks give 2 failure classes; the other 3 slots go to the classes the
    base learner confused with them (both directions), then to the least accurate ones,
    never to random classes."""
    sampler = EpisodeSampler(BY_CLASS, 5, 1, 2, seed=3)
    classes = np.array([[6, 1, 8, 3, 0], [2, 9, 4, 7, 5]])  # two tasks, no class shared
    batch = EpisodeBatch(classes, np.array([[BY_CLASS[k][0] for k in row] for row in classes]),
                         np.array([[i for k in row for i in BY_CLASS[k][1:3]]
                                   for row in classes]))
    labels = np.broadcast_to(batch.query_labels(), (2, 10))
    pred = labels.copy()
    pred[0, [0, 1]] = [3, 3]  # task 0: class 0 always taken for class 3
    pred[1, [2, 3]] = [4, 2]  # task 1: class 1 taken for class 4 once, for class 2 once
    pred[1, [8]] = [0]        # task 1: class 4 once taken for class 0 (not the failure)
    c = batch.classes
    order = completion_order(batch, pred)
    # confused twice, then once each (ties: the less accurate class first)
    assert order[:3] == [int(c[0, 3]), int(c[1, 4]), int(c[1, 2])]
    for variant in ("reuse", "resample"):
        hard = hard_tasks(batch, pred, 1, variant, sampler, np.random.default_rng(0))
        assert set(hard.classes[0].tolist()) == {int(c[0, 0]), int(c[1, 1]),  # failures
                                                 int(c[0, 3]), int(c[1, 4]), int(c[1, 2])}
