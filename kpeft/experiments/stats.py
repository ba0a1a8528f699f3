"""Summaries and significance tests of a table's cells.

* over seeds: mean and sample standard deviation (ddof = 1), Welch's unequal-variance t-test
  (``scipy.stats.ttest_ind(equal_var=False)``, two-sided);
* over examples: the paired bootstrap (Koehn 2004; Berg-Kirkpatrick et al. 2012) of the mean
  per-example difference, two-sided.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)


def summarize(values: Sequence[float]) -> Summary | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return Summary(len(vals), float(np.mean(vals)), std)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of mean(a) = mean(b); None with fewer than two values
    on a side, or when both sides have zero variance (the test is undefined)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2 or (a.var() == 0 and b.var() == 0):
        return None
    with warnings.catch_warnings():  # scipy warns on nearly identical values; the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def paired_bootstrap_p(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0) -> float | None:
    """Two-sided paired-bootstrap p-value of mean(a − b) = 0 over aligned per-example scores.

    Resample the examples with replacement `n_boot` times; p = 2·min(P(d̄* ≤ 0), P(d̄* ≥ 0)),
    each proportion counted as (k + 1) / (n_boot + 1) so that p is never 0."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size < 2:
        return None
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 100):  # chunks keep memory at 100 × n
        idx = rng.integers(0, d.size, size=(min(100, n_boot - start), d.size))
        means[start:start + len(idx)] = d[idx].mean(axis=1)
    low = (np.count_nonzero(means <= 0) + 1) / (n_boot + 1)
    high = (np.count_nonzero(means >= 0) + 1) / (n_boot + 1)
    return float(min(1.0, 2 * min(low, high)))


def best_index(means: Sequence[float | None], lower_is_better: bool = False) -> list[int]:
    """Indices of the best mean (all of them on a tie); None entries never win."""
    valid = [(i, m) for i, m in enumerate(means) if m is not None]
    if not valid:
        return []
    pick = min if lower_is_better else max
    best = pick(m for _, m in valid)
    return [i for i, m in valid if m == best]
