"""The confidence-interval formula, by hand."""

import math

import numpy as np

from metatransfer.evaluation import mean_ci95


def test_ci95_by_hand():
    acc = np.array([0.6, 0.8, 1.0, 0.4])
    mean, ci = mean_ci95(acc)
    std = math.sqrt(((0.1 ** 2) + (0.1 ** 2) + (0.3 ** 2) + (0.3 ** 2)) / 3) * 100
    assert math.isclose(mean, 70.0)
    assert math.isclose(ci, 1.96 * std / 2.0)


def test_single_episode_has_zero_width():
    assert mean_ci95(np.array([0.5])) == (50.0, 0.0)
