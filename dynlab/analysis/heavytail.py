"""Heavy-tail exponent α of a matrix's empirical spectral density, fitted as WeightWatcher does.

The eigenvalues of W·Wᵀ are λ_i = σ_i². Their tail is fitted with a continuous power law
p(λ) ∝ λ^(−α) for λ ≥ λ_min (Clauset, Shalizi & Newman 2009, SIAM Review 51:661), as the
`powerlaw` package (Alstott et al. 2014) does for WeightWatcher (Martin & Mahoney 2021):

* for a candidate λ_min = x_min the maximum-likelihood exponent over the n_tail eigenvalues
  x_j ≥ x_min is α = 1 + n_tail / Σ_j ln(x_j / x_min)  (Clauset et al. eq. 3.1);
* its Kolmogorov–Smirnov distance is D = max_j |F(x_(j)) − C(x_(j))| over the sorted tail,
  with the fitted CDF F(x) = 1 − (x / x_min)^(1−α) and the empirical CDF taken, as `powerlaw`
  does, just below each point: C(x_(j)) = #{tail values < x_(j)} / n_tail (j / n_tail without
  ties);
* x_min is the candidate with the smallest D. Candidates are the distinct eigenvalues except
  the two largest (so a tail holds at least 3 eigenvalues), as in `powerlaw`.

The closed-form α is used for every candidate (as `powerlaw` 1.x, which WeightWatcher uses;
`powerlaw` 2.0 refits numerically and discards candidates whose α leaves (0, 3], an option
WeightWatcher does not use).

Eigenvalues at or below the square of the matrix's numerical-zero tolerance
(`dynlab.analysis.metrics.zero_tolerance`: its storage precision's rounding noise) are dropped
(`powerlaw` drops exact zeros; numerically zero ones would be fitted as data). A spectrum
with fewer than `MIN_EIGENVALUES` remaining eigenvalues gives NaN for every output.

The second part of the module holds the rest of WeightWatcher's heavy-tailed
self-regularisation family (weightwatcher 0.7.7's `analyze()` columns): the norms of the
eigenvalues, `alpha_weighted`, the Marchenko–Pastur bulk fit (`mp_fit`), the under-/over-trained
flags and the correlation traps of the element-wise randomised matrix (`randomised_esd`). The
third part holds WeightWatcher's other tail fits: x_min searched near the ESD's peak
(`fix_fingers='xmin_peak'`, `fit_power_law_peak`) and the truncated power law (`fit='TPL'`,
`fit_truncated_power_law`, as the `powerlaw` package's `Truncated_Power_Law`). Where
dynlab's α differs from WeightWatcher's (its small-N rule, its absolute 1e-5 eigenvalue floor)
is said in docs/concepts/heavy-tails.md.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

#: Fewest non-zero eigenvalues for which α is fitted (fewer: NaN). With 10 eigenvalues there
#: are 8 candidate tails of 3–10 points; Clauset et al. warn that tails of fewer than ~50
#: points give loose estimates, so small matrices (e.g. a 16-rank head circuit) are noisy.
MIN_EIGENVALUES = 10


@dataclass(frozen=True)
class PowerLawFit:
    """alpha: the exponent; xmin: the start of the tail (an eigenvalue); ks: the KS distance
    D of the fit; n_tail: how many eigenvalues are ≥ xmin."""

    alpha: float
    xmin: float
    ks: float
    n_tail: int


NAN_FIT = PowerLawFit(math.nan, math.nan, math.nan, 0)


def mle_alpha(tail: np.ndarray, xmin: float) -> float:
    """Continuous power-law MLE (Clauset et al. 2009, eq. 3.1): 1 + n / Σ ln(x_i / x_min)."""
    return float(1.0 + tail.size / np.sum(np.log(tail / xmin)))


def ks_distance(tail: np.ndarray, xmin: float, alpha: float) -> float:
    """max_j |F(x_(j)) − C(x_(j))| over the sorted tail, F(x) = 1 − (x/x_min)^(1−α) and
    C(x) = #{tail < x} / n (the empirical CDF just below x, `powerlaw`'s convention)."""
    x = np.sort(tail)
    below = np.searchsorted(x, x, side="left") / x.size
    fitted = 1.0 - (x / xmin) ** (1.0 - alpha)
    return float(np.max(np.abs(fitted - below)))


def eigenvalues(sigma: np.ndarray, max_dim: float | None = None, eps: float | None = None,
                c: float = 1.0) -> np.ndarray:
    """λ = σ² of the finite singular values, ascending, without the numerically zero ones
    (σ ≤ c·max_dim·eps·σ_1; max_dim defaults to the number of singular values, eps to
    float64's)."""
    s = np.asarray(sigma, dtype=np.float64)
    s = s[~np.isnan(s)]
    if s.size == 0 or not np.isfinite(s).all():
        return np.empty(0)
    s1 = float(np.max(s))
    e = np.finfo(np.float64).eps if eps is None or not np.isfinite(eps) else float(eps)
    tol = c * (max_dim if max_dim is not None else s.size) * e * s1
    lam = s[s > tol] ** 2
    return np.sort(lam)


def candidate_fits(lam: np.ndarray, candidates: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_min, α, D, n_tail) for every candidate x_min of positive eigenvalues `lam` (by
    default the distinct values except the two largest; else `candidates`, values of `lam`),
    vectorised: O(n²) memory and time."""
    x = np.sort(np.asarray(lam, dtype=np.float64))
    x = x[x > 0]
    n = x.size
    if candidates is None:
        candidates = np.unique(x)[:-2]
    start = np.searchsorted(x, candidates, side="left")  # first tail index per candidate
    n_tail = n - start
    logs = np.log(x)
    suffix = np.concatenate([np.cumsum(logs[::-1])[::-1], [0.0]])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        alphas = 1.0 + n_tail / (suffix[start] - n_tail * np.log(candidates))
        # rows = candidates, columns = data points
        in_tail = np.arange(n)[None, :] >= start[:, None]
        below = (np.searchsorted(x, x, side="left")[None, :] - start[:, None]) / n_tail[:, None]
        fitted = 1.0 - (x[None, :] / candidates[:, None]) ** (1.0 - alphas[:, None])
        dists = np.where(in_tail, np.abs(fitted - below), -np.inf).max(axis=1, initial=-np.inf)
    dists = np.where(np.isfinite(alphas) & np.isfinite(dists), dists, np.inf)
    return candidates, alphas, dists, n_tail


def fit_power_law(lam: np.ndarray) -> PowerLawFit:
    """The fit of positive eigenvalues `lam` (module docstring): the candidate with the
    smallest D. NaN fit below MIN_EIGENVALUES positive values or with fewer than two
    candidates."""
    lam = np.asarray(lam, dtype=np.float64)
    if int(np.sum(lam > 0)) < MIN_EIGENVALUES:
        return NAN_FIT
    candidates, alphas, dists, n_tail = candidate_fits(lam)
    if candidates.size < 2 or not np.isfinite(dists).any():
        return NAN_FIT
    best = int(np.argmin(dists))
    return PowerLawFit(float(alphas[best]), float(candidates[best]), float(dists[best]),
                       int(n_tail[best]))


def fit_spectrum(sigma: np.ndarray, max_dim: float | None = None, eps: float | None = None,
                 c: float = 1.0) -> PowerLawFit:
    """The power-law fit of a spectrum's eigenvalues σ² (numerical zeros dropped)."""
    return fit_power_law(eigenvalues(sigma, max_dim, eps, c))


# ----------------------------------------------------------------------------------------
# Batched, for the metric registry: spectra (..., K) NaN-padded, max_dim (...)

_CACHE: dict[bytes, np.ndarray] = {}


def _fits(sigma: torch.Tensor, tol: torch.Tensor | float) -> np.ndarray:
    """(..., 3): alpha, ks, n_tail of every spectrum of a batch, eigenvalues of singular
    values at or below each matrix's numerical-zero tolerance `tol` (...) dropped
    (`analysis.metrics.zero_tolerance`). The last batch is cached, so the three metrics of one
    batch cost one fit."""
    s = sigma.detach().cpu().to(torch.float64).numpy()
    tl = np.broadcast_to(np.asarray(torch.as_tensor(tol).cpu(), dtype=np.float64),
                         s.shape[:-1])
    key = hashlib.sha1(s.tobytes() + tl.tobytes() + str(s.shape).encode()).digest()
    if key in _CACHE:
        return _CACHE[key]
    flat, tols = s.reshape(-1, s.shape[-1]), tl.reshape(-1)
    out = np.full((flat.shape[0], 3), math.nan)
    for i, row in enumerate(flat):
        if np.isnan(row).all():
            continue
        row = row[~np.isnan(row)]
        lam = np.sort(row[row > tols[i]] ** 2) if np.isfinite(row).all() else np.empty(0)
        fit = fit_power_law(lam)
        out[i] = (fit.alpha, fit.ks, fit.n_tail if fit.n_tail else math.nan)
    result = out.reshape(*s.shape[:-1], 3)
    _CACHE.clear()
    _CACHE[key] = result
    return result


def alpha(sigma: torch.Tensor, tol: torch.Tensor | float) -> torch.Tensor:
    """Heavy-tail exponent α of each spectrum's eigenvalues σ² above the numerical-zero
    tolerance `tol` (NaN: too few eigenvalues)."""
    return torch.from_numpy(np.ascontiguousarray(_fits(sigma, tol)[..., 0]))


def alpha_ks(sigma: torch.Tensor, tol: torch.Tensor | float) -> torch.Tensor:
    """The KS distance D of each α fit."""
    return torch.from_numpy(np.ascontiguousarray(_fits(sigma, tol)[..., 1]))


def alpha_n_tail(sigma: torch.Tensor, tol: torch.Tensor | float) -> torch.Tensor:
    """The number of eigenvalues in each fitted tail (NaN where α is NaN)."""
    return torch.from_numpy(np.ascontiguousarray(_fits(sigma, tol)[..., 2]))


# ----------------------------------------------------------------------------------------
# WeightWatcher's heavy-tailed self-regularisation family (weightwatcher 0.7.7,
# `WeightWatcher.analyze`; Martin & Mahoney 2021, JMLR 22(165)). Eigenvalues λ_i = σ_i² of
# WᵀW for the N × M matrix W (N ≥ M) — WeightWatcher's `evals`, not divided by N — all
# min(m, n) of them (zeros included: they add nothing to the sums below).

#: α below which WeightWatcher flags a layer 'over-trained' (its OVER_TRAINED_THRESH).
OVER_TRAINED_ALPHA = 2.0
#: α above which WeightWatcher flags a layer 'under-trained' (its UNDER_TRAINED_THRESH).
UNDER_TRAINED_ALPHA = 6.0
#: The seed of the element-wise randomisation (`randomised_esd`), written to store attrs.
RAND_SEED = 0
#: Bandwidth of the linear-kernel density WeightWatcher fits the MP law to (`mp_fit`'s bw).
MP_BANDWIDTH = 0.1


def log_norm(lam: np.ndarray) -> float:
    """log₁₀ Σ_i λ_i = log₁₀ ‖W‖_F² (WeightWatcher's `log_norm`)."""
    return float(np.log10(np.sum(lam)))


def log_spectral_norm(lam: np.ndarray) -> float:
    """log₁₀ λ_max = log₁₀ ‖W‖_2² (WeightWatcher's `log_spectral_norm`)."""
    return float(np.log10(np.max(lam)))


def alpha_weighted(alpha: float, lam: np.ndarray) -> float:
    """α̂ = α · log₁₀ λ_max (WeightWatcher's `alpha_weighted`; Martin, Peng & Mahoney 2021,
    Nature Communications 12:4122, eq. 6)."""
    return float(alpha * np.log10(np.max(lam)))


def log_alpha_norm(alpha: float, lam: np.ndarray) -> float:
    """log₁₀ Σ_i λ_i^α, the Schatten α-norm to the power α (WeightWatcher's `log_alpha_norm`)."""
    return float(np.log10(np.sum(lam ** alpha)))


def trained_flags(alpha: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(over_trained, under_trained): 1.0 where α < 2, resp. α > 6, 0.0 elsewhere, NaN where α
    is NaN (WeightWatcher's `warning` column; it also flags a failed fit, α = −1, as
    over-trained — dynlab leaves that NaN)."""
    a = np.asarray(alpha, dtype=np.float64)
    over = np.where(np.isnan(a), np.nan, (a < OVER_TRAINED_ALPHA).astype(np.float64))
    under = np.where(np.isnan(a), np.nan, (a > UNDER_TRAINED_ALPHA).astype(np.float64))
    return over, under


def linear_kde(x: np.ndarray, data: np.ndarray, bw: float) -> np.ndarray:
    """Linear-kernel density of `data` at `x`: (1/(n·h)) Σ_j max(0, 1 − |x − x_j|/h), as
    scikit-learn's KernelDensity(kernel='linear', bandwidth=h), which WeightWatcher uses."""
    u = np.abs(x[:, None] - data[None, :]) / bw
    return np.maximum(0.0, 1.0 - u).sum(1) / (data.size * bw)


def mp_density(x: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """Marchenko–Pastur density of the eigenvalues of XᵀX/N, X N × M of entry variance σ²,
    Q = N/M: ρ(x) = √((λ₊ − x)(x − λ₋)) / (2π σ² x / Q), λ± = σ²(1 ± 1/√Q)², 0 outside
    (Marchenko & Pastur 1967; WeightWatcher's `marchenko_pastur_fun`). For Q = 1 its quarter
    circle of singular values, √(4 − x²) / (π σ²) (`quarter_circle_fun`)."""
    with np.errstate(invalid="ignore", divide="ignore"):  # (its order of operations)
        if q == 1:
            return np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - x ** 2))
        y = 1 / q
        b = np.power(sigma * (1 + np.sqrt(1 / q)), 2)
        a = np.power(sigma * (1 - np.sqrt(1 / q)), 2)
        prod = (b - x) * (x - a)
        val = (1 / (2 * np.pi * sigma * sigma * x * y)) * np.sqrt(prod)
        return np.where((x > 0) & (prod >= 0), val, 0.0)  # NaN elsewhere, which it sets to 0


def mp_residuals(sigmas: np.ndarray, xde: np.ndarray, yde: np.ndarray, q: float) -> np.ndarray:
    """For each σ of `sigmas`: Σ (ρ_MP(x) − ρ_KDE(x))² over the grid points where the density
    estimate exceeds 0.01; 1000² per point where the MP bulk [λ₋, λ₊] misses the density's
    peak or the grid (WeightWatcher's `resid_mp`, allresid=False)."""
    sg = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
    out = np.full(sg.shape[0], 1000.0 ** 2 * yde.size)
    good = np.ones(sg.shape[0], dtype=bool)
    if q != 1:
        b = np.power(sg[:, 0] * (1 + np.sqrt(1 / q)), 2)
        a = np.power(sg[:, 0] * (1 - np.sqrt(1 / q)), 2)
        peak = xde[np.argmax(yde)]
        good = ~((b < peak) | (b > xde.max()) | (a > peak))
    out[good] = np.sum((mp_density(xde[None, :], q, sg[good]) - yde[None, :]) ** 2, axis=1)
    return out


def mp_residual(sigma: np.ndarray | float, xde: np.ndarray, yde: np.ndarray, q: float) -> float:
    """`mp_residuals` of one σ (the objective Nelder–Mead polishes)."""
    sg = float(np.asarray(sigma).ravel()[0])
    if q != 1:
        b = np.power(sg * (1 + np.sqrt(1 / q)), 2)
        a = np.power(sg * (1 - np.sqrt(1 / q)), 2)
        peak = xde[np.argmax(yde)]
        if b < peak or b > xde.max() or a > peak:
            return float(1000.0 ** 2 * yde.size)
    return float(np.sum((mp_density(xde, q, sg) - yde) ** 2))


@dataclass(frozen=True)
class MPFit:
    """WeightWatcher's MP fit of one ESD. sigma: its `sigma_mp` (the ESD rescaled to mean 1);
    sigma2: σ²_MP, the entry variance of the N × M matrix the bulk stands for, on WᵀW/N's
    scale (`bulk_variance`: dynlab's, WeightWatcher has none); bulk_max: λ₊ on the
    eigenvalues' scale (its `bulk_max`); num_spikes: eigenvalues above λ₊ plus the Tracy–Widom
    margin; softrank: λ₊ / λ_max (its `mp_softrank`)."""

    sigma: float
    sigma2: float
    bulk_max: float
    num_spikes: float
    softrank: float


NAN_MP = MPFit(math.nan, math.nan, math.nan, math.nan, math.nan)


def mp_fit(lam: np.ndarray, n: int, m: int) -> MPFit:
    """The Marchenko–Pastur bulk fit of eigenvalues `lam` of an n × m matrix (n ≥ m), as
    WeightWatcher's `mp_fit` (rescale=True): the eigenvalues are scaled by
    s² = len(λ)/Σλ to mean 1; σ is the minimiser of `mp_residual` against their linear-kernel
    density (`linear_kde`, h = 0.1, on 1000 points of [0, max + 0.5]; for Q = n/m = 1 of the
    singular values √λ) as scipy.optimize.brute over [0.05·σ₀, 2·σ₀) in steps of 0.01·σ₀,
    σ₀ = √(λ_max/(1 + 1/√Q)²), polished by Nelder–Mead (brute's default finish);
    λ₊ = (σ(1 + 1/√Q))²; spikes: scaled eigenvalues above λ₊ + √TW, TW = λ₊^(2/3)/(√Q·m^(2/3));
    softrank = λ₊ / max scaled λ. NaN for fewer than 2 eigenvalues or a zero spectrum."""
    from scipy import optimize

    lam = np.sort(np.asarray(lam, dtype=np.float64))
    total = float(np.sum(lam))
    if lam.size < 2 or not np.isfinite(total) or total <= 0 or m < 1:
        return NAN_MP
    q = n / m
    w_scale = np.sqrt(lam.size) / np.sqrt(total)
    scale2 = w_scale * w_scale
    x = scale2 * lam
    s0 = float(np.sqrt(np.max(x) / np.square(1 + 1.0 / np.sqrt(q))))
    to_fit = np.sqrt(x) if q == 1 else x
    xde = np.linspace(0, to_fit.max() + 0.5, 1000)
    yde = linear_kde(xde, to_fit, MP_BANDWIDTH)
    keep = yde > 0.01
    args = (xde[keep], yde[keep], q)
    # scipy.optimize.brute's grid, argmin and fmin finish, the grid evaluated at once
    grid = np.mgrid[slice(0.05 * s0, 2.0 * s0, 0.01 * s0)]
    with np.errstate(all="ignore"):
        start = grid[int(np.argmin(mp_residuals(grid, *args)))]
        best = optimize.fmin(mp_residual, np.array([start]), args=args, full_output=1,
                             disp=False)
    sigma = float(np.asarray(best[0]).ravel()[0])
    bulk_max = (sigma * (1 + 1 / math.sqrt(q))) ** 2
    tw = bulk_max ** (2 / 3) / (math.sqrt(q) * m ** (2 / 3))
    bulk = x <= bulk_max + math.sqrt(tw)
    spikes = float(np.sum(~bulk))
    return MPFit(sigma, bulk_variance(lam[bulk], n), bulk_max / scale2, spikes,
                 bulk_max / x.max())


def bulk_variance(bulk: np.ndarray, n: int) -> float:
    """σ²_MP = mean(λ_bulk) / N: the MP law's first moment is σ² (E[λ] of XᵀX/N for entries
    of variance σ², Marchenko & Pastur 1967), so the mean of the bulk eigenvalues (spikes
    removed) over N estimates the bulk's entry variance without the bias of a density fit."""
    return float(np.mean(bulk) / n) if bulk.size else math.nan


def shuffled_eigenvalues(w: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """σ² of W with its entries permuted at random (rng's `shuffle` of the row-major entries),
    ascending: the ESD of a matrix with W's entry distribution and no correlations
    (WeightWatcher's `random_eigenvalues`, one replica)."""
    flat = np.array(w, dtype=np.float64).ravel()
    rng.shuffle(flat)
    import scipy.linalg

    return np.sort(scipy.linalg.svd(flat.reshape(w.shape), compute_uv=False) ** 2)


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """√((KL(p‖m) + KL(q‖m))/2), m = (p + q)/2, natural log, p and q normalised to sum 1
    (scipy.stats.entropy): WeightWatcher's `jensen_shannon_distance`, which it applies to the
    two sorted eigenvalue vectors themselves (not to histograms)."""
    from scipy import stats

    mid = (p + q) / 2
    return float(np.sqrt((stats.entropy(p, mid) + stats.entropy(q, mid)) / 2))


@dataclass(frozen=True)
class RandomisedESD:
    """Correlation traps (WeightWatcher's `randomize=True`): rand_distance: Jensen–Shannon
    distance between W's eigenvalues and one randomised replica's; max_rand_eval: the largest
    eigenvalue over the replicas; num_rand_spikes: spikes of the replicas' MP fit (its
    `rand_num_spikes`, alias `num_traps`)."""

    rand_distance: float
    max_rand_eval: float
    num_rand_spikes: float


NAN_RAND = RandomisedESD(math.nan, math.nan, math.nan)


def randomised_esd(w: np.ndarray, seed: int = RAND_SEED) -> RandomisedESD:
    """The correlation-trap metrics of matrix `w` (as stored, rows × columns), as
    WeightWatcher's `apply_random_esd` + `apply_mp_fit(random=True)` compute them with numpy's
    global generator seeded by `seed`: with RandomState(seed), 5 shuffled replicas (1 when
    min(m, n) ≥ 100) give max_rand_eval and the MP fit of their pooled eigenvalues (n, m of
    W), then one more replica is compared with W's own eigenvalues by
    `jensen_shannon_distance`. NaN for a matrix holding NaN/Inf or all zeros."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.size == 0 or not np.isfinite(w).all() or not np.any(w):
        return NAN_RAND
    import scipy.linalg

    n, m = max(w.shape), min(w.shape)
    rng = np.random.RandomState(seed)
    replicas = np.concatenate([shuffled_eigenvalues(w, rng) for _ in range(5 if m < 100 else 1)])
    one = shuffled_eigenvalues(w, rng)
    lam = np.sort(scipy.linalg.svd(w, compute_uv=False) ** 2)
    return RandomisedESD(jensen_shannon_distance(lam, one), float(replicas.max()),
                         mp_fit(np.sort(replicas), n, m).num_spikes)


# Batched, for the metric registry.

def _spectrum_rows(sigma: torch.Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
    s = sigma.detach().cpu().to(torch.float64).numpy()
    return s.reshape(-1, s.shape[-1]), s.shape[:-1]


def _eigen(row: np.ndarray) -> np.ndarray | None:
    """λ = σ² of a NaN-padded spectrum row, all of them (zeros kept); None for an invalid row."""
    row = row[~np.isnan(row)]
    if row.size == 0 or not np.isfinite(row).all() or not np.any(row > 0):
        return None
    return np.sort(row ** 2)


def ww_norms(sigma: torch.Tensor, tol: torch.Tensor | float) -> np.ndarray:
    """(..., 4): log_norm, log_spectral_norm, alpha_weighted, log_alpha_norm of every spectrum
    (α: `alpha`'s fit with the tolerance `tol`); NaN for zero or invalid spectra."""
    flat, shape = _spectrum_rows(sigma)
    alphas = _fits(sigma, tol)[..., 0].reshape(-1)
    out = np.full((flat.shape[0], 4), math.nan)
    for i, row in enumerate(flat):
        lam = _eigen(row)
        if lam is None:
            continue
        a = alphas[i]
        out[i] = (log_norm(lam), log_spectral_norm(lam), alpha_weighted(a, lam),
                  log_alpha_norm(a, lam) if np.isfinite(a) else math.nan)
    return out.reshape(*shape, 4)


_MP_CACHE: dict[bytes, np.ndarray] = {}


def mp_fits(sigma: torch.Tensor, max_dim: torch.Tensor | float) -> np.ndarray:
    """(..., 5): sigma_mp, σ²_MP, λ₊, num_spikes, mp_softrank of every spectrum (`mp_fit`,
    N = max_dim, M = the spectrum's length k: min(m, n), or a product's inner dimension). The
    last batch is cached, so the five metrics of one batch cost one fit."""
    flat, shape = _spectrum_rows(sigma)
    dims = np.broadcast_to(np.asarray(torch.as_tensor(max_dim).cpu(), dtype=np.float64),
                           shape).reshape(-1)
    key = hashlib.sha1(flat.tobytes() + dims.tobytes() + str(flat.shape).encode()).digest()
    if key in _MP_CACHE:
        return _MP_CACHE[key].reshape(*shape, 5)
    out = np.full((flat.shape[0], 5), math.nan)
    for i, row in enumerate(flat):
        lam = _eigen(row)
        if lam is None:
            continue
        fit = mp_fit(lam, int(max(dims[i], lam.size)), lam.size)
        out[i] = (fit.sigma, fit.sigma2, fit.bulk_max, fit.num_spikes, fit.softrank)
    _MP_CACHE.clear()
    _MP_CACHE[key] = out
    return out.reshape(*shape, 5)


_RAND_CACHE: dict[bytes, np.ndarray] = {}


def randomised_batch(x: torch.Tensor, seed: int = RAND_SEED) -> np.ndarray:
    """(..., 3): rand_distance, max_rand_eval, num_rand_spikes of every matrix (..., m, n)
    (`randomised_esd` with `seed`); cached for the last batch."""
    w = x.detach().cpu().to(torch.float64).numpy()
    key = hashlib.sha1(w.tobytes() + str(w.shape).encode() + str(seed).encode()).digest()
    if key in _RAND_CACHE:
        return _RAND_CACHE[key]
    flat = w.reshape(-1, *w.shape[-2:])
    out = np.array([tuple(vars(randomised_esd(mat, seed)).values()) for mat in flat],
                   dtype=np.float64).reshape(*w.shape[:-2], 3)
    _RAND_CACHE.clear()
    _RAND_CACHE[key] = out
    return out


# ----------------------------------------------------------------------------------------
# WeightWatcher's `fix_fingers='xmin_peak'`: x_min searched near the peak of the ESD
# (weightwatcher 0.7.7 `WeightWatcher.fit_powerlaw`, through the `powerlaw` package's
# `Fit(data, xmin=(low, high))`).

#: Number of bins of the histogram of log₁₀ λ whose fullest bin is the ESD's peak.
PEAK_BINS = 100


def esd_peak(lam: np.ndarray) -> float:
    """The peak of the ESD as WeightWatcher's xmin_peak finds it: 10 to the left edge of the
    fullest of `PEAK_BINS` equal bins of log₁₀ λ (numpy.histogram; the first on a tie)."""
    counts, edges = np.histogram(np.log10(lam), bins=PEAK_BINS)
    return float(10 ** edges[int(np.argmax(counts))])


def peak_xmin_range(peak: float) -> tuple[float, float]:
    """WeightWatcher's x_min search range for xmin_peak, (log₁₀(0.95·peak), 1.5·peak): its
    lower end is a logarithm although the upper one and the eigenvalues are not (transcribed
    as written: it only loosens the lower bound, since log₁₀ y < y for every y > 0)."""
    return float(np.log10(0.95 * peak)), 1.5 * peak


@dataclass(frozen=True)
class PeakFit:
    """The power-law fit with x_min searched near the ESD's peak. fit: as `fit_power_law`'s;
    peak: the ESD's peak (`esd_peak`); reason: why the fit is NaN ('' when it is not)."""

    fit: PowerLawFit
    peak: float
    reason: str


def fit_power_law_peak(lam: np.ndarray) -> PeakFit:
    """The continuous power-law fit of positive eigenvalues `lam` with x_min the KS-minimal
    candidate among the distinct eigenvalues inside `peak_xmin_range(esd_peak(lam))` (both
    ends included), the largest of those excluded — `powerlaw` 1.x's `Fit(data,
    xmin=(low, high)).find_xmin`, which WeightWatcher's `fix_fingers='xmin_peak'` calls — with
    the same closed-form α and KS distance as `fit_power_law`. NaN below MIN_EIGENVALUES
    positive values or with no candidate in the range."""
    x = np.sort(np.asarray(lam, dtype=np.float64))
    x = x[np.isfinite(x) & (x > 0)]
    if x.size < MIN_EIGENVALUES:
        return PeakFit(NAN_FIT, math.nan, f"fewer than {MIN_EIGENVALUES} positive eigenvalues")
    peak = esd_peak(x)
    low, high = peak_xmin_range(peak)
    distinct = np.unique(x)
    inside = distinct[(distinct >= low) & (distinct <= high)][:-1]
    if inside.size == 0:
        return PeakFit(NAN_FIT, peak, "no candidate x_min near the ESD's peak")
    candidates, alphas, dists, n_tail = candidate_fits(x, inside)
    if not np.isfinite(dists).any():
        return PeakFit(NAN_FIT, peak, "no finite fit near the ESD's peak")
    best = int(np.argmin(dists))
    return PeakFit(PowerLawFit(float(alphas[best]), float(candidates[best]), float(dists[best]),
                               int(n_tail[best])), peak, "")


# ----------------------------------------------------------------------------------------
# The truncated power law p(λ) ∝ λ^(−α) e^(−Λλ), λ ≥ x_min (Clauset, Shalizi & Newman 2009,
# table 1; WeightWatcher's `fit='TPL'`), fitted as the `powerlaw` package's
# `Fit(λ, xmin=x_min).truncated_power_law` (2.0.0) at the x_min of the plain power-law fit.

#: Parameter ranges of the TPL fit: `powerlaw` 1.x's (α > 1, Λ > 0: its
#: `_in_standard_parameter_range`, the one weightwatcher's fit='TPL' ran with) instead of
#: 2.0.0's default α ∈ (0, 3) (weight matrices reach α of 2–6).
TPL_RANGES = {"alpha": (1.0, None), "Lambda": (0.0, None)}
#: powerlaw's floor for a zero likelihood (and the likelihood of out-of-range parameters).
TINY_LIKELIHOOD = 10.0 ** sys.float_info.min_10_exp


def upper_gamma(s: float, x: float) -> float:
    """Γ(s, x) = ∫_x^∞ t^(s−1) e^(−t) dt for real s and x > 0 (DLMF 8.2.2). For s > 0
    scipy's regularised Q(s, x)·Γ(s); for s ≤ 0 at least 1e-3 from an integer and x ≤ 2 the
    recurrence Γ(s, x) = (Γ(s + 1, x) − x^s e^(−x)) / s (DLMF 8.8.2) down from
    s + ⌈−s⌉ ∈ (0, 1) (within 1e-12 relative of mpmath there); elsewhere, where the recurrence
    cancels, mpmath.gammainc, which powerlaw calls (~100× slower)."""
    from scipy import special

    if not (math.isfinite(s) and math.isfinite(x)) or x <= 0:
        return math.nan
    if s > 0:
        return float(special.gammaincc(s, x) * special.gamma(s))
    if abs(s - round(s)) < 1e-3 or x > 2:
        from mpmath import gammainc

        return float(gammainc(s, x))
    k = math.ceil(-s)
    top = s + k
    g = float(special.gammaincc(top, x) * special.gamma(top))
    for j in range(k - 1, -1, -1):
        a = s + j
        g = (g - math.exp(a * math.log(x) - x)) / a
    return g


def tpl_normaliser(alpha: float, lam_: float, xmin: float) -> float:
    """C = Λ^(1−α) / Γ(1−α, Λ·x_min), the normalisation of λ^(−α) e^(−Λλ) on [x_min, ∞)
    (`upper_gamma`; powerlaw's `Truncated_Power_Law._pdf_continuous_normalizer`)."""
    return lam_ ** (1 - alpha) / upper_gamma(1 - alpha, lam_ * xmin)


def tpl_in_range(alpha: float, lam_: float) -> bool:
    """Whether (α, Λ) lies strictly inside `TPL_RANGES` (powerlaw's `in_range`)."""
    ok = True
    for value, (lo, hi) in ((alpha, TPL_RANGES["alpha"]), (lam_, TPL_RANGES["Lambda"])):
        ok = ok and (lo is None or value > lo) and (hi is None or value < hi)
    return bool(ok)


def tpl_loglikelihoods(tail: np.ndarray, xmin: float, alpha: float, lam_: float) -> np.ndarray:
    """ln p(x) = ln(C · x^(−α) e^(−Λx)) of each tail value (C: `tpl_normaliser`); as powerlaw,
    a zero likelihood, and every likelihood at parameters outside `TPL_RANGES`, is
    `TINY_LIKELIHOOD`."""
    if not tpl_in_range(alpha, lam_):
        return np.log(np.full(tail.size, TINY_LIKELIHOOD))
    with np.errstate(all="ignore"):
        like = tail ** (-alpha) * np.exp(-lam_ * tail) * tpl_normaliser(alpha, lam_, xmin)
    like[like == 0] = TINY_LIKELIHOOD
    return np.log(like.astype(np.float64))


def pl_loglikelihoods(tail: np.ndarray, xmin: float, alpha: float) -> np.ndarray:
    """ln p(x) = ln((α − 1) x_min^(α−1) x^(−α)) of each tail value: the continuous power law
    on [x_min, ∞) (Clauset et al. 2009 eq. 2.2; powerlaw's `Power_Law`), zero likelihoods
    floored at `TINY_LIKELIHOOD`."""
    with np.errstate(all="ignore"):
        like = tail ** (-alpha) * ((alpha - 1) * xmin ** (alpha - 1))
    like[like == 0] = TINY_LIKELIHOOD
    return np.log(like)


def nested_loglikelihood_ratio(ll1: np.ndarray, ll2: np.ndarray) -> tuple[float, float]:
    """(R, p) of two nested fits: R = Σ (ln p₁ − ln p₂), p = 1 − χ²₁(|2R|) (Wilks' theorem;
    Clauset et al. 2009 §5.1 and appendix C; powerlaw's `loglikelihood_ratio(nested=True)`),
    −∞ log-likelihoods replaced by ln `TINY_LIKELIHOOD` first."""
    from scipy import special

    floor = math.log(TINY_LIKELIHOOD)
    a, b = np.where(ll1 == -np.inf, floor, ll1), np.where(ll2 == -np.inf, floor, ll2)
    r = float(np.sum(a - b))
    return r, float(1 - special.chdtr(1, abs(2 * r)))  # scipy.stats.chi2(1).cdf


@dataclass(frozen=True)
class TPLFit:
    """The truncated power-law fit of one tail. alpha, Lambda: its exponent and exponential
    cut-off rate (powerlaw's and WeightWatcher's `Lambda`); llr: R = ℓ_PL − ℓ_TPL, the
    log-likelihood ratio of the plain power law (closed-form α) to the TPL on the same tail
    (negative: the TPL fits better); p: its significance; reason: why the fit is NaN."""

    alpha: float
    Lambda: float
    llr: float
    p: float
    reason: str = ""


def nan_tpl(reason: str) -> TPLFit:
    return TPLFit(math.nan, math.nan, math.nan, math.nan, reason)


def fit_truncated_power_law(lam: np.ndarray, xmin: float) -> TPLFit:
    """The TPL maximum-likelihood fit of the positive eigenvalues `lam` ≥ x_min, as powerlaw
    2.0.0's `Distribution.fit`: starting from α₀ = 1 + n/Σ ln(x/x_min) (Clauset et al. eq. 3.1)
    and Λ₀ = 1/mean(x), scipy.optimize.minimize(−Σ ln p, method='Nelder-Mead', bounds=
    `TPL_RANGES`, tol=1e-4) — so α and Λ are resolved to about 1e-4 absolute, the tolerance
    powerlaw uses — then `nested_loglikelihood_ratio` of the plain power law with α₀ (the
    fit's own α) to it. NaN (with a reason) for a NaN x_min, a tail of fewer than 2 values,
    a tail all at x_min, or a non-finite optimum."""
    from scipy import optimize

    if not np.isfinite(xmin):
        return nan_tpl("no power-law fit (alpha is NaN)")
    x = np.sort(np.asarray(lam, dtype=np.float64))
    tail = x[np.isfinite(x) & (x >= xmin)]
    if tail.size < 2:
        return nan_tpl("fewer than 2 eigenvalues in the tail")
    with np.errstate(divide="ignore"):
        a0 = 1 + tail.size / np.sum(np.log(tail / xmin))
    l0 = 1 / np.mean(tail)
    if not (np.isfinite(a0) and np.isfinite(l0)):
        return nan_tpl("every tail eigenvalue equals x_min (no exponent)")

    def cost(params: np.ndarray) -> float:
        return -np.sum(tpl_loglikelihoods(tail, xmin, params[0], params[1]))

    with np.errstate(all="ignore"):
        res = optimize.minimize(cost, x0=[a0, l0], bounds=list(TPL_RANGES.values()),
                                method="Nelder-Mead", tol=1e-4)
    a, lam_ = (float(v) for v in res.x)
    if not (np.isfinite(a) and np.isfinite(lam_) and np.isfinite(res.fun)):
        return nan_tpl("the TPL likelihood has no finite optimum")
    r, p = nested_loglikelihood_ratio(pl_loglikelihoods(tail, xmin, a0),
                                      tpl_loglikelihoods(tail, xmin, a, lam_))
    return TPLFit(a, lam_, r, p)


# Batched, for the metric registry.

def _rows_with_tolerance(sigma: torch.Tensor, tol: torch.Tensor | float
                         ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], bytes]:
    s = sigma.detach().cpu().to(torch.float64).numpy()
    tl = np.broadcast_to(np.asarray(torch.as_tensor(tol).cpu(), dtype=np.float64),
                         s.shape[:-1])
    key = hashlib.sha1(s.tobytes() + tl.tobytes() + str(s.shape).encode()).digest()
    return s.reshape(-1, s.shape[-1]), tl.reshape(-1), s.shape[:-1], key


def _fitted_eigenvalues(row: np.ndarray, tol: float) -> np.ndarray:
    """The eigenvalues `alpha`'s fit uses: σ² of the finite σ above `tol`, ascending; empty for
    a row holding an infinite value."""
    row = row[~np.isnan(row)]
    return np.sort(row[row > tol] ** 2) if np.isfinite(row).all() else np.empty(0)


_PEAK_CACHE: dict[bytes, np.ndarray] = {}


def peak_fits(sigma: torch.Tensor, tol: torch.Tensor | float) -> np.ndarray:
    """(..., 3): α, KS distance and n_tail of `fit_power_law_peak` for every spectrum of a
    batch (eigenvalues as `alpha`'s); cached for the last batch."""
    flat, tols, shape, key = _rows_with_tolerance(sigma, tol)
    if key not in _PEAK_CACHE:
        out = np.full((flat.shape[0], 3), math.nan)
        for i, row in enumerate(flat):
            fit = fit_power_law_peak(_fitted_eigenvalues(row, tols[i])).fit
            out[i] = (fit.alpha, fit.ks, fit.n_tail if fit.n_tail else math.nan)
        _PEAK_CACHE.clear()
        _PEAK_CACHE[key] = out
    return _PEAK_CACHE[key].reshape(*shape, 3)


_TPL_CACHE: dict[bytes, np.ndarray] = {}


def tpl_fits(sigma: torch.Tensor, tol: torch.Tensor | float) -> np.ndarray:
    """(..., 4): α, Λ, R, p of `fit_truncated_power_law` at the x_min of `alpha`'s fit for
    every spectrum of a batch; cached for the last batch."""
    flat, tols, shape, key = _rows_with_tolerance(sigma, tol)
    if key not in _TPL_CACHE:
        out = np.full((flat.shape[0], 4), math.nan)
        for i, row in enumerate(flat):
            lam = _fitted_eigenvalues(row, tols[i])
            fit = fit_power_law(lam)
            if np.isfinite(fit.alpha):
                t = fit_truncated_power_law(lam, fit.xmin)
                out[i] = (t.alpha, t.Lambda, t.llr, t.p)
        _TPL_CACHE.clear()
        _TPL_CACHE[key] = out
    return _TPL_CACHE[key].reshape(*shape, 4)
