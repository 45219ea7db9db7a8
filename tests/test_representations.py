"""dynlab.analysis.representations against independent references (direct HSIC, hand formulas,
covariance-whitening CCA) on data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from dynlab.analysis import representations as R


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------
# CKA


def direct_cka(x, y):
    """HSIC_0 through n × n Gram matrices and the centring matrix H, written out."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.mark.parametrize("n,p,q", [(50, 8, 5), (6, 20, 30), (40, 40, 3)])
def test_cka_equals_direct_hsic(n, p, q):
    g = rng(n)
    x = g.normal(size=(n, p)) + 3.0
    y = x[:, :1] * g.normal(size=(1, q)) + g.normal(size=(n, q))
    assert R.linear_cka(x, y) == pytest.approx(direct_cka(x, y), rel=1e-10)
    assert R.hsic_biased(x @ x.T, y @ y.T) == pytest.approx(
        np.trace(x @ x.T @ (np.eye(n) - 1 / n) @ y @ y.T @ (np.eye(n) - 1 / n)) / (n - 1) ** 2,
        rel=1e-10)


def test_cka_invariances_and_identity():
    g = rng(1)
    x, y = g.normal(size=(60, 10)), g.normal(size=(60, 7))
    y[:, :3] += x[:, :3]
    base = R.linear_cka(x, y)
    q = ortho_group.rvs(10, random_state=2)
    assert R.linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert R.linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert R.linear_cka(x + 100.0, y) == pytest.approx(base, rel=1e-8)  # centred
    assert R.linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    assert R.linear_cka(x, 3 * x @ q) == pytest.approx(1.0, rel=1e-12)
    assert 0 < base < 1
    # anisotropic scaling is not an invariance
    assert abs(R.linear_cka(x * np.arange(1, 11), y) - base) > 1e-3


def test_cka_edges():
    g = rng(3)
    x = g.normal(size=(10, 4))
    assert math.isnan(R.linear_cka(np.ones((10, 4)), x))  # zero variance
    assert math.isnan(R.linear_cka(x[:1], x[:1]))
    bad = x.copy()
    bad[2, 1] = np.nan
    assert math.isnan(R.linear_cka(bad, x))
    assert math.isnan(R.debiased_cka(x, np.where(True, np.inf, x)))
    with pytest.raises(ValueError, match="same samples"):
        R.linear_cka(x, x[:5])
    # rank-deficient: a duplicated feature does not break anything
    dup = np.concatenate([x, x[:, :1]], axis=1)
    assert math.isfinite(R.linear_cka(dup, x)) and math.isfinite(R.debiased_cka(dup, x))


# ----------------------------------------------------------------------------------------
# Debiased CKA


def hand_unbiased_hsic(k, l_):
    """Song et al. 2012, eq. 5, with explicit loops over index tuples."""
    n = k.shape[0]
    tr = sum(k[i, j] * l_[i, j] for i in range(n) for j in range(n) if i != j)
    sk = sum(k[i, j] for i in range(n) for j in range(n) if i != j)
    sl = sum(l_[i, j] for i in range(n) for j in range(n) if i != j)
    cross = sum(k[i, j] * l_[j, m] for i in range(n) for j in range(n) for m in range(n)
                if i != j and j != m)
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def test_debiased_cka_matches_unbiased_hsic_by_hand():
    x = np.array([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0], [2.0, 2.0], [-1.0, 0.5], [0.5, 0.0]])
    y = np.array([[2.0], [-1.0], [1.0], [3.0], [0.0], [1.5]])
    k, l_ = x @ x.T, y @ y.T
    ref = hand_unbiased_hsic(k, l_) / math.sqrt(hand_unbiased_hsic(k, k)
                                                 * hand_unbiased_hsic(l_, l_))
    assert R.debiased_cka(x, y) == pytest.approx(ref, rel=1e-10)
    assert R.hsic_unbiased(k, l_) == pytest.approx(hand_unbiased_hsic(k, l_), rel=1e-10)
    # HSIC_1 of linear kernels does not change when the data are shifted
    xs = x + np.array([5.0, -3.0])
    ks = xs @ xs.T
    assert hand_unbiased_hsic(ks, l_) == pytest.approx(hand_unbiased_hsic(k, l_), rel=1e-9)


def test_debiased_cka_properties():
    g = rng(4)
    x = g.normal(size=(30, 50))
    assert R.debiased_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    q = ortho_group.rvs(50, random_state=5)
    y = g.normal(size=(30, 20))
    assert R.debiased_cka(x @ q * 4, y) == pytest.approx(R.debiased_cka(x, y), rel=1e-9)
    # independent high-dimensional noise: the biased CKA is far from 0, the debiased one not
    assert R.linear_cka(x, y) > 0.4
    assert abs(R.debiased_cka(x, y)) < 0.1
    assert math.isnan(R.debiased_cka(x[:3], y[:3]))
    assert math.isnan(R.hsic_unbiased(np.eye(3), np.eye(3)))


# ----------------------------------------------------------------------------------------
# CCA, SVCCA, PWCCA on a planted shared subspace


def planted(n, rhos, px, py, seed, noise_scale=1.0):
    """X, Y with len(rhos) shared latent directions of population canonical correlations
    `rhos`, mixed into px and py features by random invertible maps; the other features are
    independent noise of variance noise_scale²."""
    g = rng(seed)
    k = len(rhos)
    z = g.normal(size=(n, k))
    ey = g.normal(size=(n, k))
    xs = np.concatenate([z, noise_scale * g.normal(size=(n, px - k))], axis=1)
    yshared = z * rhos + ey * np.sqrt(1 - np.asarray(rhos) ** 2)
    ys = np.concatenate([yshared, noise_scale * g.normal(size=(n, py - k))], axis=1)
    mx = ortho_group.rvs(px, random_state=seed + 1) * g.uniform(0.5, 2, size=px)
    my = ortho_group.rvs(py, random_state=seed + 2) * g.uniform(0.5, 2, size=py)
    return xs @ mx + 1.0, ys @ my - 2.0


def whitened_cca(x, y):
    """Canonical correlations and X-side directions by whitening the covariances:
    SVD of Cxx^{-1/2}·Cxy·Cyy^{-1/2} (scipy float64)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    cxx, cyy, cxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    wx = np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cxx)))
    wy = np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cyy)))
    u, s, _ = scipy.linalg.svd(wx @ cxy @ wy)
    m = min(x.shape[1], y.shape[1])
    return s[:m], wx @ u[:, :m]


def test_canonical_correlations_planted():
    rhos = [0.95, 0.8, 0.5]
    x, y = planted(20000, rhos, 8, 6, seed=10)
    got = R.canonical_correlations(x, y)
    ref, _ = whitened_cca(x, y)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert got.shape == (6,)
    np.testing.assert_allclose(got[:3], rhos, atol=0.02)  # the planted correlations
    assert (got[3:] < 0.05).all()  # independent noise


def test_cca_rank_deficient_and_degenerate():
    x, y = planted(500, [0.9, 0.6], 5, 4, seed=11)
    dup = np.concatenate([x, x[:, :2] * 3 - 1, np.zeros((500, 1))], axis=1)
    np.testing.assert_allclose(R.canonical_correlations(dup, y),
                               R.canonical_correlations(x, y), rtol=1e-9)
    # fewer samples than features: the column spaces must intersect -> NaN, never a crash
    g = rng(12)
    a, b = g.normal(size=(10, 12)), g.normal(size=(10, 3))
    assert np.isnan(R.canonical_correlations(a, b)).all()
    assert math.isnan(R.svcca(a, b, keep=12)) and math.isnan(R.pwcca(a, b))
    assert math.isnan(R.pwcca(np.zeros((50, 3)), y[:50]))
    assert math.isnan(R.svcca(np.full((50, 3), np.inf), y[:50]))
    # rank(X) + rank(Y) = n - 1 is still defined; one more is not
    a, b = g.normal(size=(9, 4)), g.normal(size=(9, 4))
    assert np.isfinite(R.canonical_correlations(a, b)).all()
    assert np.isnan(R.canonical_correlations(a[:8], b[:8])).all()


def reference_pwcca(x, y):
    """Morcos et al. 2018 eq. (with weights on x's own canonical variates and activations)."""
    rho, dirs = whitened_cca(x, y)
    xc = x - x.mean(0)
    h = xc @ dirs
    h /= np.linalg.norm(h, axis=0)
    w = np.abs(h.T @ xc).sum(axis=1)
    return float(np.sum(w / w.sum() * rho))


def test_pwcca_planted_and_side_choice():
    rhos = [0.9, 0.7]
    x, y = planted(5000, rhos, 4, 9, seed=13)  # x is the smaller side
    assert R.pwcca(x, y) == pytest.approx(reference_pwcca(x, y), rel=1e-6)
    # the smaller side carries the weights whichever argument it is, with its own activations
    assert R.pwcca(y, x) == pytest.approx(reference_pwcca(x, y), rel=1e-6)
    # weighting by the larger side's activations gives another number: the choice matters
    assert abs(reference_pwcca(y, x) - reference_pwcca(x, y)) > 1e-3
    # PWCCA lies between the smallest and largest of the canonical correlations
    rho = R.canonical_correlations(x, y)
    assert rho.min() <= R.pwcca(x, y) <= rho.max()


def test_svcca_planted():
    rhos = [0.9, 0.6, 0.3]
    # the shared directions carry nearly all the variance, so the 99 % cut keeps exactly them
    x, y = planted(8000, rhos, 7, 5, seed=14, noise_scale=1e-3)
    got = R.svcca(x, y)

    def reduce(a):
        u, s, _ = np.linalg.svd(a - a.mean(0), full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.99) + 1)
        return u[:, :k] * s[:k]

    rx, ry = reduce(x), reduce(y)
    assert rx.shape[1] == 3 and ry.shape[1] == 3
    ref, _ = whitened_cca(rx, ry)
    assert got == pytest.approx(float(np.mean(ref)), rel=1e-6)
    assert got == pytest.approx(np.mean(rhos), abs=0.02)
    assert R.svcca(x, y, keep=2) == pytest.approx(
        float(np.mean(whitened_cca(rx[:, :2], ry[:, :2])[0])), rel=1e-6)
    with pytest.raises(ValueError):
        R.svcca(x, y, keep=1.5)


# ----------------------------------------------------------------------------------------
# Anisotropy and IsoScore


@pytest.mark.parametrize("c", [0.0, 0.3, 0.85])
def test_anisotropy_known_mean_cosine(c):
    n, p = 12, 20
    e = ortho_group.rvs(p, random_state=7)  # orthonormal rows e_0 .. e_{p-1}
    u = math.sqrt(c) * e[0] + math.sqrt(1 - c) * e[1:n + 1]
    scale = rng(8).uniform(0.1, 10, size=(n, 1))
    x = np.concatenate([u * scale, np.zeros((1, p))])  # a zero row is ignored
    assert R.anisotropy(x) == pytest.approx(c, abs=1e-12)


def test_anisotropy_brute_force_and_edges():
    x = rng(9).normal(size=(15, 6)) + 0.7
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairs = [u[i] @ u[j] for i in range(15) for j in range(15) if i != j]
    assert R.anisotropy(x) == pytest.approx(np.mean(pairs), rel=1e-12)
    assert R.anisotropy(np.ones((5, 3))) == pytest.approx(1.0)
    assert math.isnan(R.anisotropy(np.zeros((5, 3))))
    assert math.isnan(R.anisotropy(x[:1]))
    assert math.isnan(R.anisotropy(np.array([[np.nan, 1.0], [1.0, 2.0]])))


def even_spread(n, p, k, seed):
    """n samples whose centred covariance has k equal eigenvalues and p − k zeros."""
    g = rng(seed)
    basis = np.linalg.qr(np.concatenate([np.ones((n, 1)), g.normal(size=(n, k))], axis=1))[0]
    u = basis[:, 1:k + 1]  # orthonormal and orthogonal to 1: already centred
    v = ortho_group.rvs(p, random_state=seed)[:k]
    return 5.0 * u @ v


@pytest.mark.parametrize("k", [1, 3, 8])
def test_isoscore_known_values(k):
    p = 8
    x = even_spread(50, p, k, seed=k)
    assert R.isoscore(x) == pytest.approx((k - 1) / (p - 1), abs=1e-10)
    # independent of the mean direction, unlike anisotropy
    shifted = x + 40.0 * rng(0).normal(size=(1, p))
    assert R.isoscore(shifted) == pytest.approx(R.isoscore(x), abs=1e-10)
    assert R.anisotropy(shifted) > R.anisotropy(x) + 0.5


def test_isoscore_formula_and_edges():
    x = rng(15).normal(size=(200, 5)) * np.array([3.0, 1.0, 1.0, 0.5, 0.1])
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    p = 5
    sh = math.sqrt(p) * lam / np.linalg.norm(lam)
    d = np.linalg.norm(sh - 1) / math.sqrt(2 * (p - math.sqrt(p)))
    phi = (p - d**2 * (p - math.sqrt(p))) ** 2 / p**2
    assert R.isoscore(x) == pytest.approx((p * phi - 1) / (p - 1), rel=1e-10)
    assert math.isnan(R.isoscore(np.ones((10, 4))))
    assert math.isnan(R.isoscore(x[:, :1]))
    assert math.isnan(R.isoscore(np.full((3, 3), np.nan)))
    # fewer samples than features: capped by the n − 1 directions that can carry variance
    few = rng(16).normal(size=(4, 10))
    assert R.isoscore(few) <= (4 - 2) / (10 - 1) + 1e-12


# ----------------------------------------------------------------------------------------
# pico-analyze's CKA and PWCCA (the pico convention)


def pico_reference_cka(x, y):
    """pico-analyze's CKA written out: float32 inputs, centred columns, ‖XᵀY‖²/(‖XᵀX‖‖YᵀY‖),
    every step in float32 (einsum instead of matrix products)."""
    a, b = x.astype(np.float32), y.astype(np.float32)
    a = a - a.sum(axis=0, dtype=np.float32) / np.float32(a.shape[0])
    b = b - b.sum(axis=0, dtype=np.float32) / np.float32(b.shape[0])
    xty = np.einsum("ni,nj->ij", a, b)
    xtx, yty = np.einsum("ni,nj->ij", a, a), np.einsum("ni,nj->ij", b, b)
    return float(np.sum(xty * xty) / (np.sqrt(np.sum(xtx * xtx)) * np.sqrt(np.sum(yty * yty))))


def gram_schmidt(m):
    """Orthonormal columns spanning m's columns, in order (classical Gram–Schmidt, twice)."""
    q = np.zeros_like(m)
    for j in range(m.shape[1]):
        v = m[:, j].copy()
        for _ in range(2):
            v -= q[:, :j] @ (q[:, :j].T @ v)
        q[:, j] = v / np.linalg.norm(v)
    return q


def pico_reference_pwcca(x, y):
    """pico-analyze's PWCCA (its CCA with ε = 0 and its projection weighting) written out with
    other routes: numpy.cov, scipy's matrix square root of the pseudo-inverse, Gram–Schmidt for
    QR. NaN where that pseudo-inverse has a negative eigenvalue (rounding of a singular or
    ill-conditioned covariance)."""
    acts1, acts2 = x.astype(np.float32).T, y.astype(np.float32).T  # neurons × samples
    p = acts1.shape[0]
    c = np.cov(acts1, acts2)
    sxx, sxy, syy = c[:p, :p], c[:p, p:], c[p:, p:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    inv_x, inv_y = np.linalg.pinv(sxx), np.linalg.pinv(syy)
    if min(scipy.linalg.eigvalsh(inv_x)[0], scipy.linalg.eigvalsh(inv_y)[0]) < 0:
        return math.nan  # pico-analyze's square root is NaN: it retries on random noise
    ix, iy = np.real(scipy.linalg.sqrtm(inv_x)), np.real(scipy.linalg.sqrtm(inv_y))
    u, s, _ = np.linalg.svd(ix @ sxy @ iy)
    mean1 = acts1.mean(axis=1, keepdims=True)
    dirns = u.T @ (acts1 - mean1) + mean1
    p_ = gram_schmidt(dirns.T.astype(np.float64))
    w = np.abs(p_.T @ acts1.T).sum(axis=1)
    return float(np.sum(w / w.sum() * np.abs(s)))


@pytest.mark.parametrize("n,p", [(40, 6), (200, 24), (90, 40)])
def test_pico_cka_pwcca_against_written_out_reference(n, p):
    g = rng(100 + n)
    x = (g.normal(size=(n, p)) + 0.5).astype(np.float32)
    y = (x @ g.normal(size=(p, p)) * 0.3 + g.normal(size=(n, p))).astype(np.float32)
    assert R.pico_linear_cka(x, y) == pytest.approx(pico_reference_cka(x, y), rel=2e-6)
    # float32 arithmetic: equal to the float64 CKA up to float32 rounding
    assert R.pico_linear_cka(x, y) == pytest.approx(R.linear_cka(x, y), rel=2e-5)
    assert R.pico_pwcca(x, y) == pytest.approx(pico_reference_pwcca(x, y), rel=1e-9)
    # pico-analyze's weighting is not dynlab's (uncentred features, no whitening)
    assert abs(R.pico_pwcca(x, y) - R.pwcca(x, y)) > 1e-3


def test_pico_cka_pwcca_properties():
    g = rng(7)
    x = g.normal(size=(120, 10)).astype(np.float32) + 2.0
    y = (x[:, :5] @ g.normal(size=(5, 10)) + g.normal(size=(120, 10))).astype(np.float32)
    assert R.pico_linear_cka(x, x) == pytest.approx(1.0, rel=1e-6)
    assert R.pico_pwcca(x, x) == pytest.approx(1.0, rel=1e-9)
    base_c, base_p = R.pico_linear_cka(x, y), R.pico_pwcca(x, y)
    q = ortho_group.rvs(10, random_state=3)
    # CKA: orthogonal transforms and isotropic scaling of either side
    assert R.pico_linear_cka(x @ q, 3 * y) == pytest.approx(base_c, rel=1e-5)
    # PWCCA: isotropic scalings of either side
    assert R.pico_pwcca(4 * x, 0.5 * y) == pytest.approx(base_p, rel=1e-5)
    # an invertible map of the target leaves ρ and U up to the signs of U's columns; with the
    # means added back, D = Uᵀ(X − μ) + μ depends on those signs unless μ = 0
    m = g.normal(size=(10, 10))
    xc = x - x.mean(axis=0)
    assert R.pico_pwcca(xc, y @ m) == pytest.approx(R.pico_pwcca(xc, y), rel=1e-4)
    # not invariant to a shift of the source: the weights use the uncentred activations
    assert abs(R.pico_pwcca(xc, y) - base_p) > 1e-4
    assert 0 < base_c < 1 and 0 < base_p < 1


def test_pico_edges_give_nan():
    g = rng(8)
    x, y = g.normal(size=(20, 30)), g.normal(size=(20, 30))
    assert math.isnan(R.pico_pwcca(x, y))  # p ≥ n: pico-analyze asserts fewer features
    assert math.isnan(R.pico_pwcca(g.normal(size=(50, 8)), g.normal(size=(50, 5))))  # p > q
    assert math.isnan(R.pico_pwcca(np.ones((50, 4)), g.normal(size=(50, 4))))  # no variance
    assert math.isnan(R.pico_linear_cka(np.ones((50, 4)), g.normal(size=(50, 4))))
    bad = g.normal(size=(50, 4))
    bad[3, 1] = np.inf
    assert math.isnan(R.pico_linear_cka(bad, bad)) and math.isnan(R.pico_pwcca(bad, bad))
    # fewer samples than features: CKA is still defined (feature space, float32)
    assert R.pico_linear_cka(x, y) == pytest.approx(R.linear_cka(x, y), rel=2e-5)
