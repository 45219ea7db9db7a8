"""Singular values of batches of matrices (the spectra that every metric is computed from).

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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
