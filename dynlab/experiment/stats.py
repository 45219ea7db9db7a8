"""Confidence intervals across seeds and the verdict rule of a claim: pure functions on
float64 arrays (no I/O, no store).

    t_interval(x)                one sample: mean ± t·s/√n
    paired_difference(a, b)      a_i − b_i paired by seed, then t_interval
    welch_difference(a, b)       unpaired difference of means (Welch–Satterthwaite)
    bootstrap_percentile(x, f)   percentile interval of a statistic that is not a mean
    verdict(lo, hi, direction)   supported / contradicted / inconclusive

Non-finite values are dropped before any statistic (a seed whose run diverged, a NaN cell);
`n` is the number of values used. Fewer than two values give NaN bounds (an interval needs a
spread), and `verdict` then says "inconclusive".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE)


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided confidence interval [lo, hi] from n values."""

    estimate: float
    lo: float
    hi: float
    n: int
    confidence: float
    method: str

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "lo": self.lo, "hi": self.hi, "n": self.n,
                "confidence": self.confidence, "method": self.method}


def finite(x) -> np.ndarray:
    """The finite values of x as a 1-D float64 array."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def t_interval(x, confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of the finite values of x.

    mean = (1/n) Σ x_i, s² = Σ (x_i − mean)² / (n − 1),
    [mean − t·s/√n, mean + t·s/√n] with t = t_{(1+confidence)/2, n−1}
    (e.g. Wasserman, All of Statistics, §10.4; scipy.stats.t.interval). NaN bounds for n < 2;
    a zero spread gives the point interval [mean, mean]."""
    v = finite(x)
    n = v.size
    mean = float(v.mean()) if n else math.nan
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, confidence, "t")
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, confidence, "t")


def paired_difference(a, b, confidence: float = 0.95) -> Interval:
    """The mean of the paired differences d_i = a_i − b_i (pairs where both are finite) with
    its t-interval (the paired t-test's interval, scipy.stats.ttest_rel(a, b))."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    iv = t_interval(a[ok] - b[ok], confidence)
    return Interval(iv.estimate, iv.lo, iv.hi, iv.n, confidence, "paired t")


def welch_difference(a, b, confidence: float = 0.95) -> Interval:
    """mean(a) − mean(b) for independent samples with Welch's interval:
    se² = s_a²/n_a + s_b²/n_b, ν = se⁴ / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1)),
    [Δ − t_{(1+c)/2, ν}·se, Δ + t·se] (Welch 1947; scipy.stats.ttest_ind(equal_var=False)).
    `n` is n_a + n_b; NaN bounds unless both have two values."""
    a, b = finite(a), finite(b)
    n = a.size + b.size
    est = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if a.size < 2 or b.size < 2:
        return Interval(est, math.nan, math.nan, n, confidence, "Welch t")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(est, est, est, n, confidence, "Welch t")
    dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, dof) * se)
    return Interval(est, est - half, est + half, n, confidence, "Welch t")


def bootstrap_percentile(x, statistic: Callable[..., np.ndarray], confidence: float = 0.95,
                         n_resamples: int = 9999, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of statistic(x) (Efron & Tibshirani 1993, ch. 13): draw
    n_resamples resamples of the n finite values with replacement (indices
    `numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))`), evaluate
    `statistic(resamples, axis=-1)` on each and take its (1 − c)/2 and (1 + c)/2 quantiles
    (linear interpolation). The same draws and quantiles as
    scipy.stats.bootstrap(method="percentile", vectorized=True, rng=default_rng(seed)),
    so the interval is reproducible. NaN bounds for n < 2."""
    v = finite(x)
    n = v.size
    est = float(statistic(v, axis=-1)) if n else math.nan
    if n < 2:
        return Interval(est, math.nan, math.nan, n, confidence, "bootstrap percentile")
    idx = np.random.default_rng(seed).integers(0, n, (n_resamples, n))
    theta = np.asarray(statistic(v[idx], axis=-1), dtype=np.float64)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(theta, [alpha, 1 - alpha])
    return Interval(est, float(lo), float(hi), n, confidence,
                    f"bootstrap percentile ({n_resamples} resamples, seed {seed})")


def family_confidence(confidence: float, m: int) -> float:
    """Bonferroni's level for m simultaneous intervals: 1 − (1 − confidence)/m, so that all m
    cover together with probability ≥ confidence (Bonferroni inequality)."""
    return 1 - (1 - confidence) / max(int(m), 1)


def verdict(lo: float, hi: float, direction: int) -> str:
    """The verdict on a claim that an effect has sign `direction` (+1: positive, −1:
    negative) from a two-sided interval [lo, hi]: "supported" when the interval lies
    entirely on the claimed side of 0, "contradicted" when entirely on the other side, else
    (it contains 0, or a bound is NaN) "inconclusive"."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, not {direction!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if direction * lo > 0 and direction * hi > 0:
        return SUPPORTED
    if direction * lo < 0 and direction * hi < 0:
        return CONTRADICTED
    return INCONCLUSIVE
