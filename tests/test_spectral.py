"""Singular values and metrics against scipy float64 and hand-computed values."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from dynlab.analysis import metrics as metrics_mod
from dynlab.analysis import spectra
from dynlab.testing import geometric_spectrum, matrix_with_spectrum

GEN = torch.Generator().manual_seed(1234)


def ref_svdvals(x) -> np.ndarray:
    return scipy.linalg.svdvals(np.asarray(x, dtype=np.float64))


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (64, 64), (1, 17), (17, 1), (1, 1)])
@pytest.mark.parametrize("kappa", [1.0, 1e2, 1e4, 1e6, 1e8])
def test_svdvals_matches_scipy_on_known_spectra(shape, kappa):
    m, n = shape
    sigma = geometric_spectrum(min(m, n), kappa) * 3.0
    w = matrix_with_spectrum(m, n, sigma, GEN)
    got = spectra.svdvals(w).numpy()
    ref = ref_svdvals(w.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got, sigma.numpy(), rtol=1e-6)  # the planted spectrum itself


def test_svdvals_batch_mixes_routes_and_keeps_accuracy():
    mats = [matrix_with_spectrum(30, 50, geometric_spectrum(30, k), GEN)
            for k in (3.0, 1e3, 1e7, 1e8)]
    x = torch.stack(mats)
    got = spectra.svdvals(x).numpy()
    for i, w in enumerate(mats):
        np.testing.assert_allclose(got[i], ref_svdvals(w), rtol=1e-6)


def test_gram_route_alone_is_accurate_up_to_the_threshold():
    """The threshold is justified: the Gram route at κ = GRAM_MAX_COND (worst case: one
    isolated small σ) is still within 1e-6 of scipy; at 1e3 × that it is not."""
    k = 96
    cliff = torch.ones(k, dtype=torch.float64)
    cliff[-1] = 1 / spectra.GRAM_MAX_COND
    w = matrix_with_spectrum(k, 384, cliff, GEN)
    err = np.abs(spectra.svdvals(w, method="gram").numpy() - ref_svdvals(w)) / ref_svdvals(w)
    assert err.max() < 1e-6
    cliff[-1] = 1 / (spectra.GRAM_MAX_COND * 1e3)
    w = matrix_with_spectrum(k, 384, cliff, GEN)
    err = np.abs(spectra.svdvals(w, method="gram").numpy() - ref_svdvals(w)) / ref_svdvals(w)
    assert err.max() > 1e-6  # which is why "auto" sends it to the SVD
    np.testing.assert_allclose(spectra.svdvals(w).numpy(), ref_svdvals(w), rtol=1e-6)


def test_rank_deficient_zero_and_nonfinite():
    a = torch.randn(20, 3, generator=GEN, dtype=torch.float64)
    low = a @ torch.randn(3, 30, generator=GEN, dtype=torch.float64)  # rank 3
    got = spectra.svdvals(low).numpy()
    ref = ref_svdvals(low.numpy())
    np.testing.assert_allclose(got[:3], ref[:3], rtol=1e-6)
    assert np.all(np.abs(got[3:]) < 1e-12 * ref[0])
    assert np.all(spectra.svdvals(torch.zeros(5, 7)).numpy() == 0)
    bad = torch.randn(3, 4, 6, generator=GEN)
    bad[1, 2, 3] = math.nan
    bad[2, 0, 0] = math.inf
    out = spectra.svdvals(bad).numpy()
    assert np.all(np.isnan(out[1])) and np.all(np.isnan(out[2]))
    np.testing.assert_allclose(out[0], ref_svdvals(bad[0].numpy()), rtol=1e-6)


def test_bf16_input_is_analysed_in_float64():
    w = torch.randn(24, 48, generator=GEN).to(torch.bfloat16)
    got = spectra.svdvals(w)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_svdvals(w.float().numpy()), rtol=1e-6)


@pytest.mark.parametrize("kappa", [3.0, 1e2, 1e4])
def test_float32_precision_option(kappa):
    """float32 spectra: relative error of σ_k about 3e-8·κ (documented in the README)."""
    w = matrix_with_spectrum(40, 60, geometric_spectrum(40, kappa), GEN).float()
    got = spectra.svdvals(w, dtype=torch.float32)
    assert got.dtype == torch.float32
    ref = ref_svdvals(w.numpy())
    assert (np.abs(got.double().numpy() - ref) / ref).max() < max(1e-6, 1e-7 * kappa)


def test_lowrank_svdvals_equals_svd_of_product():
    left = torch.randn(5, 64, 8, generator=GEN, dtype=torch.float64)
    right = torch.randn(5, 8, 48, generator=GEN, dtype=torch.float64)
    got = spectra.lowrank_svdvals(left, right).numpy()
    assert got.shape == (5, 8)
    for i in range(5):
        ref = ref_svdvals((left[i] @ right[i]).numpy())[:8]
        np.testing.assert_allclose(got[i], ref, rtol=1e-6)
    left[2, 0, 0] = math.nan
    got = spectra.lowrank_svdvals(left, right).numpy()
    assert np.all(np.isnan(got[2])) and not np.any(np.isnan(got[3]))


def gradient_factors(heads: int, d: int, hd: int, tilt: float = 0.0):
    """[O_h | dO_h], [dV_h ; V_h] of a pico-convention OV gradient: weights of norm ≈ 1,
    gradients ≈ 1e-3 (mixed scales inside each factor). `tilt` > 0 confines every head's
    columns to d − 1 directions up to `tilt` (a nearly rank-deficient concatenation)."""
    o = torch.randn(heads, d, hd, generator=GEN, dtype=torch.float64)
    do = 1e-3 * torch.randn(heads, d, hd, generator=GEN, dtype=torch.float64)
    if tilt:
        o[:, -1] *= tilt
        do[:, -1] *= tilt
    v = torch.randn(heads, hd, d, generator=GEN, dtype=torch.float64) / d ** 0.5
    dv = 1e-3 * torch.randn(heads, hd, d, generator=GEN, dtype=torch.float64)
    return torch.cat([o, do], dim=-1), torch.cat([dv, v], dim=-2)


def formed_columns(left, right) -> np.ndarray:
    return np.concatenate([(left[h] @ right[h]).numpy() for h in range(left.shape[0])], axis=1)


def test_columns_spectra_equal_scipy_of_the_formed_matrix():
    """components.Columns: the Gram matrix from the factors gives scipy's σ of the formed
    concatenation, through the Gram route (κ small) and the SVD fallback (κ ≈ 1e5); a
    NaN in one factor makes that matrix's σ NaN only."""
    from dynlab.analysis import components as C
    from dynlab.analysis.task import columns_spectra

    cases = [gradient_factors(6, 24, 3), gradient_factors(6, 24, 3, tilt=1e-5),
             gradient_factors(6, 24, 3)]
    cols = [C.Columns(left, right, torch.float32) for left, right in cases]
    assert cols[0].shape == (24, 144) and cols[0].max_rank == 24 == cols[0].rank_bound
    np.testing.assert_array_equal(cols[0].entries().numpy(), formed_columns(*cases[0]))
    refs = [ref_svdvals(formed_columns(left, right)) for left, right in cases]
    assert refs[1][0] / refs[1][-1] > 1e4 > refs[0][0] / refs[0][-1]  # both routes taken
    got = columns_spectra(cols, torch.float64, "cpu").numpy()
    for i in range(3):
        np.testing.assert_allclose(got[i], refs[i], rtol=1e-6)
    left, right = cases[2][0].clone(), cases[2][1]
    left[1, 0, 0] = math.nan
    got = columns_spectra(cols[:2] + [C.Columns(left, right, torch.float32)], torch.float64,
                          "cpu").numpy()
    assert np.isnan(got[2]).all() and not np.isnan(got[:2]).any()


def test_product_frobenius_equals_norm_of_the_product():
    from dynlab.analysis.conventions import product_frobenius

    left, right = gradient_factors(5, 20, 4)
    want = [np.linalg.norm((left[h] @ right[h]).numpy()) for h in range(5)]
    np.testing.assert_allclose(product_frobenius(left, right).numpy(), want, rtol=1e-12)


# ---- metrics: hand-computed cases -------------------------------------------------------


def pad(values, total):
    return torch.tensor(list(values) + [math.nan] * (total - len(values)), dtype=torch.float64)


def test_metrics_hand_computed_two_values():
    s = pad([3.0, 1.0], 4)  # k = 2, padded to 4
    p = np.array([0.75, 0.25])
    er = math.exp(-(p * np.log(p)).sum())
    assert metrics_mod.effective_rank(s).item() == pytest.approx(er, rel=1e-12)
    assert metrics_mod.proportional_effective_rank(s).item() == pytest.approx(er / 2, rel=1e-12)
    assert metrics_mod.condition_number(s, 10).item() == pytest.approx(3.0)
    assert metrics_mod.stable_rank(s).item() == pytest.approx(10 / 9)
    assert metrics_mod.spectral_norm(s).item() == 3.0
    assert metrics_mod.frobenius_norm(s).item() == pytest.approx(math.sqrt(10))
    assert metrics_mod.nuclear_norm(s).item() == pytest.approx(4.0)
    assert metrics_mod.numerical_rank(s, 10).item() == 2


def test_metrics_edges():
    flat = pad([2.0] * 5, 5)
    assert metrics_mod.effective_rank(flat).item() == pytest.approx(5.0)
    assert metrics_mod.proportional_effective_rank(flat).item() == pytest.approx(1.0)
    one = pad([7.0, 0.0, 0.0], 3)  # rank 1 of k = 3: 0·ln 0 = 0, κ = inf
    assert metrics_mod.effective_rank(one).item() == pytest.approx(1.0)
    assert metrics_mod.condition_number(one, 3).item() == math.inf
    assert metrics_mod.numerical_rank(one, 3).item() == 1
    zero = pad([0.0, 0.0], 2)
    for fn in (metrics_mod.effective_rank, metrics_mod.proportional_effective_rank,
               metrics_mod.stable_rank):
        assert math.isnan(fn(zero).item())
    assert math.isnan(metrics_mod.condition_number(zero, 2).item())
    assert metrics_mod.nuclear_norm(zero).item() == 0
    assert metrics_mod.numerical_rank(zero, 2).item() == 0
    nan_row = pad([], 3)  # a matrix that held NaN/Inf
    for name, m in metrics_mod.METRICS.items():
        if not m.entrywise:
            assert math.isnan(m.from_spectrum(nan_row, torch.tensor(3.0)).item()), name
    tiny = pad([1.0, 1e-17], 2)  # below max(m,n)·eps·σ_1: numerically zero
    assert metrics_mod.condition_number(tiny, 4).item() == math.inf
    ill = pad([1.0, 1e-8], 2)
    assert metrics_mod.condition_number(ill, 4).item() == pytest.approx(1e8)


def test_entrywise_metrics_hand_computed():
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 1, 2] = -3.0
    assert metrics_mod.hoyer(one_hot).item() == pytest.approx(1.0)
    assert metrics_mod.gini(one_hot).item() == pytest.approx(1 - 1 / 16)
    equal = torch.full((1, 3, 3), -2.0)
    assert metrics_mod.hoyer(equal).item() == pytest.approx(0.0, abs=1e-12)
    assert metrics_mod.gini(equal).item() == pytest.approx(0.0, abs=1e-12)
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    c = np.sort(np.abs(x.numpy().ravel()))
    n = c.size
    ref_gini = 1 - 2 * sum(c[j] / c.sum() * (n - (j + 1) + 0.5) / n for j in range(n))
    ref_hoyer = (math.sqrt(n) - c.sum() / math.sqrt((c**2).sum())) / (math.sqrt(n) - 1)
    assert metrics_mod.gini(x).item() == pytest.approx(ref_gini)
    assert metrics_mod.hoyer(x).item() == pytest.approx(ref_hoyer)
    assert math.isnan(metrics_mod.hoyer(torch.zeros(1, 2, 2)).item())
    assert math.isnan(metrics_mod.gini(torch.zeros(1, 2, 2)).item())


def test_metrics_from_svdvals_match_numpy_reference():
    w = matrix_with_spectrum(30, 70, geometric_spectrum(30, 1e3), GEN)
    s = spectra.svdvals(w)
    ref = ref_svdvals(w.numpy())
    p = ref / ref.sum()
    er = math.exp(-(p * np.log(p)).sum())
    assert metrics_mod.effective_rank(s).item() == pytest.approx(er, rel=1e-9)
    assert metrics_mod.proportional_effective_rank(s).item() == pytest.approx(er / 30, rel=1e-9)
    assert metrics_mod.condition_number(s, 70).item() == pytest.approx(ref[0] / ref[-1], rel=1e-6)
    assert metrics_mod.numerical_rank(s, 70).item() == np.linalg.matrix_rank(w.numpy())


def test_parse_metrics():
    assert metrics_mod.parse_metrics("per, cn") == ("per", "cn")
    assert metrics_mod.parse_metrics(None) == metrics_mod.DEFAULT_METRICS
    # 'all' adds the opt-in metrics (the correlation traps) to the defaults
    assert metrics_mod.parse_metrics("all") == tuple(metrics_mod.METRICS)
    assert set(metrics_mod.parse_metrics("all")) - set(metrics_mod.DEFAULT_METRICS) == set(
        metrics_mod.OPT_IN_METRICS)
    with pytest.raises(ValueError, match="unknown metric.*bogus.*valid: er, per, cn"):
        metrics_mod.parse_metrics("per,bogus")
