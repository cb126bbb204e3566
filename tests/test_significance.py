"""The report's paired statistics against scipy, by hand, and their false-positive rate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from seqexp.analysis.significance import (
    holm,
    paired_bootstrap_ci,
    paired_randomisation_p,
    user_bootstrap_ci,
    user_randomisation_p,
    user_totals,
)
from seqexp.core.rank_metrics import event_values


def _mean_diff(x, y, axis=-1):
    return np.mean(x - y, axis=axis)


def _reciprocal_ranks(rng: np.random.Generator, n: int, shape: float = 1.0) -> np.ndarray:
    return event_values(np.ceil(rng.pareto(shape, n) * 5).astype(np.int64) + 1, "mrr_at_20")


def test_randomisation_p_is_exact_for_few_events_and_equals_scipys_exact_test():
    rng = np.random.default_rng(0)
    x, y = _reciprocal_ranks(rng, 11), _reciprocal_ranks(rng, 11)
    ours = paired_randomisation_p(x - y)
    exact = stats.permutation_test((x, y), _mean_diff, permutation_type="samples",
                                   n_resamples=np.inf, vectorized=True).pvalue
    assert ours == pytest.approx(exact, abs=1e-12)


def test_randomisation_p_by_monte_carlo_matches_scipys_exact_test():
    rng = np.random.default_rng(11)
    x, y = _reciprocal_ranks(rng, 16), _reciprocal_ranks(rng, 16)  # 16 > 12: Monte Carlo
    assert np.count_nonzero(x - y) > 12
    ours = paired_randomisation_p(x - y, 40000, np.random.default_rng(8))
    exact = stats.permutation_test((x, y), _mean_diff, permutation_type="samples",
                                   n_resamples=np.inf, vectorized=True).pvalue
    # p near 0.05, where a biased sign flip would show; Monte Carlo sd 0.0012
    assert 0.02 < exact < 0.1 and ours == pytest.approx(exact, abs=0.005)


def test_randomisation_p_by_hand():
    # sums of ±0.5 ±0.25 ±0.1: 0.85 0.65 0.35 0.15 and their negatives; |T| >= 0.65 in 4 of 8
    assert paired_randomisation_p(np.array([0.5, 0.25, -0.1])) == pytest.approx(0.5)
    # zero differences carry no sign: the same test as without them
    assert paired_randomisation_p(np.array([0.5, 0.0, 0.25, -0.1, 0.0])) == pytest.approx(0.5)
    assert paired_randomisation_p(np.zeros(5)) == 1.0
    # all 10 differences positive: only the two all-same-sign patterns reach |T|
    assert paired_randomisation_p(np.full(10, 0.2)) == pytest.approx(2 / 1024)


def test_randomisation_p_matches_scipy_monte_carlo_on_many_events():
    rng = np.random.default_rng(1)
    x = _reciprocal_ranks(rng, 1000)
    y = np.where(rng.random(1000) < 0.8, x, _reciprocal_ranks(rng, 1000))  # mostly equal
    ours = paired_randomisation_p(x - y, 20000, np.random.default_rng(2))
    theirs = stats.permutation_test((x, y), _mean_diff, permutation_type="samples",
                                    n_resamples=10000, vectorized=True, random_state=3).pvalue
    assert 0.02 < theirs < 0.98  # a p-value in the range where the two can be compared
    assert ours == pytest.approx(theirs, abs=0.02)  # two Monte Carlo estimates, sd <= 0.006


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(4)
    diff = _reciprocal_ranks(rng, 2000) - _reciprocal_ranks(rng, 2000)
    low, high = paired_bootstrap_ci(diff, 20000, rng=np.random.default_rng(5))
    theirs = stats.bootstrap((diff,), np.mean, method="percentile", n_resamples=20000,
                             random_state=6).confidence_interval
    width = theirs.high - theirs.low
    assert low == pytest.approx(theirs.low, abs=0.03 * width)
    assert high == pytest.approx(theirs.high, abs=0.03 * width)
    assert low < diff.mean() < high


def test_bootstrap_ci_by_hand():
    assert paired_bootstrap_ci(np.full(50, 0.25)) == (0.25, 0.25)
    # one event of 1 among n: the resampled mean is Binomial(n, 1/n) / n
    low, high = paired_bootstrap_ci(np.r_[1.0, np.zeros(99)], 4000)
    # P(Bin(100, .01) = 0) = 0.37 > 2.5 %, P(<= 2) = 0.92 < 97.5 % <= P(<= 3) = 0.98
    assert (low, high) == (0.0, pytest.approx(0.03))


def test_holm_by_hand():
    # sorted 0.01 0.03 0.04 0.2, times 4 3 2 1: 0.04 0.09 0.08 -> 0.09 (monotone) 0.2
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def _same_model_two_seeds(rng: np.random.Generator, n: int, seeds: int):
    """Per-event reciprocal ranks of two runs of one model: each event has a difficulty, each
    seed adds its own noise; runs are averaged over `seeds` seeds each."""
    difficulty = rng.exponential(1.0, n)

    def run():
        noisy = difficulty * rng.lognormal(0.0, 0.7, n)
        return event_values(np.ceil(noisy * 8).astype(np.int64) + 1, "mrr_at_20")

    return (np.mean([run() for _ in range(seeds)], axis=0),
            np.mean([run() for _ in range(seeds)], axis=0))


# 400 cases at a nominal rate of 5 %: the share of false positives has a standard deviation of
# sqrt(0.05 * 0.95 / 400) = 1.1 %; the tolerance is three of them.
CASES, NOMINAL, TOLERANCE = 400, 0.05, 0.033


@pytest.mark.parametrize("seeds", [1, 3])
def test_two_seeds_of_one_model_are_significant_at_most_at_the_nominal_rate(seeds):
    rng = np.random.default_rng(10 + seeds)
    false_positive = 0
    for _ in range(CASES):
        a, b = _same_model_two_seeds(rng, 200, seeds)
        false_positive += paired_randomisation_p(a - b, 1000, rng) < NOMINAL
    rate = false_positive / CASES
    assert rate <= NOMINAL + TOLERANCE
    # and the same test finds a real difference: one model 10 % better on every event
    a, b = _same_model_two_seeds(rng, 3000, seeds)
    assert paired_randomisation_p(1.1 * a - b, 1000, rng) < NOMINAL


def test_one_users_many_events_are_significant_event_by_event_but_not_by_users():
    """User 0: 100 events, each +0.1; users 1-4: one event each, -0.1. By hand, at the user
    level: totals +10, -0.1 x 4, so every one of the 2^5 sign patterns has |sum| >= 9.6 = the
    observed |sum|: p = 1. Event by event, 100 of 104 differences share a sign: p tiny."""
    diff = np.array([0.1] * 100 + [-0.1] * 4)
    users = np.array([0] * 100 + [1, 2, 3, 4])
    assert user_randomisation_p(diff, users) == 1.0
    assert paired_randomisation_p(diff, 10_000, np.random.default_rng(0)) < 1e-3


def test_the_user_bootstrap_draws_whole_users():
    """User 7: one event, difference 1; user 9: three events, difference 0. A resample of 2
    users is {7, 7}, {7, 9} or {9, 9} (probabilities 1/4, 1/2, 1/4), whose mean per event is
    2/2 = 1, 1/4 or 0, so the 95 % interval is [0, 1]; resampling the four events instead,
    the mean 1 needs all four draws to be the one event (1/256): the interval ends below 1."""
    diff, users = np.array([1.0, 0, 0, 0]), np.array([7, 9, 9, 9])
    assert user_bootstrap_ci(diff, users, 4000) == (0.0, 1.0)
    low, high = paired_bootstrap_ci(diff, 4000)
    assert low == 0.0 and high < 1.0


def test_user_totals_sum_each_users_events():
    totals, counts = user_totals(np.array([1.0, 2, 3, 4]), np.array([5, 2, 5, 2]))
    assert totals.tolist() == [6.0, 4.0] and counts.tolist() == [2, 2]  # users 2, 5
