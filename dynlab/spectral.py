"""Singular values of batches of matrices, and the metrics computed from them.

Two routes give the singular values of an m×n matrix X (k = min(m, n)):

* Gram:  σ_i = sqrt(λ_i(X·Xᵀ)) with X oriented so that X·Xᵀ is k×k. Fast (a k×k symmetric
  eigenproblem), but it squares the condition number: the absolute error of λ is about
  eps·σ_1², so σ_k is only accurate while κ = σ_1/σ_k stays moderate.
* SVD:   `torch.linalg.svdvals`, accurate to about eps·σ_1 in absolute terms.

`svdvals` computes every matrix in float64 through the Gram route, checks each result's
own condition estimate, and recomputes with the SVD the matrices whose κ estimate exceeds
`GRAM_MAX_COND` (and every matrix whose Gram result is not trustworthy). Tests prove the
answers equal scipy's float64 SVD to 1e-6 relative for κ up to 1e8, rank-deficient and zero
matrices.

Metric functions take spectra `sigma` of shape (..., K), descending and NaN-padded past the
matrix's rank bound k (k = the number of non-NaN entries). A row that is entirely NaN stands
for a matrix that held NaN/Inf: every metric of it is NaN. The rank-sensitive metrics
(`numerical_rank`, `condition_number`, `nonzero_condition_number`, `rank_deficit`) also take
max(m, n) and the eps of the precision the matrix was stored in, and count σ_i as zero at or
below `zero_tolerance` = c·max(m, n)·eps·σ_1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

#: Largest κ estimate for which the Gram route's answer is kept. The Gram route's relative
#: error on σ_k grows like c·eps·κ² with c ≈ 3 measured on 128–1536-sized float64 matrices
#: (6.6e-8 at κ = 1e4, 5e-6 at κ = 1e5; tests/test_spectral.py keeps it below 1e-6 at the
#: threshold). Matrices whose estimate is above it go through the SVD.
GRAM_MAX_COND = 1e4

#: The same threshold per computation dtype. In float32 the Gram route's error is already
#: 1.2e-5 at κ = 10 and 5e-4 at κ = 100 (float32 SVD: ≈ 3e-8·κ), so float32 keeps it only
#: for κ ≤ 10.
GRAM_MAX_COND_BY_DTYPE = {torch.float64: GRAM_MAX_COND, torch.float32: 10.0}


def svdvals(
    x: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    method: str = "auto",
    gram_max_cond: float | None = None,
) -> torch.Tensor:
    """Singular values σ_1 ≥ … ≥ σ_k of each matrix in a batch, k = min(m, n).

    x: (..., m, n) of any float dtype (bf16 included) on any device. Computed in `dtype`
    (float64 by default). method: "auto" (Gram where well conditioned, else SVD), "gram"
    or "svd". Matrices holding NaN/Inf give a row of NaN. Returns (..., k) in `dtype`.
    """
    if method not in ("auto", "gram", "svd"):
        raise ValueError(f"method must be 'auto', 'gram' or 'svd', not {method!r}")
    if gram_max_cond is None:
        gram_max_cond = GRAM_MAX_COND_BY_DTYPE.get(dtype, 1.0)
    m, n = x.shape[-2], x.shape[-1]
    batch_shape = x.shape[:-2]
    x = x.to(dtype)
    if m > n:
        x = x.mT
    k, wide = min(m, n), max(m, n)
    x = x.reshape(-1, k, wide)
    if k == 0 or x.shape[0] == 0:
        return torch.full((x.shape[0], k), math.nan, dtype=dtype).reshape(*batch_shape, k)
    if method == "svd":
        finite = torch.isfinite(x).all(dim=(-2, -1))
        s = torch.full((x.shape[0], k), math.nan, dtype=dtype, device=x.device)
        if bool(finite.any()):
            s[finite] = _batched(torch.linalg.svdvals, x[finite])
        return s.reshape(*batch_shape, k)
    gram = _gram(x)
    # A NaN/Inf entry in row i makes G_ii non-finite, so the Gram diagonal tells which
    # matrices to check (no extra pass over the entries).
    suspect = ~torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all(-1)
    lam = _batched(torch.linalg.eigvalsh, torch.where(suspect[:, None, None], 0.0, gram))
    s = lam.clamp_min(0).sqrt().flip(-1)  # eigvalsh is ascending
    if method == "auto":
        # κ estimate from the Gram route itself; a zero matrix (all σ = 0) is exact as it is
        redo = ~(s[:, -1] * gram_max_cond >= s[:, 0])
        if bool(suspect.any()):  # overflowed Gram of finite entries: SVD; else NaN below
            redo |= suspect & torch.isfinite(x).all(dim=(-2, -1))
        if bool(redo.any()):
            s[redo] = _batched(torch.linalg.svdvals, x[redo])
    if bool(suspect.any()):
        bad = suspect & ~torch.isfinite(x).all(dim=(-2, -1))
        s[bad] = math.nan
    return s.reshape(*batch_shape, k)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """X·Xᵀ of each matrix of a (B, k, n) batch (x may be a transposed view of tall
    matrices: no copy is made). On the CPU through numpy, whose `a @ a.T` calls BLAS syrk
    (half the flops of a general product, 1.4–1.8× faster here)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float64, torch.float32):
        return x @ x.mT
    a = x.detach().numpy()  # a strided view, transposed or not
    out = np.empty((a.shape[0], a.shape[1], a.shape[1]), dtype=a.dtype)
    for i in range(a.shape[0]):
        np.matmul(a[i], a[i].T, out=out[i])
    return torch.from_numpy(out)


def _qr_r(x: torch.Tensor) -> torch.Tensor:
    """R of the thin QR of each matrix."""
    return torch.linalg.qr(x, mode="r").R


_POOL: ThreadPoolExecutor | None = None


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn over a batch. On the CPU every call is single-threaded and the batch is split
    across torch's threads: LAPACK parallelises poorly on one small matrix (this is 1.8×
    faster for 384×384 eigvalsh on 2 cores), and a single-threaded LAPACK call gives the same
    bits whatever the thread count, so serial and Dask runs write identical stores."""
    global _POOL
    if x.device.type != "cpu":
        return fn(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if x.shape[0] < 2 or threads < 2:
            return fn(x)
        if _POOL is None or _POOL._max_workers != threads:
            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="dynlab-lapack")
        return torch.cat(list(_POOL.map(fn, x.tensor_split(min(threads, x.shape[0])))))
    finally:
        torch.set_num_threads(threads)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; on the CPU through numpy's BLAS, whose results do not depend on the number of
    threads (checked for this build), so stores are reproducible across thread counts."""
    if a.device.type != "cpu" or a.dtype not in (torch.float64, torch.float32):
        return a @ b
    return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))


def lowrank_svdvals(
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    gram_max_cond: float | None = None,
) -> torch.Tensor:
    """Singular values of the products left·right without forming them.

    left: (..., m, r), right: (..., r, n) with r < min(m, n). With left = Q_L·R_L and
    rightᵀ = Q_R·R_R (thin QR), left·right = Q_L·(R_L·R_Rᵀ)·Q_Rᵀ, so the r singular values
    of the product are those of the r×r core R_L·R_Rᵀ. Returns (..., r).
    """
    batch_shape = left.shape[:-2]
    left = left.to(dtype).reshape(-1, *left.shape[-2:])  # a batch (of one for a 2-D input)
    right = right.to(dtype).reshape(-1, *right.shape[-2:])
    finite = torch.isfinite(left).flatten(-2).all(-1) & torch.isfinite(right).flatten(-2).all(-1)
    safe_l = torch.where(finite[..., None, None], left, torch.zeros((), dtype=dtype))
    safe_r = torch.where(finite[..., None, None], right, torch.zeros((), dtype=dtype))
    r_left = _batched(_qr_r, safe_l)
    r_right = _batched(_qr_r, safe_r.mT)
    core = matmul(r_left, r_right.mT)
    s = svdvals(core, dtype=dtype, gram_max_cond=gram_max_cond)
    s = torch.where(finite[..., None], s, torch.full((), math.nan, dtype=dtype))
    return s.reshape(*batch_shape, s.shape[-1])


# ----------------------------------------------------------------------------------------
# Metrics from spectra. sigma: (..., K) descending, NaN past the rank bound k.


def rank_bound(sigma: torch.Tensor) -> torch.Tensor:
    """k: the number of non-NaN singular values of each spectrum (0 for an all-NaN row)."""
    return (~torch.isnan(sigma)).sum(-1)


def _nan_where_invalid(value: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """NaN for all-NaN spectra (matrices that held NaN/Inf)."""
    return torch.where(rank_bound(sigma) > 0, value, torch.full((), math.nan, dtype=value.dtype))


def nuclear_norm(sigma: torch.Tensor) -> torch.Tensor:
    """‖W‖_* = Σ_i σ_i."""
    return _nan_where_invalid(torch.nansum(sigma, -1), sigma)


def frobenius_norm(sigma: torch.Tensor) -> torch.Tensor:
    """‖W‖_F = sqrt(Σ_i σ_i²)."""
    return _nan_where_invalid(torch.nansum(sigma * sigma, -1).sqrt(), sigma)


def spectral_norm(sigma: torch.Tensor) -> torch.Tensor:
    """‖W‖_2 = σ_1."""
    return sigma[..., 0]


def effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli 2007): p_i = σ_i / Σ_j σ_j, ER = exp(−Σ_i p_i ln p_i).

    0·ln 0 = 0. NaN for an all-zero matrix (Σσ = 0).
    """
    total = torch.nansum(sigma, -1, keepdim=True)
    p = sigma / total
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    entropy = -torch.nansum(plogp, -1)
    er = torch.exp(entropy)
    return torch.where(total[..., 0] > 0, er, torch.full((), math.nan, dtype=er.dtype))


def proportional_effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """PER = ER / k, k = min(m, n) (the rank bound: inner dimension for a low-rank product)."""
    return effective_rank(sigma) / rank_bound(sigma)


#: c in the zero tolerance c · max(m, n) · eps · σ_1 (see `zero_tolerance`).
TOL_FACTOR = 0.25


def storage_eps(*dtypes: torch.dtype) -> float:
    """eps of the coarsest of `dtypes`: the machine epsilon of the precision a matrix was
    stored in, or, for a matrix formed from stored tensors (a difference W_t − W_{t−1}, a
    product O·V), of the coarsest precision among its inputs. float64 2.2e-16, float32
    1.19e-7, float16 9.8e-4, bfloat16 7.8e-3."""
    if not dtypes:
        raise ValueError("storage_eps needs at least one dtype")
    return max(torch.finfo(d).eps for d in dtypes)


def zero_tolerance(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None,
    c: float = TOL_FACTOR,
) -> torch.Tensor:
    """The numerical-zero tolerance of each spectrum: tol = c · max(m, n) · eps · σ_1.

    A singular value at or below tol is indistinguishable from 0 for a matrix whose entries
    carry relative errors of eps: it counts as zero in `numerical_rank`, `condition_number`,
    `nonzero_condition_number` and `rank_deficit`. The form is numpy.linalg.matrix_rank's
    default (Golub & Van Loan, Matrix Computations, 4th ed., §5.4.1); what differs is eps:
    the eps of the precision the matrix was *stored* in (`storage_eps`; for a matrix formed
    from stored tensors, the coarsest among its inputs), not the eps of the float64 used to
    compute its singular values. eps=None takes eps of sigma's dtype.

    c = 1/4 (TOL_FACTOR), chosen by measurement on a tiny real relora run (`make demo`:
    d_model 64, 4 layers, r = 16, float32 checkpoints every 50 steps, resets every 100).
    Within one ReLoRA cycle a wrapped matrix's update has rank ≤ 2r = 32 exactly; its dense
    float64 difference of the stored checkpoints shows the genuine singular values (equal
    to those computed from the factors) and below them float32 rounding noise of the
    stored W_eff = W + s·B·A. In units of max(m, n) · eps_32 · σ_1, over the 120 matrices of
    full rank 2r (attention.q_proj, o_proj 64 × 64 and swiglu.w_0, w_1, w_2 64 × 256 of
    all six within-cycle updates), the largest noise singular value was 0.13
    (attention.o_proj, layer 0, steps 550 → 600; 8.5 eps_32 · σ_1) and the smallest
    genuine one 0.55 (attention.o_proj, layer 3, steps 50 → 100; 35 eps_32 · σ_1). c = 1/4
    lies between them (their geometric middle is 0.27), a factor ≈ 2 from each.
    numpy's c = 1 would count that genuine value as zero.
    """
    if eps is None:
        eps = torch.finfo(sigma.dtype).eps
    dim = torch.as_tensor(max_dim, dtype=sigma.dtype, device=sigma.device)
    e = torch.as_tensor(eps, dtype=sigma.dtype, device=sigma.device)
    return c * dim * e * sigma[..., 0]


def numerical_rank(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Numerical rank r = #{i : σ_i > tol}, tol = `zero_tolerance` (c · max(m, n) · eps ·
    σ_1, eps of the storage precision). NaN for a matrix that held NaN/Inf."""
    tol = zero_tolerance(sigma, max_dim, eps)
    count = (sigma > tol[..., None]).sum(-1).to(sigma.dtype)
    return _nan_where_invalid(count, sigma)


def condition_number(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None
) -> torch.Tensor:
    """κ = σ_1 / σ_k. +inf when σ_k = 0, where σ_k counts as 0 at or below the numerical-zero
    tolerance c · max(m, n) · eps · σ_1 (`zero_tolerance`), so κ = inf exactly when the
    numerical rank is below k. NaN for an all-zero matrix."""
    k = rank_bound(sigma)
    idx = (k - 1).clamp_min(0).unsqueeze(-1)
    smin = torch.gather(sigma, -1, idx).squeeze(-1)
    smax = sigma[..., 0]
    tol = zero_tolerance(sigma, max_dim, eps)
    inf = torch.full((), math.inf, dtype=sigma.dtype)
    cn = torch.where(smin > tol, smax / smin, inf)
    cn = torch.where(smax > 0, cn, torch.full((), math.nan, dtype=sigma.dtype))
    return _nan_where_invalid(cn, sigma)


def nonzero_condition_number(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None
) -> torch.Tensor:
    """κ of the non-zero part: cn_nz = σ_1 / σ_r, r the numerical rank (`numerical_rank`).

    Finite for rank-deficient matrices (where κ = σ_1/σ_k is inf) and equal to κ for
    matrices of full numerical rank. NaN for an all-zero matrix (r = 0) and for a matrix
    that held NaN/Inf."""
    r = numerical_rank(sigma, max_dim, eps)
    ok = torch.isfinite(r) & (r > 0)
    idx = torch.where(ok, r - 1, 0).to(torch.int64).unsqueeze(-1)
    s_r = torch.gather(sigma, -1, idx).squeeze(-1)
    return torch.where(ok, sigma[..., 0] / s_r, torch.full((), math.nan, dtype=sigma.dtype))


def rank_deficit(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None
) -> torch.Tensor:
    """k − r: the rank bound k (min(m, n), or a product's inner dimension) minus the
    numerical rank r. 0 for a matrix of full numerical rank; NaN for one that held NaN/Inf."""
    return rank_bound(sigma).to(sigma.dtype) - numerical_rank(sigma, max_dim, eps)


def stable_rank(sigma: torch.Tensor) -> torch.Tensor:
    """Stable rank ‖W‖_F² / σ_1² = Σ_i σ_i² / σ_1². NaN for an all-zero matrix."""
    fro2 = torch.nansum(sigma * sigma, -1)
    s1 = sigma[..., 0]
    out = fro2 / (s1 * s1)
    return torch.where(s1 > 0, out, torch.full((), math.nan, dtype=out.dtype))


# Entry-wise metrics: they need the matrix entries, not only the spectrum.


def hoyer(x: torch.Tensor) -> torch.Tensor:
    """Hoyer sparsity of the entries of each matrix (..., m, n), n_e = m·n entries:
    (sqrt(n_e) − ‖w‖_1/‖w‖_2) / (sqrt(n_e) − 1). 1 for one non-zero entry, 0 for equal
    magnitudes; NaN for a zero matrix, for n_e = 1, and for entries holding NaN/Inf."""
    w = x.flatten(-2).to(torch.float64)
    n = w.shape[-1]
    l1 = w.abs().sum(-1)
    l2 = w.pow(2).sum(-1).sqrt()
    root = math.sqrt(n)
    if n == 1:
        return torch.full(w.shape[:-1], math.nan, dtype=torch.float64, device=w.device)
    out = (root - l1 / l2) / (root - 1)
    return torch.where(l2 > 0, out, torch.full((), math.nan, dtype=torch.float64))


def gini(x: torch.Tensor) -> torch.Tensor:
    """Gini index of the entry magnitudes (Hurley & Rickard 2009): with c_(1) ≤ … ≤ c_(N)
    the sorted |w|, G = 1 − 2·Σ_j (c_(j) / ‖c‖_1)·(N − j + 1/2) / N. 0 for equal magnitudes,
    1 − 1/N for one non-zero entry; NaN for a zero matrix or NaN/Inf entries."""
    c = x.flatten(-2).to(torch.float64).abs().sort(-1).values
    n = c.shape[-1]
    l1 = c.sum(-1, keepdim=True)
    j = torch.arange(1, n + 1, dtype=torch.float64, device=c.device)
    weights = (n - j + 0.5) / n
    g = 1 - 2 * ((c / l1) * weights).sum(-1)
    return torch.where(l1[..., 0] > 0, g, torch.full((), math.nan, dtype=torch.float64))


# ----------------------------------------------------------------------------------------
# The registry: what `--metrics` accepts.


@dataclass(frozen=True)
class Metric:
    name: str
    long_name: str
    definition: str
    #: from_spectrum(sigma, max_dim, eps=None) -> values (eps: storage eps per matrix, see
    #: `zero_tolerance`); None for entry-wise metrics
    from_spectrum: Callable[..., torch.Tensor] | None = None
    #: from_entries(matrices) -> values; for entry-wise metrics
    from_entries: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def entrywise(self) -> bool:
        return self.from_entries is not None


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("er", "effective rank", "exp(-sum_i p_i ln p_i), p_i = sigma_i / sum_j sigma_j",
               lambda s, d, eps=None: effective_rank(s)),
        Metric("per", "proportional effective rank", "ER / k, k = rank bound (min(m, n))",
               lambda s, d, eps=None: proportional_effective_rank(s)),
        Metric("cn", "condition number",
               "sigma_1 / sigma_k; inf if sigma_k <= tol = c*max(m,n)*eps*sigma_1 (eps of the "
               "storage precision, see tol); NaN for zero matrix", condition_number),
        Metric("cn_nz", "condition number of the non-zero part",
               "sigma_1 / sigma_r, r = numerical rank; NaN for zero matrix",
               nonzero_condition_number),
        Metric("stable_rank", "stable rank", "||W||_F^2 / sigma_1^2",
               lambda s, d, eps=None: stable_rank(s)),
        Metric("spectral_norm", "spectral norm", "sigma_1",
               lambda s, d, eps=None: spectral_norm(s)),
        Metric("frobenius_norm", "Frobenius norm", "sqrt(sum_i sigma_i^2)",
               lambda s, d, eps=None: frobenius_norm(s)),
        Metric("nuclear_norm", "nuclear norm", "sum_i sigma_i",
               lambda s, d, eps=None: nuclear_norm(s)),
        Metric("numerical_rank", "numerical rank",
               "#{i: sigma_i > tol}, tol = c*max(m,n)*eps*sigma_1 (eps: storage precision)",
               numerical_rank),
        Metric("rank_deficit", "rank deficit", "k - numerical rank, k = rank bound",
               rank_deficit),
        Metric("hoyer", "Hoyer sparsity of entries",
               "(sqrt(N) - ||w||_1/||w||_2) / (sqrt(N) - 1), N = m*n", from_entries=hoyer),
        Metric("gini", "Gini index of entry magnitudes",
               "1 - 2 sum_j (c_(j)/||c||_1) (N - j + 1/2)/N, c sorted ascending",
               from_entries=gini),
    ]
}



def _heavy_tail_metrics() -> list[Metric]:
    """The heavy-tail fit of the eigenvalues σ² (dynlab.heavytail), three variables."""
    from dynlab import heavytail

    return [
        Metric("alpha", "heavy-tail exponent of the eigenvalues sigma^2",
               "continuous power-law MLE 1 + n/sum ln(x/xmin) on the tail with the KS-minimal "
               f"xmin (Clauset et al. 2009); NaN below {heavytail.MIN_EIGENVALUES} eigenvalues; "
               "eigenvalues of sigma <= tol dropped",
               lambda s, d, eps=None: heavytail.alpha(s, d, eps, TOL_FACTOR)),
        Metric("alpha_ks", "KS distance of the heavy-tail fit",
               "max |F(x) - C(x)| over the tail, F the fitted power-law CDF",
               lambda s, d, eps=None: heavytail.alpha_ks(s, d, eps, TOL_FACTOR)),
        Metric("alpha_n_tail", "eigenvalues in the heavy-tail fit", "#{sigma^2 >= xmin}",
               lambda s, d, eps=None: heavytail.alpha_n_tail(s, d, eps, TOL_FACTOR)),
        Metric("inf_norm", "largest absolute entry", "max_ij |w_ij| (pico-analyze's 'inf')",
               from_entries=max_abs_entry),
    ]


def max_abs_entry(x: torch.Tensor) -> torch.Tensor:
    """max_ij |w_ij| of each matrix (..., m, n): pico-analyze's `inf` norm (the ∞-norm of
    the flattened entries). NaN for entries holding NaN; +inf for an infinite entry."""
    w = x.flatten(-2).to(torch.float64)
    out = w.abs().amax(-1)
    return torch.where(torch.isnan(w).any(-1), torch.full((), math.nan, dtype=out.dtype), out)


METRICS.update({m.name: m for m in _heavy_tail_metrics()})

DEFAULT_METRICS: tuple[str, ...] = tuple(METRICS)


def parse_metrics(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'per,cn' -> ('per', 'cn'). None or 'all' -> every metric. Unknown names raise
    ValueError listing the valid ones."""
    if spec is None:
        return DEFAULT_METRICS
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if names == ["all"]:
        return DEFAULT_METRICS
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(
            f"unknown metric(s) {', '.join(unknown) or '(none given)'}; "
            f"valid: {', '.join(METRICS)} (or 'all')"
        )
    return tuple(dict.fromkeys(names))
