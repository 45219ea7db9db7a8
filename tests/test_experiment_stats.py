"""dynlab.experiment.stats against scipy.stats on hand-made data, and the verdict rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from dynlab.experiment import stats as S

A = np.array([3.1, 2.7, 3.6, 2.9, 3.3])
B = np.array([2.8, 2.9, 3.0, 2.5, 3.1])


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_t_interval_equals_scipy(confidence):
    iv = S.t_interval(A, confidence)
    lo, hi = sps.t.interval(confidence, A.size - 1, loc=A.mean(), scale=sps.sem(A))
    assert (iv.estimate, iv.n) == (pytest.approx(A.mean(), rel=1e-15), 5)
    assert (iv.lo, iv.hi) == (pytest.approx(lo, rel=1e-13), pytest.approx(hi, rel=1e-13))
    # by hand: mean ± t·s/√n
    half = sps.t.ppf((1 + confidence) / 2, 4) * A.std(ddof=1) / math.sqrt(5)
    assert iv.hi - iv.estimate == pytest.approx(half, rel=1e-13)


def test_paired_difference_equals_ttest_rel():
    iv = S.paired_difference(A, B)
    ref = sps.ttest_rel(A, B).confidence_interval(0.95)
    assert iv.estimate == pytest.approx((A - B).mean(), rel=1e-14)
    assert (iv.lo, iv.hi) == (pytest.approx(ref.low, rel=1e-12), pytest.approx(ref.high, rel=1e-12))
    assert iv.method == "paired t" and iv.n == 5


def test_paired_difference_drops_incomplete_pairs_and_checks_lengths():
    a = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    b = np.array([0.5, 1.0, 3.0, np.inf, 4.0])
    iv = S.paired_difference(a, b)
    ref = sps.ttest_rel([1.0, 2.0, 5.0], [0.5, 1.0, 4.0]).confidence_interval(0.95)
    assert iv.n == 3 and (iv.lo, iv.hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    with pytest.raises(ValueError, match="equal lengths"):
        S.paired_difference([1, 2], [1, 2, 3])


def test_welch_difference_equals_ttest_ind():
    b = np.array([2.1, 2.4, 2.2, 2.9, 2.0, 2.6, 2.3])  # other size and spread
    iv = S.welch_difference(A, b)
    ref = sps.ttest_ind(A, b, equal_var=False).confidence_interval(0.95)
    assert iv.estimate == pytest.approx(A.mean() - b.mean())
    assert (iv.lo, iv.hi) == (pytest.approx(ref.low, rel=1e-12), pytest.approx(ref.high, rel=1e-12))
    assert iv.n == 12


@pytest.mark.parametrize("statistic", [np.median, np.mean])
def test_bootstrap_percentile_equals_scipy_with_the_same_seed(statistic):
    x = np.array([0.1, 0.35, 0.2, 0.6, 0.15, 0.3, 0.25])
    iv = S.bootstrap_percentile(x, statistic, 0.95, n_resamples=2000, seed=7)
    ref = sps.bootstrap((x,), statistic, n_resamples=2000, method="percentile",
                        vectorized=True, rng=np.random.default_rng(7), confidence_level=0.95)
    assert iv.lo == pytest.approx(ref.confidence_interval.low, rel=1e-14)
    assert iv.hi == pytest.approx(ref.confidence_interval.high, rel=1e-14)
    assert iv.estimate == pytest.approx(statistic(x))
    # deterministic: the same seed gives the same interval, another seed another one
    assert S.bootstrap_percentile(x, statistic, 0.95, 2000, 7) == iv
    assert S.bootstrap_percentile(x, statistic, 0.95, 2000, 8) != iv


@pytest.mark.parametrize("fn", [S.t_interval, lambda x, c=0.95: S.bootstrap_percentile(
    x, np.median, c, 100)])
@pytest.mark.parametrize("x", [[], [1.0], [np.nan, 2.0], [np.inf, -np.inf]])
def test_fewer_than_two_values_give_no_interval(fn, x):
    iv = fn(np.array(x, dtype=float))
    assert math.isnan(iv.lo) and math.isnan(iv.hi)
    assert S.verdict(iv.lo, iv.hi, 1) == S.INCONCLUSIVE


def test_zero_spread_is_a_point_interval():
    iv = S.t_interval([2.0, 2.0, 2.0])
    assert (iv.lo, iv.estimate, iv.hi) == (2.0, 2.0, 2.0)
    assert S.welch_difference([1.0, 1.0], [1.0, 1.0]).lo == 0.0


def test_verdict_rule():
    assert S.verdict(0.1, 0.5, 1) == S.SUPPORTED
    assert S.verdict(-0.5, -0.1, 1) == S.CONTRADICTED
    assert S.verdict(-0.5, -0.1, -1) == S.SUPPORTED
    assert S.verdict(-0.1, 0.5, 1) == S.INCONCLUSIVE
    assert S.verdict(0.0, 0.5, 1) == S.INCONCLUSIVE  # touching 0 is not excluding it
    assert S.verdict(math.nan, 0.5, 1) == S.INCONCLUSIVE
    with pytest.raises(ValueError, match="direction"):
        S.verdict(0.1, 0.2, 0)


def test_family_confidence_is_bonferroni():
    assert S.family_confidence(0.95, 1) == pytest.approx(0.95)
    assert S.family_confidence(0.95, 10) == pytest.approx(0.995)
    assert S.family_confidence(0.95, 0) == pytest.approx(0.95)
