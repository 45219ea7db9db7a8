"""Similarity and geometry of representations (activation matrices, samples × features).

Every function takes activation matrices X (n × p) and Y (n × q) whose rows are the same n
samples (token positions) seen by two layers, checkpoints or models, and computes in float64,
except `pico_linear_cka` and `pico_pwcca`, which keep pico-analyze's float32 steps (the `pico`
convention; their docstrings list where they differ from the functions above them).

Conventions shared by every function:

* Centring: columns are centred (each feature's mean over the samples is removed) before any
  similarity is computed, except where a docstring says otherwise (anisotropy is about the
  raw vectors).
* Bad input never crashes: a matrix holding NaN/Inf, too few samples for the estimator, or a
  representation with zero variance gives NaN.
* Fewer samples than features: CCA-based indices (SVCCA, PWCCA) are only meaningful when the
  two centred column spaces can be told apart. The centred samples live in an (n − 1)-
  dimensional space; when the numerical ranks satisfy rank(X) + rank(Y) > n − 1 the two
  column spaces must intersect, so at least rank(X) + rank(Y) − (n − 1) canonical
  correlations are 1 by construction, whatever the data. Those cases give NaN (no
  regularisation is applied). CKA has no such degeneracy and is computed for any n ≥ 2
  (debiased CKA: n ≥ 4).
* Numerical rank: singular values at or below max(n, p)·eps·σ_1 of the centred matrix count
  as zero (numpy.linalg.matrix_rank's rule), so rank-deficient activations (dead units,
  duplicated features) are handled by dropping the null directions.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from dynlab.analysis.memo import remembered

#: SVCCA keeps the leading singular directions that explain this fraction of the variance
#: (Raghu et al. 2017 keep 99 %).
SVCCA_VARIANCE = 0.99


@contextlib.contextmanager
def _one_thread():
    """Products and SVDs go through torch with one thread: numpy's threaded BLAS was measured
    20× slower than a single thread for 256 × 256 SVDs on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64."""
    with _one_thread():
        return (torch.from_numpy(np.ascontiguousarray(a))
                @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


def _svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, s, Vᵀ) in float64."""
    with _one_thread():
        u, s, vt = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(x)),
                                    full_matrices=False)
    return u.numpy(), s.numpy(), vt.numpy()


def _matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples × features), got shape {a.shape}")
    return a


def _pair(x, y) -> tuple[np.ndarray, np.ndarray] | None:
    """Both as float64 matrices with the same number of rows; None when either holds NaN/Inf."""
    a, b = _matrix(x, "x"), _matrix(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"x and y must hold the same samples (rows): {a.shape[0]} != {b.shape[0]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    return a, b


def centre(x: np.ndarray) -> np.ndarray:
    """X − 1·meanᵀ: each column (feature) centred over the samples (rows)."""
    return x - x.mean(axis=0, keepdims=True)


# ----------------------------------------------------------------------------------------
# HSIC and CKA


def hsic_biased(k: np.ndarray, l_: np.ndarray) -> float:
    """The biased HSIC estimator (Gretton et al. 2005) of two n × n Gram matrices:
    HSIC_0(K, L) = tr(K·H·L·H) / (n − 1)², H = I − 11ᵀ/n."""
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return float(np.trace(k @ h @ l_ @ h) / (n - 1) ** 2)


def hsic_unbiased(k: np.ndarray, l_: np.ndarray) -> float:
    """The unbiased HSIC estimator (Song et al. 2012, eq. 5) of two n × n Gram matrices, n ≥ 4:
    with K̃, L̃ the Gram matrices with their diagonals set to zero,
    HSIC_1 = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).
    NaN for n < 4."""
    n = k.shape[0]
    if n < 4:
        return math.nan
    kt = k - np.diag(np.diag(k))
    lt = l_ - np.diag(np.diag(l_))
    one = np.ones(n)
    value = (np.trace(kt @ lt)
             + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (one @ kt @ lt @ one))
    return float(value / (n * (n - 3)))


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) with the biased HSIC estimator, the one
    pico-analyze uses: with X, Y column-centred,
    CKA = ‖YᵀX‖_F² / (‖XᵀX‖_F · ‖YᵀY‖_F) = HSIC_0(K, L) / sqrt(HSIC_0(K, K)·HSIC_0(L, L)),
    K = XXᵀ, L = YYᵀ. In [0, 1]; 1 for X = Y (up to an orthogonal transform and isotropic
    scaling). NaN when a side has zero variance, n < 2, or NaN/Inf entries. Computed in
    feature space or through the n × n Gram matrices, whichever is smaller."""
    pair = _pair(x, y)
    if pair is None or pair[0].shape[0] < 2:
        return math.nan
    a, b = centre(pair[0]), centre(pair[1])
    n, p, q = a.shape[0], a.shape[1], b.shape[1]
    if n < max(p, q):
        k, l_ = _mm(a, a.T), _mm(b, b.T)
        num, kk, ll = np.sum(k * l_), np.sum(k * k), np.sum(l_ * l_)
    else:
        num = np.sum(_mm(b.T, a) ** 2)
        kk, ll = np.sum(_mm(a.T, a) ** 2), np.sum(_mm(b.T, b) ** 2)
    den = math.sqrt(kk) * math.sqrt(ll)
    if not den > 0:
        return math.nan
    return float(num / den)


def _hsic_unbiased_linear(a: np.ndarray, b: np.ndarray) -> float:
    """HSIC_1(XXᵀ, YYᵀ) in feature space, O(n·p·q) without n × n matrices: with d_K the row
    norms² of X (the diagonal of K),
    tr(K̃L̃) = ‖XᵀY‖_F² − Σ_i d_K,i·d_L,i,  1ᵀK̃1 = ‖Xᵀ1‖² − Σ_i d_K,i,
    K̃1 = X·(Xᵀ1) − d_K,  1ᵀK̃L̃1 = (K̃1)ᵀ(L̃1)."""
    n = a.shape[0]
    dk, dl = np.sum(a * a, axis=1), np.sum(b * b, axis=1)
    sa, sb = a.sum(axis=0), b.sum(axis=0)
    tr = np.sum(_mm(a.T, b) ** 2) - dk @ dl
    k1, l1 = a @ sa - dk, b @ sb - dl
    sum_k, sum_l = sa @ sa - dk.sum(), sb @ sb - dl.sum()
    value = tr + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)
    return float(value / (n * (n - 3)))


def debiased_cka(x, y) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012; recommended by
    Kornblith et al. 2019 for few samples): HSIC_1(K, L) / sqrt(HSIC_1(K, K)·HSIC_1(L, L)),
    K = XXᵀ, L = YYᵀ of the column-centred activations (HSIC_1 of a linear kernel does not
    change when the data are shifted; centring only improves the arithmetic). It can be
    slightly negative. NaN for n < 4, when HSIC_1(K, K) or HSIC_1(L, L) is not positive
    (no variance left after debiasing), or for NaN/Inf entries."""
    pair = _pair(x, y)
    if pair is None or pair[0].shape[0] < 4:
        return math.nan
    a, b = centre(pair[0]), centre(pair[1])
    kk, ll = _hsic_unbiased_linear(a, a), _hsic_unbiased_linear(b, b)
    if not (kk > 0 and ll > 0):
        return math.nan
    return _hsic_unbiased_linear(a, b) / math.sqrt(kk * ll)


# ----------------------------------------------------------------------------------------
# CCA, SVCCA, PWCCA


def _column_basis(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U_r, s_r, V_r): the thin SVD of a centred matrix truncated to its numerical rank r
    (σ_i > max(n, p)·eps·σ_1). U_r (n × r) is an orthonormal basis of its column space."""
    u, s, vt = _svd(xc)
    if s.size == 0 or not s[0] > 0:
        r = 0
    else:
        r = int(np.sum(s > max(xc.shape) * np.finfo(np.float64).eps * s[0]))
    return u[:, :r], s[:r], vt[:r].T


def _cca_from_bases(ux: np.ndarray, uy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical correlations ρ (descending) and the left/right singular vectors of UxᵀUy.

    With orthonormal bases Ux, Uy of the two centred column spaces, the canonical
    correlations are the singular values of UxᵀUy (the cosines of the principal angles,
    Björck & Golub 1973), and the canonical variates of X are Ux·a_i."""
    a, rho, bt = _svd(_mm(ux.T, uy))
    return np.clip(rho, 0.0, 1.0), a, bt.T


def _degenerate(n: int, rx: int, ry: int) -> bool:
    """True when CCA is trivial or undefined: a side without variance, or column spaces that
    must intersect because rx + ry exceeds the n − 1 dimensions of centred samples."""
    return rx == 0 or ry == 0 or rx + ry > n - 1


def canonical_correlations(x, y) -> np.ndarray:
    """Canonical correlations ρ_1 ≥ … ≥ ρ_m (m = min(rank X, rank Y)) of the column-centred
    activations (Hotelling 1936), through orthonormal bases of the two column spaces (SVD
    truncated to the numerical rank) and the SVD of UxᵀUy. A single NaN when CCA is
    degenerate (see the module docstring: rank X + rank Y > n − 1, a side without variance,
    NaN/Inf entries)."""
    pair = _pair(x, y)
    if pair is None:
        return np.array([math.nan])
    a, b = centre(pair[0]), centre(pair[1])
    ux, _, _ = _column_basis(a)
    uy, _, _ = _column_basis(b)
    if _degenerate(a.shape[0], ux.shape[1], uy.shape[1]):
        return np.array([math.nan])
    return _cca_from_bases(ux, uy)[0]


def _leading_directions(xc: np.ndarray, keep: float | int) -> np.ndarray:
    """The centred activations projected on their leading singular directions, U_k·diag(s_k):
    k = keep when an int, else the smallest k whose σ² explain at least `keep` of Σσ²."""
    u, s, _ = _column_basis(xc)
    if s.size == 0:
        return u
    if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool):
        k = min(int(keep), s.size)
    else:
        frac = np.cumsum(s * s) / np.sum(s * s)
        k = int(np.searchsorted(frac, float(keep) - 1e-12) + 1)
        k = min(k, s.size)
    return u[:, :k] * s[:k]


def svcca(x, y, keep: float | int = SVCCA_VARIANCE) -> float:
    """SVCCA (Raghu et al. 2017): reduce each centred representation to its leading singular
    directions (those explaining `keep` = 99 % of the variance, or `keep` directions when an
    int), then the mean of the canonical correlations of the two reductions. NaN where CCA
    of the reductions is degenerate (module docstring)."""
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise ValueError(f"keep must be a variance fraction in (0, 1] or a count, not {keep}")
    pair = _pair(x, y)
    if pair is None:
        return math.nan
    rx = _leading_directions(centre(pair[0]), keep)
    ry = remembered(_leading_directions, centre(pair[1]), keep)  # the target's: once per target
    rho = canonical_correlations(rx, ry)
    return float(np.mean(rho))


def pwcca(x, y) -> float:
    """Projection-weighted CCA (Morcos, Raghu & Bengio 2018): Σ_i α_i·ρ_i with the canonical
    correlations ρ_i and weights α_i ∝ Σ_j |⟨h_i, z_j⟩| (normalised to sum to 1), where h_i
    are the unit-norm canonical variates of one representation and z_j the centred
    activation vectors of that same representation's features (its columns).

    The weights are taken on the side with fewer features (X on a tie), as the reference
    implementation does, but always with that side's own canonical variates *and* its own
    activations (the reference implementation pairs Y's canonical coefficients with X's
    activations when Y is the smaller side). NaN where CCA is degenerate (module docstring)."""
    pair = _pair(x, y)
    if pair is None:
        return math.nan
    a, b = centre(pair[0]), centre(pair[1])
    if b.shape[1] < a.shape[1]:
        a, b = b, a
    ua, _, _ = _column_basis(a)
    ub, _, _ = _column_basis(b)
    if _degenerate(a.shape[0], ua.shape[1], ub.shape[1]):
        return math.nan
    rho, left, _ = _cca_from_bases(ua, ub)
    variates = _mm(ua, left)  # (n × m), orthonormal columns: the canonical variates of `a`
    weights = np.abs(_mm(variates.T, a)).sum(axis=1)
    total = weights.sum()
    if not total > 0:
        return math.nan
    return float(np.sum(weights / total * rho))


# ----------------------------------------------------------------------------------------
# Geometry of one representation


def anisotropy(x) -> float:
    """Mean cosine similarity between the representations of different samples (Ethayarajh
    2019): with u_i = x_i / ‖x_i‖ over the rows with non-zero norm (n of them),
    (1/(n(n−1))) Σ_{i≠j} u_iᵀu_j = (‖Σ_i u_i‖² − n) / (n(n−1)). Not centred: it measures how
    far the vectors crowd into a cone around their common direction (1: all parallel, ≈ 0:
    spread over all directions; it can be negative). NaN for fewer than 2 non-zero rows or
    NaN/Inf entries."""
    a = _matrix(x, "x")
    if not np.isfinite(a).all():
        return math.nan
    norms = np.linalg.norm(a, axis=1)
    keep = norms > 0
    n = int(keep.sum())
    if n < 2:
        return math.nan
    u = a[keep] / norms[keep, None]
    s = u.sum(axis=0)
    return float((s @ s - n) / (n * (n - 1)))


def isoscore(x) -> float:
    """IsoScore (Rudman, Gillman, Rayne & Eickhoff 2022), an isotropy measure that does not
    depend on the mean direction (it uses only the covariance). With p features and Σ_D the
    variances along the principal components (the eigenvalues of the sample covariance,
    zeros included, p of them):
    Σ̂ = √p·Σ_D / ‖Σ_D‖,  δ = ‖Σ̂ − 1‖ / sqrt(2(p − √p)),  φ = (p − δ²(p − √p))² / p²,
    IsoScore = (p·φ − 1) / (p − 1).
    1 for isotropic data, 0 when all variance lies in one direction, and (k − 1)/(p − 1) when
    it is spread evenly over k of the p directions. With n ≤ p samples at most n − 1
    directions carry variance, so the score is at most (n − 2)/(p − 1). NaN for p < 2, n < 2,
    zero variance or NaN/Inf entries."""
    a = _matrix(x, "x")
    n, p = a.shape
    if p < 2 or n < 2 or not np.isfinite(a).all():
        return math.nan
    with _one_thread():
        s = torch.linalg.svdvals(torch.from_numpy(centre(a))).numpy()
    var = np.zeros(p)
    var[: s.size] = s * s / (n - 1)
    norm = np.linalg.norm(var)
    if not norm > 0:
        return math.nan
    scaled = math.sqrt(p) * var / norm
    delta = np.linalg.norm(scaled - 1.0) / math.sqrt(2 * (p - math.sqrt(p)))
    phi = (p - delta**2 * (p - math.sqrt(p))) ** 2 / p**2
    return float((p * phi - 1) / (p - 1))


# ----------------------------------------------------------------------------------------
# pico-analyze's CKA and PWCCA (the `pico` convention, dynlab.analysis.conventions)
#
# pico-analyze (pico-lm/pico-analyze, src/metrics/{cka,pwcca}.py) hands each pair of
# activation matrices, cast to float32, to Kornblith et al.'s feature-space CKA and to the SVCCA
# authors' PWCCA code (Google's `svcca` repository). The two functions below compute the same
# formulas with the same precisions, cut-offs and choices, so that a store analysed under
# `--convention pico` holds pico-analyze's numbers; the differences from dynlab's own
# `linear_cka` / `pwcca` are listed in each docstring.

#: numpy.linalg.pinv's default relative cut-off, used by pico-analyze's CCA
PICO_PINV_RCOND = 1e-15


def pico_linear_cka(x, y) -> float:
    """pico-analyze's CKA: the biased linear CKA of `linear_cka`,
    ‖XᵀY‖_F² / (‖XᵀX‖_F·‖YᵀY‖_F) of the column-centred X, Y, with the inputs rounded to float32
    and every step (centring, products, norms) in float32, as pico-analyze computes it. It
    differs from `linear_cka` by float32 rounding only, which depends on the summation order of
    the BLAS (≈ 1e-6 relative at 256 × 128, up to ≈ 1e-4 at 2048 × 512, in pico-analyze as
    here). NaN where pico-analyze gets NaN (zero variance: 0/0) and for NaN/Inf entries."""
    pair = _pair(x, y)
    if pair is None:
        return math.nan
    a, b = pair[0].astype(np.float32), pair[1].astype(np.float32)
    a = torch.from_numpy(a - a.mean(axis=0, keepdims=True))
    b = torch.from_numpy(b - b.mean(axis=0, keepdims=True))
    with _one_thread():
        num = torch.linalg.matrix_norm(a.T @ b) ** 2
        den = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    value = float(num / den)
    return value if math.isfinite(value) else math.nan


def pico_inverse_sqrt(s: torch.Tensor) -> torch.Tensor:
    """S^(−1/2) as pico-analyze's CCA forms it: the eigen-decomposition V·diag(w)·Vᵀ of the
    pseudo-inverse S⁺ (numpy's pinv rule: singular values below 1e-15·σ_max dropped), then
    V·diag(√w)·Vᵀ. A slightly negative w (rounding, when S is singular or ill-conditioned)
    gives NaN entries, as in pico-analyze. float64."""
    w, v = torch.linalg.eigh(torch.linalg.pinv(s, rtol=PICO_PINV_RCOND))
    return (v * torch.sqrt(w)) @ v.T


def pico_pwcca(x, y) -> float:
    """pico-analyze's PWCCA of the source X (n × p) against the target Y (n × q), float32
    inputs (Morcos, Raghu & Bengio 2018, through the SVCCA authors' reference code):

    1. Σ = cov([Xᵀ; Yᵀ]) in float64 (ddof 1), each block scaled: Σ_xx/max|Σ_xx|,
       Σ_yy/max|Σ_yy|, Σ_xy/√(max|Σ_xx|·max|Σ_yy|).
    2. No regularisation and no feature dropped: pico-analyze passes ε = 1e-6 to a wrapper
       that keeps it for its retry noise only, so the CCA runs with ε = 0.
    3. ρ = |singular values| of M = Σ_xx^(−1/2)·Σ_xy·Σ_yy^(−1/2) (`pico_inverse_sqrt`), and U its
       left singular vectors (p × p).
    4. "Directions" D = Uᵀ·(Xᵀ − μ) + μ (p × n; μ the features' float32 means): Uᵀ applied to the
       centred activations *without* Σ_xx^(−1/2) and with the means added back — not the
       canonical variates of `pwcca`.
    5. P = the Q factor of the QR decomposition of Dᵀ (n × p), weights
       α_i ∝ Σ_j |⟨P_i, x_j⟩| over the *uncentred* features x_j of X, normalised to sum 1;
       PWCCA = Σ_i α_i·ρ_i.

    The weights are always X's (pico-analyze compares a component with the same component of
    the target, so p = q and the reference code's other branch — Y's coefficients with X's
    activations, `pwcca`'s docstring — is never taken; with p > q it fails on a boolean-index
    length mismatch). NaN where pico-analyze cannot give a reproducible number:
    p ≥ n (it asserts fewer features than samples), p > q, a side without variance, NaN/Inf
    entries, and a covariance whose inverse square root holds NaN (pico-analyze then retries
    on randomly perturbed activations). Computed with torch's LAPACK routines in one thread
    (numpy's are the same algorithms: pico-analyze's values are met to ≈ 1e-12)."""
    pair = _pair(x, y)
    if pair is None:
        return math.nan
    a32, b32 = pair[0].astype(np.float32).T, pair[1].astype(np.float32).T
    p, n = a32.shape
    q = b32.shape[0]
    if not (p < n and p <= q):
        return math.nan
    mu = a32.mean(axis=1, keepdims=True)
    a = torch.from_numpy(np.ascontiguousarray(a32, dtype=np.float64))
    with _one_thread():
        z = torch.cat([a, torch.from_numpy(np.ascontiguousarray(b32, dtype=np.float64))])
        z = z - z.mean(dim=1, keepdim=True)
        cov = (z @ z.T) / (n - 1)
        xmax, ymax = float(cov[:p, :p].abs().max()), float(cov[p:, p:].abs().max())
        if not (xmax > 0 and ymax > 0):
            return math.nan
        sxx, syy = cov[:p, :p] / xmax, cov[p:, p:] / ymax
        sxy = cov[:p, p:] / math.sqrt(xmax * ymax)
        m = pico_inverse_sqrt(sxx) @ sxy @ remembered(pico_inverse_sqrt, syy)  # target: once
        if not bool(torch.isfinite(m).all()):
            return math.nan
        u, rho, _ = torch.linalg.svd(m)
        centred = torch.from_numpy(np.ascontiguousarray(a32 - mu, dtype=np.float64))
        directions = u.T @ centred + torch.from_numpy(mu.astype(np.float64))
        basis, _ = torch.linalg.qr(directions.T)
        weights = (basis.T @ a.T).abs().sum(dim=1)
        total = float(weights.sum())
        if not total > 0:
            return math.nan
        return float((weights / total * rho.abs()).sum())
