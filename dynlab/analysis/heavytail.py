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
"""

from __future__ import annotations

import hashlib
import math
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


def candidate_fits(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_min, α, D, n_tail) for every candidate x_min of positive eigenvalues `lam` (the
    distinct values except the two largest), vectorised: O(n²) memory and time."""
    x = np.sort(np.asarray(lam, dtype=np.float64))
    x = x[x > 0]
    n = x.size
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
