"""The confidence-interval formulas (one method, and paired differences), by hand."""

import math

import numpy as np
import pytest

from metatransfer.results import comparison_rows, mean_ci95, paired_difference


def test_ci95_by_hand():
    acc = np.array([0.6, 0.8, 1.0, 0.4])
    mean, ci = mean_ci95(acc)
    std = math.sqrt(((0.1 ** 2) + (0.1 ** 2) + (0.3 ** 2) + (0.3 ** 2)) / 3) * 100
    assert math.isclose(mean, 70.0)
    assert math.isclose(ci, 1.96 * std / 2.0)


def test_single_episode_has_zero_width():
    assert mean_ci95(np.array([0.5])) == (50.0, 0.0)


def test_paired_difference_by_hand():
    a = np.array([0.6, 0.8, 1.0, 0.4])
    b = np.array([0.4, 0.8, 0.6, 0.4])
    # differences in points: 20, 0, 40, 0 -> mean 15, squared deviations 25+225+625+225
    mean, ci = paired_difference(a, b)
    assert math.isclose(mean, 15.0)
    assert math.isclose(ci, 1.96 * math.sqrt(1100 / 3) / 2)


def test_paired_difference_needs_equal_lengths():
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference(np.ones(3), np.ones(4))


def test_comparison_rows_use_the_common_prefix():
    per_episode = {"mtl/5w1s": np.array([1.0, 1.0, 0.8, 0.0]),
                   "ft-all/5w1s": np.array([0.8, 0.9, 0.7]),
                   "ft/5w1s": np.array([1.0, 1.0, 0.8, 0.0])}
    rows = comparison_rows(per_episode, [("mtl", "ft-all"), ("mtl", "ft"), ("mtl", "protonet")],
                           [(5, 1), (5, 5)])
    # mtl - ft-all on episodes 0..2: 20, 10, 10 points -> mean 13.33, std sqrt(100/3)
    assert rows == [
        {"a": "mtl", "b": "ft-all", "ways": 5, "shots": 1, "episodes": 3, "diff": 13.33,
         "ci95": round(1.96 * math.sqrt(100 / 3) / math.sqrt(3), 2), "significant": True},
        {"a": "mtl", "b": "ft", "ways": 5, "shots": 1, "episodes": 4, "diff": 0.0,
         "ci95": 0.0, "significant": False},
    ]
