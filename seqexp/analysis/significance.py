"""Paired significance statistics on per-event values: the bootstrap confidence interval of the
mean difference, the sign-flip randomisation test and Holm's correction.

Two levels. The event level treats every test event as independent. The user level resamples
and permutes users, all of a user's test events together: a user's events share the user's
history and taste, so they are not independent, and the event level is anti-conservative (its
intervals too narrow, its p-values too small). The report uses the user level wherever the
runs logged each event's user (docs/significance.md)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


# Both resampling procedures work on the distinct values of the per-event differences and their
# counts: a bootstrap resample of n events is a multinomial draw of how often each distinct value
# is picked, and flipping the signs of the c events that share a value adds
# value * (2 * Binomial(c, 1/2) - c). Exact, and the cost grows with the number of distinct
# values (at most 21 x 21 for one seed's MRR@20), not with the millions of events.
def paired_bootstrap_ci(diff: np.ndarray, n_resamples: int = 2000, level: float = 0.95,
                        rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Percentile confidence interval of the mean of the paired differences, resampling events
    with replacement."""
    rng = rng or np.random.default_rng(0)
    values, counts = np.unique(np.asarray(diff, dtype=np.float64), return_counts=True)
    n = int(counts.sum())
    means = np.empty(n_resamples)
    step = max(1, _MAX_DRAWS // max(len(values), 1))
    for lo in range(0, n_resamples, step):
        size = min(step, n_resamples - lo)
        means[lo:lo + size] = rng.multinomial(n, counts / n, size=size) @ values / n
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_randomisation_p(diff: np.ndarray, n_resamples: int = 10000,
                           rng: np.random.Generator | None = None) -> float:
    """Two-sided p-value of the paired randomisation (sign-flip) test of mean difference 0:
    under the null hypothesis the two runs' values of an event are exchangeable, so each
    difference is as likely to have the opposite sign. Exact (all 2^n sign patterns) for up to
    12 nonzero differences, else Monte Carlo with p = (1 + #{|T*| >= |T|}) / (1 + resamples)."""
    rng = rng or np.random.default_rng(0)
    diff = np.asarray(diff, dtype=np.float64)
    diff = diff[diff != 0]
    if len(diff) == 0:
        return 1.0
    observed = abs(diff.sum())
    tolerance = 1e-9 * max(np.abs(diff).sum(), 1e-300)  # float sums of equal statistics
    if len(diff) <= 12:
        signs = 1 - 2 * ((np.arange(2 ** len(diff))[:, None] >> np.arange(len(diff))) & 1)
        return float((np.abs(signs @ diff) >= observed - tolerance).mean())
    values, counts = np.unique(diff, return_counts=True)
    extreme = 0
    step = max(1, _MAX_DRAWS // len(values))
    for lo in range(0, n_resamples, step):
        size = min(step, n_resamples - lo)
        flips = 2 * rng.binomial(counts, 0.5, size=(size, len(values))) - counts
        extreme += int((np.abs(flips @ values) >= observed - tolerance).sum())
    return (1 + extreme) / (1 + n_resamples)


def user_totals(values: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user (in the order of their ids): the sum of an event-level value over the user's
    events, and the number of those events."""
    _, inverse, counts = np.unique(np.asarray(users), return_inverse=True, return_counts=True)
    return np.bincount(inverse, weights=np.asarray(values, dtype=np.float64)), counts


def user_bootstrap_ci(diff: np.ndarray, users: np.ndarray, n_resamples: int = 2000,
                      level: float = 0.95, rng: np.random.Generator | None = None
                      ) -> tuple[float, float]:
    """Percentile confidence interval of the mean per-event difference, resampling users with
    replacement (each drawn user brings all of its events): the cluster bootstrap."""
    rng = rng or np.random.default_rng(0)
    totals, counts = user_totals(diff, users)
    n_users = len(totals)
    means = np.empty(n_resamples)
    step = max(1, _MAX_DRAWS // max(n_users, 1))
    for lo in range(0, n_resamples, step):
        size = min(step, n_resamples - lo)
        picks = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=size)
        means[lo:lo + size] = (picks @ totals) / (picks @ counts)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def user_randomisation_p(diff: np.ndarray, users: np.ndarray, n_resamples: int = 10000,
                         rng: np.random.Generator | None = None) -> float:
    """Two-sided p-value of the sign-flip test at the user level: under the null hypothesis the
    two runs are exchangeable for each user, so each user's total difference is as likely to
    have the opposite sign. The per-user randomisation test of the event-level mean (the number
    of events is fixed, so flipping totals is flipping the mean)."""
    totals, _ = user_totals(diff, users)
    return paired_randomisation_p(totals, n_resamples, rng)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out.tolist()


_MAX_DRAWS = 5_000_000  # resamples x distinct values per chunk (bounds the memory)
