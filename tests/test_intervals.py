"""The interval over training seeds and episodes: simulated coverage on synthetic benchmarks
with a known effect, the cases that used to fool `holds`, one network, the eval seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metatransfer.config import derived_eval_seed, eval_seed, load_config
from metatransfer.results import (
    ACROSS_SEEDS,
    ONE_NETWORK,
    chi2_cdf,
    experiment_interval,
    over_seeds,
    seeds_comparisons_table,
    t_quantile_975,
    verdict,
)

EFFECT = 0.5  # points: the true mean paired difference of every synthetic benchmark
#: (training sd, episode sd) of the per-episode paired difference, in points: episodes
#: alone (training adds nothing), the share the README's seeds show (training sd about
#: 0.12 against a per-seed episode CI of 0.5), equal shares, training dominating
REGIMES = [(0.0, 8.0), (0.12, 6.25), (0.33, 8.0), (1.5, 8.0)]


def synthetic(rng, sims: int, training_sd: float, episode_sd: float, seeds: int = 3,
              episodes: int = 600) -> np.ndarray:
    """``(sims, seeds, episodes)`` per-episode paired differences (fractions): each seed
    shifts the effect by its training noise, each episode adds its own."""
    train = rng.normal(0.0, training_sd, (sims, seeds, 1))
    return (EFFECT + train + rng.normal(0.0, episode_sd, (sims, seeds, episodes))) / 100


def coverage(interval, benchmarks: np.ndarray) -> float:
    """Share of benchmarks whose interval (``(mean, half-width)`` in points) holds EFFECT."""
    hits = 0
    for per_seed in benchmarks:
        mean, half = interval(list(per_seed))[:2]
        hits += abs(mean - EFFECT) <= half
    return hits / len(benchmarks)


@pytest.mark.parametrize("training_sd,episode_sd", REGIMES)
def test_coverage_of_the_interval_over_seeds_and_episodes(training_sd, episode_sd):
    """3 seeds of 600 episodes each, 4000 synthetic benchmarks per regime: the 95%
    interval holds the true effect 93-97% of the time whatever the share of training and
    episode noise (the standard error of a coverage at 4000 benchmarks is 0.35 points)."""
    rng = np.random.default_rng([29, int(training_sd * 100), int(episode_sd * 100)])
    benchmarks = synthetic(rng, 4000, training_sd, episode_sd)
    assert 0.93 <= coverage(experiment_interval, benchmarks) <= 0.97


def hierarchical_bootstrap(per_seed: list[np.ndarray], resamples: int = 400,
                           seed: int = 0) -> tuple[float, float]:
    """The textbook alternative, for comparison: resample seeds, then episodes within each
    resampled seed; mean and 1.96 x the SD of the resampled grand means (points)."""
    rng = np.random.default_rng(seed)
    values = np.stack([np.asarray(v) * 100 for v in per_seed])  # (seeds, episodes)
    seeds, episodes = values.shape
    chosen = rng.integers(seeds, size=(resamples, seeds, 1))
    draws = rng.integers(episodes, size=(resamples, seeds, episodes))
    grand = values[chosen, draws].mean(axis=(1, 2))
    return float(values.mean()), 1.96 * float(grand.std())


def test_a_hierarchical_bootstrap_undercovers_with_three_seeds():
    """Why the t interval: with 3 seeds a bootstrap resamples 3 values, and where training
    noise dominates it covers the effect about 3 times in 4 (75%) against the t's 95%."""
    benchmarks = synthetic(np.random.default_rng(3), 300, 3.0, 8.0, episodes=100)
    assert coverage(hierarchical_bootstrap, benchmarks) < 0.85
    assert coverage(experiment_interval, benchmarks) > 0.91


def seeds_like(means: list[float], ci95: float, episodes: int = 600) -> list[np.ndarray]:
    """Per-episode differences (fractions) whose seeds have exactly these means and
    episode CI half-widths (points)."""
    noise = np.random.default_rng(0).normal(size=episodes)
    noise = (noise - noise.mean()) / noise.std(ddof=1)  # mean 0, sd 1 exactly
    sd = ci95 * math.sqrt(episodes) / 1.96
    return [(m + sd * np.roll(noise, i)) / 100 for i, m in enumerate(means)]


def test_seeds_that_agree_beyond_their_episodes_do_not_hold():
    """+0.28, +0.30, +0.32, each ± 0.5 over its episodes: no seed shows it, and seeds
    scored on episodes of their own cannot agree that closely (their spread is 0.02, their
    episode noise alone 0.26), so they shared episodes: the interval is one seed's episode
    CI and the claim is not shown. The old t over the three values gave ± 0.05."""
    row = over_seeds(seeds_like([0.28, 0.30, 0.32], 0.5))
    assert row["per_seed"] == [0.28, 0.3, 0.32] and row["per_seed_ci95"] == [0.5] * 3
    assert row["ci95"] == pytest.approx(0.5, abs=0.01) and row["holds"] is False
    assert row["scope"] == ACROSS_SEEDS and "agree more closely" in row["ci_method"]
    assert verdict(row) == "not shown"


def test_seeds_that_differ_as_their_episodes_allow_hold_on_the_t_interval():
    """Per-seed means +2.0, +1.5, +2.5 ± 0.5: a spread the episodes allow; t over the
    three means, df 2: 4.303 x 0.5 / sqrt(3) = 1.24, so the claim holds."""
    row = over_seeds(seeds_like([2.0, 1.5, 2.5], 0.5))
    assert row["mean"] == 2.0 and row["ci95"] == pytest.approx(1.24, abs=0.01)
    assert row["ci_method"] == "t over 3 per-seed means (df 2), each seed on its own episodes"
    assert row["holds"] is True and verdict(row) == "holds"
    assert over_seeds(seeds_like([2.0, 1.5], 0.5))["holds"] is False  # 2 seeds never hold
    assert over_seeds(seeds_like([2.0], 0.5))["ci95"] is None


def test_identical_seeds_are_one_network_and_never_hold():
    """The same per-episode values from every seed (one network on the same episodes, or
    mtl = ft each time): one network, its episode CI, never a claim across seeds."""
    same = seeds_like([1.0], 0.5) * 3
    row = over_seeds(same)
    assert row["scope"] == ONE_NETWORK and row["holds"] is False and row["significant"]
    assert row["ci95"] == pytest.approx(0.5, abs=0.01)  # that network's 600 episodes, once
    assert row["ci_method"] == "episode CI over the 600 episodes of one network"
    assert verdict(row) == "one network: CI excludes 0"
    zero = over_seeds([np.zeros(600)] * 3)  # mtl = ft: selection kept the start every time
    assert zero["scope"] == ONE_NETWORK and zero["ci95"] == 0.0 and not zero["significant"]
    # two baselines on one pre-training shared by the seeds, each seed on its own episodes:
    # the seeds add episodes, not trainings
    shared = over_seeds(seeds_like([1.0, 0.6, 1.4], 0.5), one_network=True)
    assert shared["scope"] == ONE_NETWORK and shared["holds"] is False
    # noise in the last digit, which the rounding rule of old let hold on a CI of 0.014:
    # one network's 1800 episodes say -0.02 ± 0.03
    last_digit = over_seeds(seeds_like([-0.02, -0.02, -0.01], 0.05), one_network=True)
    assert last_digit["holds"] is False and not last_digit["significant"]
    assert shared["ci_method"] == "episode CI over the 1800 episodes of one network"
    table = seeds_comparisons_table([{**shared, "a": "ft", "b": "protonet", "ways": 5,
                                      "shots": 1}])
    assert "| ft − protonet | 5-way 1-shot |" in table and "one network: " in table
    assert "across seeds" not in table.split("\n\n")[0]


def test_chi_square_and_t_quantiles_by_hand():
    assert chi2_cdf(0.0506, 2) == pytest.approx(1 - math.exp(-0.0253))  # df 2: closed form
    assert chi2_cdf(0.000982, 1) == pytest.approx(0.025, abs=1e-4)  # tables
    assert chi2_cdf(16.791, 30) == pytest.approx(0.025, abs=1e-4)
    assert chi2_cdf(0.0, 3) == 0.0 and chi2_cdf(200.0, 4) == 1.0
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)  # tables: 2.0003
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)  # 1.9799


def test_each_training_seed_draws_its_own_episodes():
    """eval.seed null: 1234 + pretrain seed + 1000 x meta seed, so seed 0 keeps 1234 and
    --seeds and --meta-seeds both give every seed a stream of its own; an explicit
    eval.seed fixes the episodes whatever the training seed."""
    seeds = [eval_seed(load_config(overrides=[f"seed={s}"])) for s in (0, 1, 2)]
    assert seeds == [1234, 2235, 3236]
    meta = [eval_seed(load_config(overrides=[f"meta.seed={s}"])) for s in (0, 1, 2)]
    assert meta == [1234, 2234, 3234]
    assert eval_seed(load_config(overrides=["seed=2", "eval.seed=7"])) == 7
    assert derived_eval_seed(load_config(overrides=["seed=2"]), base=7) == 7 + 2002
