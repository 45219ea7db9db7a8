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

On the CPU (`svdvals_of`), each Gram matrix is accumulated from blocks of the long side, each
converted to float64 only as it is used (no float64 copy of a whole matrix), and every BLAS and
LAPACK call is single-threaded, the calls spread over a pool of threads (`pooled_threads`):
small calls parallelise poorly inside one call, OpenMP threads that wait at barriers collapse
when other processes share the cores, and a single-threaded call gives the same bits whatever
the thread count.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")
R = TypeVar("R")

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
    m, n = x.shape[-2], x.shape[-1]
    batch_shape = x.shape[:-2]
    k = min(m, n)
    x = x.reshape(-1, m, n)
    if k == 0 or x.shape[0] == 0:
        return torch.full((x.shape[0], k), math.nan, dtype=dtype).reshape(*batch_shape, k)
    if method == "svd":
        xt = x.to(dtype)
        xt = xt.mT if m > n else xt
        finite = torch.isfinite(xt).all(dim=(-2, -1))
        s = torch.full((x.shape[0], k), math.nan, dtype=dtype, device=x.device)
        if bool(finite.any()):
            s[finite] = _batched(torch.linalg.svdvals, xt[finite])
        return s.reshape(*batch_shape, k)
    s = svdvals_of(list(x), dtype=dtype, gram_max_cond=gram_max_cond,
                   fallback=method == "auto")
    return s.reshape(*batch_shape, k)


def svdvals_of(
    xs: Sequence[torch.Tensor],
    minus: Sequence[torch.Tensor | None] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    gram_max_cond: float | None = None,
    fallback: bool = True,
) -> torch.Tensor:
    """Singular values of equal-shaped matrices X_i (or X_i − minus_i), (B, k) in `dtype`:
    `svdvals`'s "auto" route (its "gram" route with fallback=False) without a stacked copy.

    Each Gram matrix is accumulated from blocks of ≈ GRAM_BLOCK entries along the long side,
    each converted to `dtype` (and the difference formed) only as it is used: no matrix is
    ever held whole in `dtype`, except the few whose κ estimate sends them to the SVD. On the
    CPU the blocks are computed in parallel by single-threaded BLAS calls and summed in a fixed
    order, so the result does not depend on the number of threads."""
    gram = _grams(xs, minus, dtype)

    def entries(i: int) -> torch.Tensor:
        return _entries(xs[i], None if minus is None else minus[i], dtype)

    def finite(i: int) -> bool:
        return bool(torch.isfinite(xs[i]).all()) and (
            minus is None or minus[i] is None or bool(torch.isfinite(minus[i]).all()))

    return gram_svdvals(gram, tuple(xs[0].shape), entries, finite, dtype=dtype,
                        gram_max_cond=gram_max_cond, fallback=fallback)


def gram_svdvals(
    gram: torch.Tensor,
    shape: tuple[int, int],
    entries: Callable[[int], torch.Tensor],
    finite: Callable[[int], bool],
    *,
    dtype: torch.dtype = torch.float64,
    gram_max_cond: float | None = None,
    fallback: bool = True,
) -> torch.Tensor:
    """Singular values (B, k) of B matrices of `shape` (m, n) from `gram` (B, k, k), the Gram
    matrices of their shorter side in `dtype`: σ_i = √λ_i, except for the matrices whose κ
    estimate σ_1/σ_k exceeds `gram_max_cond` (or whose Gram overflowed), which go through
    the SVD of `entries(i)` (the matrix in `dtype`) when `fallback`. A NaN/Inf entry shows
    as a non-finite Gram diagonal; `finite(i)` then says whether matrix i really holds one
    (its σ are NaN)."""
    if gram_max_cond is None:
        gram_max_cond = GRAM_MAX_COND_BY_DTYPE.get(dtype, 1.0)
    m, n = shape
    suspect = ~torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all(-1).cpu()
    if bool(suspect.any()):
        gram = torch.where(suspect.to(gram.device)[:, None, None], 0.0, gram)
    lam = _batched(eigvalsh, gram)
    device = gram.device
    del gram
    s = lam.clamp_min(0).sqrt().flip(-1).to(device)  # eigvalsh is ascending
    ok = torch.ones(s.shape[0], dtype=torch.bool)
    for i in suspect.nonzero().flatten().tolist():
        ok[i] = finite(i)
    redo = torch.zeros(s.shape[0], dtype=torch.bool)
    if fallback:
        # κ estimate from the Gram route itself; a zero matrix (all σ = 0) is exact as it is
        redo = ~(s[:, -1].cpu() * gram_max_cond >= s[:, 0].cpu())
        redo |= suspect & ok  # an overflowed Gram of finite entries
    redo &= ok
    index = redo.nonzero().flatten().tolist()
    per_call = max(1, SVD_BLOCK // (m * n))  # bounds the float64 copies held at once
    for start in range(0, len(index), per_call):
        part = index[start:start + per_call]
        block = torch.stack([entries(i) for i in part])
        s[part] = _batched(torch.linalg.svdvals, block.mT if m > n else block)
        del block
    s[~ok.to(s.device)] = math.nan
    return s


def columns_grams(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """X·Xᵀ of X = [L_0·R_0 | … | L_{H−1}·R_{H−1}] for each of a batch (B, H, m, r),
    (B, H, r, n) in float64: Σ_h L_h·(R_h·R_hᵀ)·L_hᵀ (components.Columns), (B, m, m) — for
    m = n = d, H heads and r = 2·hd, 2·H·d·r·(r + d) flops in place of H·d³ for the
    products and 2·H·d³ for their Gram. On the CPU through numpy's BLAS (a matrix's bits do
    not depend on the batch)."""
    b, h, m, r = left.shape
    p = matmul(right, right.mT)  # (B, H, r, r)
    q = matmul(left, p)  # (B, H, m, r)
    q_cat = q.movedim(1, 2).reshape(b, m, h * r)
    l_cat = left.movedim(1, 2).reshape(b, m, h * r)
    return matmul(q_cat, l_cat.mT)


#: entries per block of a Gram accumulation (2 MiB in float64: a block stays in the cache)
GRAM_BLOCK = 1 << 18
#: entries of the matrices copied at once for the SVD fallback (64 MiB in float64)
SVD_BLOCK = 1 << 23


def finite_matrices(x: torch.Tensor) -> torch.Tensor:
    """Whether each matrix of a batch (…, m, n) holds only finite entries, (…) bool (on the
    CPU through numpy: a single pass without temporaries of x's size)."""
    if x.device.type == "cpu" and x.dtype in (torch.float64, torch.float32):
        a = x.detach().numpy()
        return torch.from_numpy(np.asarray(np.isfinite(a).all(axis=(-2, -1))))
    return torch.isfinite(x).flatten(-2).all(-1)


#: order above which `eigvalsh` on the CPU goes through numpy's LAPACK rather than torch's
#: (measured on one core, float64 batches: torch's 1.2–1.45× faster from 32 to 96, 1.05× at
#: 192, numpy's 1.1–1.2× faster from 256)
TORCH_EIG_MAX = 192


def eigvalsh(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues, ascending, of each symmetric matrix of a batch (lower triangle used;
    every matrix computed on its own, so its bits do not depend on the batch). On the CPU
    through torch's LAPACK up to order `TORCH_EIG_MAX` and numpy's above it (whichever is
    faster on these sizes); single-threaded inside `_parallel`."""
    if x.device.type == "cpu" and x.dtype in (torch.float64, torch.float32) \
            and x.shape[-1] > TORCH_EIG_MAX:
        return torch.from_numpy(np.linalg.eigvalsh(x.detach().numpy()))
    return torch.linalg.eigvalsh(x)


def _entries(x: torch.Tensor, minus: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x (− minus) in `dtype`, one copy (bitwise x.to(dtype) − minus.to(dtype))."""
    out = x.to(dtype, copy=True)
    if minus is not None:
        out.sub_(minus.to(out.device, non_blocking=True))
    return out


def _grams(xs: Sequence[torch.Tensor], minus: Sequence[torch.Tensor | None] | None,
           dtype: torch.dtype) -> torch.Tensor:
    """The Gram matrix of the short side of each X_i (− minus_i), (B, k, k) in `dtype`:
    X·Xᵀ for a wide X, Xᵀ·X for a tall one, summed over blocks of the long side in order."""
    m, n = xs[0].shape
    tall = m > n
    k, wide = min(m, n), max(m, n)
    step = max(1, GRAM_BLOCK // k) if xs[0].device.type == "cpu" else wide
    if wide <= step and xs[0].device.type == "cpu" and dtype in (torch.float32, torch.float64):
        return _small_grams(xs, minus, dtype)
    blocks = [(i, a, min(a + step, wide)) for i in range(len(xs)) for a in range(0, wide, step)]

    def part(job: tuple[int, int, int]) -> torch.Tensor:
        i, a, b = job
        x = xs[i][a:b] if tall else xs[i][:, a:b]
        sub = None if minus is None or minus[i] is None else (
            minus[i][a:b] if tall else minus[i][:, a:b])
        e = _entries(x, sub, dtype)
        return _syrk(e.mT if tall else e)

    out = torch.zeros((len(xs), k, k), dtype=dtype, device=xs[0].device)
    for (i, _, _), g in zip(blocks, _parallel(part, blocks, ordered=True), strict=True):
        out[i] += g  # blocks in a fixed order: the sum does not depend on the threads
    return out


def _small_grams(xs: Sequence[torch.Tensor], minus: Sequence[torch.Tensor | None] | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """`_grams` of matrices that are each one block (on the CPU): stacked in `dtype` a few at a
    time (≈ 4·GRAM_BLOCK entries) and multiplied by numpy's batched matmul (one BLAS gemm per
    matrix, single-threaded, spread over the pool): the same bits for a matrix whatever the
    batch it is in, without a Python call per matrix."""
    m, n = xs[0].shape
    tall = m > n
    per_chunk = max(1, 4 * GRAM_BLOCK // (m * n))
    chunks = [range(a, min(a + per_chunk, len(xs))) for a in range(0, len(xs), per_chunk)]

    def grams(idx: range) -> torch.Tensor:
        e = torch.empty((len(idx), m, n), dtype=dtype)
        torch.stack([xs[i] for i in idx], out=e)  # one copy, bitwise _entries(xs[i], …)
        for j, i in enumerate(idx):
            if minus is not None and minus[i] is not None:
                e[j].sub_(minus[i])
        e = e.numpy().transpose(0, 2, 1) if tall else e.numpy()
        return torch.from_numpy(np.matmul(e, e.transpose(0, 2, 1)))

    return torch.cat(list(_parallel(grams, chunks)))


def _syrk(a: torch.Tensor) -> torch.Tensor:
    """a·aᵀ of one matrix. On the CPU through numpy, whose `a @ a.T` calls BLAS syrk (half the
    flops of a general product); in float32/float64 only (others through torch)."""
    if a.device.type != "cpu" or a.dtype not in (torch.float64, torch.float32):
        return a @ a.mT
    x = a.numpy()
    return torch.from_numpy(x @ x.T)


def _core(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """R_L·R_Rᵀ of left = Q_L·R_L and rightᵀ = Q_R·R_R (thin QR): the r × r core of the
    product left·right, which has its singular values (of each pair of a batch)."""
    left, right = pair
    r_left = torch.linalg.qr(left, mode="r").R
    r_right = torch.linalg.qr(right.mT, mode="r").R
    return matmul(r_left, r_right.mT)


_POOL: ThreadPoolExecutor | None = None
#: the pool's thread count inside `pooled_threads` (None: torch's thread count)
_POOL_THREADS: int | None = None


@contextlib.contextmanager
def pooled_threads(threads: int | None = None) -> Iterator[int]:
    """Within: torch runs single-threaded in the calling thread and the heavy calls of this
    module (Gram blocks, LAPACK) run on a pool of `threads` threads (default: torch's
    thread count on entry), each call single-threaded. Elementwise passes (norms, finiteness
    checks, conversions) are memory-bound and gain little from threads, while OpenMP
    threads waiting at barriers lose much when other processes share the cores."""
    global _POOL_THREADS
    before, outer = torch.get_num_threads(), _POOL_THREADS
    _POOL_THREADS = threads or outer or before
    torch.set_num_threads(1)
    blas_before = _BLAS_LOCAL(1) if _BLAS_LOCAL is not None else None
    try:
        yield _POOL_THREADS
    finally:
        torch.set_num_threads(before)
        if _BLAS_LOCAL is not None and blas_before is not None:
            _BLAS_LOCAL(blas_before)
        _POOL_THREADS = outer


def _openblas_local() -> Callable[[int], int] | None:
    """numpy's OpenBLAS `openblas_set_num_threads_local` (the calling thread's BLAS thread
    count; returns the previous one), or None where numpy has another BLAS."""
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*.so*"))
    for lib in libs:
        try:
            fn = ctypes.CDLL(lib).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


_BLAS_LOCAL = _openblas_local()


def _one_thread(fn: Callable[[T], R]) -> Callable[[T], R]:
    """fn with numpy's BLAS single-threaded in the calling thread (torch is single-threaded
    in the pool's threads from their start)."""

    def wrapped(arg: T) -> R:
        if _BLAS_LOCAL is not None:
            _BLAS_LOCAL(1)
        return fn(arg)

    return wrapped


def _parallel(fn: Callable[[T], R], items: Sequence[T], *, ordered: bool = False
              ) -> Iterable[R]:
    """fn(item) for every item, in order, on the CPU spread over torch's thread count (or
    `pooled_threads`'), each call single-threaded (torch and numpy's BLAS): small LAPACK and
    BLAS calls parallelise poorly inside one call (and, with threads spinning, collapse when
    other processes share the cores), and a single-threaded call gives the same bits whatever
    the thread count, so serial and Dask runs write identical stores. A list; with `ordered`,
    an iterator that holds only a few results not yet taken (bounded memory)."""
    results = _run_parallel(fn, items)
    return results if ordered else list(results)


def _run_parallel(fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    global _POOL
    threads = _POOL_THREADS or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if len(items) < 2 or threads < 2:
            for item in items:
                yield _one_thread(fn)(item)
            return
        if _POOL is None or _POOL._max_workers != threads:
            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="dynlab-lapack",
                                       initializer=torch.set_num_threads, initargs=(1,))
        pending: collections.deque = collections.deque()
        it = iter(items)
        for item in itertools.islice(it, 2 * threads):
            pending.append(_POOL.submit(_one_thread(fn), item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(it, 1):
                pending.append(_POOL.submit(_one_thread(fn), item))
            yield result
    finally:
        torch.set_num_threads(before)


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn over a batch. On the CPU every call is single-threaded and the batch is split
    across torch's threads (`_parallel`)."""
    if x.device.type != "cpu":
        return fn(x)
    threads = _POOL_THREADS or torch.get_num_threads()
    if x.shape[0] < 2 or threads < 2:
        return list(_parallel(fn, [x]))[0]
    return torch.cat(list(_parallel(fn, list(x.tensor_split(min(threads, x.shape[0]))))))


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
    finite = finite_matrices(left) & finite_matrices(right)
    safe_l, safe_r = left, right
    if not bool(finite.all()):
        safe_l = torch.where(finite[..., None, None], left, torch.zeros((), dtype=dtype))
        safe_r = torch.where(finite[..., None, None], right, torch.zeros((), dtype=dtype))
    if left.device.type == "cpu":  # batched calls, the batch split over the pool's threads
        parts = max(1, min(_POOL_THREADS or torch.get_num_threads(), left.shape[0]))
        pairs = list(zip(safe_l.tensor_split(parts), safe_r.tensor_split(parts), strict=True))
        core = torch.cat(list(_parallel(_core, pairs)))
    else:  # one batched call per step on a GPU
        core = _core((safe_l, safe_r))
    s = svdvals(core, dtype=dtype, gram_max_cond=gram_max_cond)
    s = torch.where(finite[..., None], s, torch.full((), math.nan, dtype=dtype))
    return s.reshape(*batch_shape, s.shape[-1])
