"""Metrics of spectra: one function per formula, and the registry `--metrics` accepts.

Metric functions take spectra `sigma` of shape (..., K), descending and NaN-padded past the
matrix's rank bound k (k = the number of non-NaN entries). A row that is entirely NaN stands
for a matrix that held NaN/Inf: every metric of it is NaN. The rank-sensitive metrics
(`numerical_rank`, `condition_number`, `nonzero_condition_number`, `rank_deficit`) also take
the matrix's shape, the eps of the precision it was stored in and the Frobenius norm S of the
stored inputs it was formed from, and count σ_i as zero at or below `zero_tolerance`: the
storage precision's rounding noise c·eps·S·(1/√m + 1/√n), or the SVD's own error
max(m, n)·eps_c·σ_1 where that is larger.

"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

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


#: c in the storage term of the zero tolerance (see `zero_tolerance`).
TOL_FACTOR = 2.0
#: activations are kept in float32: the eps of their numerical-zero tolerance
ACT_EPS = float(torch.finfo(torch.float32).eps)


def storage_eps(*dtypes: torch.dtype) -> float:
    """eps of the coarsest of `dtypes`: the machine epsilon of the precision a matrix was
    stored in, or, for a matrix formed from stored tensors (a difference W_t − W_{t−1}, a
    product O·V), of the coarsest precision among its inputs. float64 2.2e-16, float32
    1.19e-7, float16 9.8e-4, bfloat16 7.8e-3."""
    if not dtypes:
        raise ValueError("storage_eps needs at least one dtype")
    return max(torch.finfo(d).eps for d in dtypes)


def noise_dim_factor(m: float | torch.Tensor, n: float | torch.Tensor) -> float | torch.Tensor:
    """(√m + √n) / √(m·n) = 1/√m + 1/√n: the spectral norm of an m × n matrix of independent
    zero-mean entries relative to its Frobenius norm (Bai–Yin: ‖E‖_2 ≈ rms(E)·(√m + √n), the
    edge of the Marchenko–Pastur law, and ‖E‖_F = rms(E)·√(m·n))."""
    return m**-0.5 + n**-0.5


def product_noise_norm(
    left_norm: float, right_norm: float, m: int, k: int, n: int,
    left_spectral: float | None = None, right_spectral: float | None = None,
) -> float:
    """S of a product L·R (L m × k, R k × n) formed from stored factors: the Frobenius norm a
    stored m × n matrix would need for its rounding noise to match the product's.

    Rounding L and R (each entry by at most u·|x|) perturbs the product by
    E = E_L·R + L·E_R + E_L·E_R, and ‖E_L·R‖_2 ≤ ‖E_L‖_2·‖R‖_2. With the rounding model of
    `zero_tolerance` (‖E_X‖_2 ≈ u'·‖X‖_F·(1/√a + 1/√b) for an a × b stored X),
        ‖E‖_2 ≲ u'·(‖L‖_F·‖R‖_2·(1/√m + 1/√k) + ‖L‖_2·‖R‖_F·(1/√k + 1/√n)),
    which equals the stored-matrix model u'·S·(1/√m + 1/√n) for
        S = (‖L‖_F·‖R‖_2·(1/√m + 1/√k) + ‖L‖_2·‖R‖_F·(1/√k + 1/√n)) / (1/√m + 1/√n).
    left_norm, right_norm: Frobenius norms; left_spectral, right_spectral: spectral norms,
    None taking the Frobenius norm (an upper bound), which gives
    S = ‖L‖_F·‖R‖_F·(1/√m + 2/√k + 1/√n) / (1/√m + 1/√n). The 1/√k term makes the product's
    noise larger than that of a stored matrix of the same norm: the errors are concentrated
    in the k directions of the factors."""
    ls = left_norm if left_spectral is None else left_spectral
    rs = right_norm if right_spectral is None else right_spectral
    return ((left_norm * rs * (m**-0.5 + k**-0.5) + ls * right_norm * (k**-0.5 + n**-0.5))
            / (m**-0.5 + n**-0.5))


def zero_tolerance(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None,
    c: float = TOL_FACTOR, *, min_dim: int | torch.Tensor | None = None,
    norm: float | torch.Tensor | None = None, compute_eps: float | None = None,
    tol: torch.Tensor | None = None,
) -> torch.Tensor:
    """The numerical-zero tolerance of each spectrum of an m × n matrix (m = max_dim,
    n = min_dim): the larger of the storage precision's rounding noise and the error of the
    singular-value computation,

        tol = max(c · eps · S · (√m + √n) / √(m·n),   max(m, n) · eps_c · σ_1).

    A singular value at or below tol counts as zero in `numerical_rank`, `condition_number`,
    `nonzero_condition_number` and `rank_deficit`.

    Storage term. Storing a matrix X in a precision of unit roundoff u = eps/2 perturbs each
    entry by at most u·|x_ij|, so the perturbation E satisfies ‖E‖_2 ≤ ‖E‖_F ≤ u·‖X‖_F and,
    by Weyl's inequality, |σ̃_i − σ_i| ≤ ‖E‖_2: no singular value below that level can be told
    from zero. Rounding errors are independent and zero-mean, so ‖E‖_2 is far below that
    worst case: ‖E‖_2 ≈ rms(E)·(√m + √n) (Bai–Yin; `noise_dim_factor`), about
    u·‖X‖_F·(√m + √n)/√(3·m·n) for errors uniform in ±u·|x|. S is the Frobenius norm of the
    STORED inputs the matrix was formed from: ‖X‖_F for a stored matrix (norm=None: the
    spectrum's own √Σσ_i²), √(‖W_t‖_F² + ‖W_prev‖_F²) for a difference W_t − W_prev (the two
    roundings add in quadrature), `product_noise_norm` for a product of stored factors
    (whose exact zeros past the inner dimension are already in the spectrum; the tolerance
    judges its non-zero part). eps: the storage precision's machine epsilon
    (`storage_eps`); None takes sigma's dtype. min_dim None takes k, the spectrum's length.

    Computation term: max(m, n)·eps_c·σ_1 is the conventional bound of the error of a
    computed SVD (numpy.linalg.matrix_rank's default; Golub & Van Loan, Matrix Computations,
    4th ed., §5.4.1) with eps_c the computation's precision (compute_eps; None: sigma's
    dtype). It dominates only for matrices stored in the precision they are analysed in.

    The earlier rule c·max(m, n)·eps_storage·σ_1 treated storage rounding like computation
    error; since max(m, n)·eps_bf16 = 4 at m = 512 it reached σ_1 itself for every bf16
    matrix of width ≥ 512 (fp16: 4096), so every real checkpoint read rank 0.

    c = 2 (TOL_FACTOR), chosen by measurement on a tiny real relora run (`make demo`:
    d_model 64, 4 layers, r = 16, float32 checkpoints every 50 steps, resets every 100, 600
    steps). Within one ReLoRA cycle a wrapped matrix's update W_eff,t − W_eff,prev equals
    s·(B_t·A_t − B_prev·A_prev), of rank 2r (r where B_prev = 0 just after a reset); its
    dense float64 difference of the stored float32 checkpoints shows exactly those genuine
    singular values (equal to the factor route's to 1e-3) and below them the rounding noise
    of the two stored W_eff. In units of eps_32·S·(1/√m + 1/√n), S = √(‖W_t‖_F² +
    ‖W_prev‖_F²), over the 140 within-cycle updates of attention.q_proj, o_proj (64 × 64)
    and swiglu.w_0, w_1, w_2 (64 × 256): the largest noise value was 0.51 (swiglu.w_1,
    layer 2, steps 450 → 500; median 0.24, as the model's 1/(2√3) = 0.29 predicts) and the
    smallest genuine one 42 (attention.o_proj, layer 3, steps 50 → 100). The same update
    from its stored factors (s·B_t·A_t − s·B_prev·A_prev, S the sum of the two terms'
    `product_noise_norm`) has its smallest genuine value at 12 of its own units. c = 2 lies
    between 0.51 and 12 (their geometric middle is 2.5), a factor 4 above the largest noise
    value; the gap is a factor 80 on the dense route, where the former rule's units left a
    factor 4. For products the model is an upper bound: rounding the stored factors of the
    demo's OV-circuit updates (uniform relative errors ±u, 5 draws, 12 matrices) moved no
    singular value by more than 0.02 of these units, since Weyl's ‖E‖_2 is reached only by
    directions that are exactly zero in a large subspace (the dense cliff); c = 2 is
    therefore cautious for them: a value of a product below tol may still be resolvable.

    tol: a tolerance already computed by this rule (e.g. the `tol` variable of a store, for
    metrics recomputed from stored spectra); returned as it is.
    """
    if tol is not None:
        return torch.as_tensor(tol, dtype=sigma.dtype, device=sigma.device)
    if eps is None:
        eps = torch.finfo(sigma.dtype).eps
    if compute_eps is None:
        compute_eps = torch.finfo(sigma.dtype).eps
    opts = dict(dtype=sigma.dtype, device=sigma.device)
    m = torch.as_tensor(max_dim, **opts)
    n = (rank_bound(sigma).clamp_min(1).to(sigma.dtype) if min_dim is None
         else torch.as_tensor(min_dim, **opts))
    s = frobenius_norm(sigma) if norm is None else torch.as_tensor(norm, **opts)
    e = torch.as_tensor(eps, **opts)
    storage = c * e * s * noise_dim_factor(m, n)
    computation = m * compute_eps * sigma[..., 0]
    return torch.maximum(storage, computation)


def numerical_rank(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None,
    *, min_dim: int | torch.Tensor | None = None, norm: float | torch.Tensor | None = None,
    compute_eps: float | None = None, tol: torch.Tensor | None = None,
) -> torch.Tensor:
    """Numerical rank r = #{i : σ_i > tol}, tol = `zero_tolerance` (the storage precision's
    rounding noise of S, or the SVD's error). NaN for a matrix that held NaN/Inf."""
    tol = zero_tolerance(sigma, max_dim, eps, min_dim=min_dim, norm=norm,
                         compute_eps=compute_eps, tol=tol)
    count = (sigma > tol[..., None]).sum(-1).to(sigma.dtype)
    return _nan_where_invalid(count, sigma)


def condition_number(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None,
    *, min_dim: int | torch.Tensor | None = None, norm: float | torch.Tensor | None = None,
    compute_eps: float | None = None, tol: torch.Tensor | None = None,
) -> torch.Tensor:
    """κ = σ_1 / σ_k. +inf when σ_k = 0, where σ_k counts as 0 at or below the numerical-zero
    tolerance (`zero_tolerance`), so κ = inf exactly when the numerical rank is below k. NaN
    for an all-zero matrix."""
    k = rank_bound(sigma)
    idx = (k - 1).clamp_min(0).unsqueeze(-1)
    smin = torch.gather(sigma, -1, idx).squeeze(-1)
    smax = sigma[..., 0]
    tol = zero_tolerance(sigma, max_dim, eps, min_dim=min_dim, norm=norm,
                         compute_eps=compute_eps, tol=tol)
    inf = torch.full((), math.inf, dtype=sigma.dtype)
    cn = torch.where(smin > tol, smax / smin, inf)
    cn = torch.where(smax > 0, cn, torch.full((), math.nan, dtype=sigma.dtype))
    return _nan_where_invalid(cn, sigma)


def nonzero_condition_number(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None,
    *, min_dim: int | torch.Tensor | None = None, norm: float | torch.Tensor | None = None,
    compute_eps: float | None = None, tol: torch.Tensor | None = None,
) -> torch.Tensor:
    """κ of the non-zero part: cn_nz = σ_1 / σ_r, r the numerical rank (`numerical_rank`).

    Finite for rank-deficient matrices (where κ = σ_1/σ_k is inf) and equal to κ for
    matrices of full numerical rank. NaN for an all-zero matrix (r = 0) and for a matrix
    that held NaN/Inf."""
    r = numerical_rank(sigma, max_dim, eps, min_dim=min_dim, norm=norm, compute_eps=compute_eps,
                       tol=tol)
    ok = torch.isfinite(r) & (r > 0)
    idx = torch.where(ok, r - 1, 0).to(torch.int64).unsqueeze(-1)
    s_r = torch.gather(sigma, -1, idx).squeeze(-1)
    return torch.where(ok, sigma[..., 0] / s_r, torch.full((), math.nan, dtype=sigma.dtype))


def rank_deficit(
    sigma: torch.Tensor, max_dim: int | torch.Tensor, eps: float | torch.Tensor | None = None,
    *, min_dim: int | torch.Tensor | None = None, norm: float | torch.Tensor | None = None,
    compute_eps: float | None = None, tol: torch.Tensor | None = None,
) -> torch.Tensor:
    """k − r: the rank bound k (min(m, n), or a product's inner dimension) minus the
    numerical rank r. 0 for a matrix of full numerical rank; NaN for one that held NaN/Inf."""
    r = numerical_rank(sigma, max_dim, eps, min_dim=min_dim, norm=norm, compute_eps=compute_eps,
                       tol=tol)
    return rank_bound(sigma).to(sigma.dtype) - r


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
    w = x.flatten(-2).to(torch.float64)
    if w.device.type == "cpu":  # numpy's vectorised sort: several times torch's here
        c = torch.from_numpy(np.sort(np.abs(w.detach().numpy()), axis=-1))
    else:
        c = w.abs().sort(-1).values
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
    #: from_spectrum(sigma, max_dim, eps=None, *, min_dim=None, norm=None, compute_eps=None)
    #: -> values (the tolerance's inputs per matrix, see `zero_tolerance`); None for
    #: entry-wise metrics
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
               lambda s, d, eps=None, **_: effective_rank(s)),
        Metric("per", "proportional effective rank", "ER / k, k = rank bound (min(m, n))",
               lambda s, d, eps=None, **_: proportional_effective_rank(s)),
        Metric("cn", "condition number",
               "sigma_1 / sigma_k; inf if sigma_k <= tol (the storage precision's rounding "
               "noise, see tol); NaN for zero matrix", condition_number),
        Metric("cn_nz", "condition number of the non-zero part",
               "sigma_1 / sigma_r, r = numerical rank; NaN for zero matrix",
               nonzero_condition_number),
        Metric("stable_rank", "stable rank", "||W||_F^2 / sigma_1^2",
               lambda s, d, eps=None, **_: stable_rank(s)),
        Metric("spectral_norm", "spectral norm", "sigma_1",
               lambda s, d, eps=None, **_: spectral_norm(s)),
        Metric("frobenius_norm", "Frobenius norm", "sqrt(sum_i sigma_i^2)",
               lambda s, d, eps=None, **_: frobenius_norm(s)),
        Metric("nuclear_norm", "nuclear norm", "sum_i sigma_i",
               lambda s, d, eps=None, **_: nuclear_norm(s)),
        Metric("numerical_rank", "numerical rank",
               "#{i: sigma_i > tol}, tol = max(c*eps*S*(1/sqrt(m)+1/sqrt(n)), "
               "max(m,n)*eps_c*sigma_1) (see tol)",
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
    """The heavy-tail fit of the eigenvalues σ² (dynlab.analysis.heavytail), three variables."""
    from dynlab.analysis import heavytail

    return [
        Metric("alpha", "heavy-tail exponent of the eigenvalues sigma^2",
               "continuous power-law MLE 1 + n/sum ln(x/xmin) on the tail with the KS-minimal "
               f"xmin (Clauset et al. 2009); NaN below {heavytail.MIN_EIGENVALUES} eigenvalues; "
               "eigenvalues of sigma <= tol dropped",
               lambda s, d, eps=None, **kw: heavytail.alpha(s, zero_tolerance(s, d, eps, **kw))),
        Metric("alpha_ks", "KS distance of the heavy-tail fit",
               "max |F(x) - C(x)| over the tail, F the fitted power-law CDF",
               lambda s, d, eps=None, **kw: heavytail.alpha_ks(s, zero_tolerance(s, d, eps, **kw))),
        Metric("alpha_n_tail", "eigenvalues in the heavy-tail fit", "#{sigma^2 >= xmin}",
               lambda s, d, eps=None, **kw: heavytail.alpha_n_tail(
                   s, zero_tolerance(s, d, eps, **kw))),
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


def _weightwatcher_metrics() -> list[Metric]:
    """WeightWatcher's heavy-tailed self-regularisation family (dynlab.analysis.heavytail):
    norms of the eigenvalues σ², the Marchenko–Pastur bulk fit, the trained flags (all from
    the spectrum) and the correlation traps of the element-wise randomised matrix (entries)."""
    from dynlab.analysis import heavytail as H

    def norms(i):
        return lambda s, d, eps=None, **kw: torch.from_numpy(np.ascontiguousarray(
            H.ww_norms(s, zero_tolerance(s, d, eps, **kw))[..., i]))

    def mp(i):
        return lambda s, d, eps=None, **kw: torch.from_numpy(np.ascontiguousarray(
            H.mp_fits(s, d)[..., i]))

    def flag(i):
        return lambda s, d, eps=None, **kw: torch.from_numpy(np.ascontiguousarray(
            H.trained_flags(H.alpha(s, zero_tolerance(s, d, eps, **kw)).numpy())[i]))

    def rand(i):
        return lambda x: torch.from_numpy(np.ascontiguousarray(H.randomised_batch(x)[..., i]))

    return [
        Metric("log_norm", "log10 squared Frobenius norm", "log10 sum_i sigma_i^2", norms(0)),
        Metric("log_spectral_norm", "log10 squared spectral norm", "log10 sigma_1^2", norms(1)),
        Metric("alpha_weighted", "alpha-weighted log spectral norm",
               "alpha * log10 sigma_1^2 (Martin, Peng & Mahoney 2021)", norms(2)),
        Metric("log_alpha_norm", "log10 Schatten alpha-norm",
               "log10 sum_i (sigma_i^2)^alpha", norms(3)),
        Metric("mp_sigma", "Marchenko-Pastur sigma of the rescaled ESD",
               "WeightWatcher's sigma_mp: KDE fit of the MP law to sigma^2 scaled to mean 1",
               mp(0)),
        Metric("mp_sigma2", "Marchenko-Pastur bulk variance",
               "mean of the eigenvalues sigma^2 <= lambda_+ (the bulk) / N: MP's first "
               "moment, the bulk's entry variance on the scale of W^T W / N", mp(1)),
        Metric("mp_bulk_max", "Marchenko-Pastur bulk edge lambda_+",
               "(sigma_mp (1 + 1/sqrt(Q)))^2 on the scale of sigma^2, Q = N/M", mp(2)),
        Metric("num_spikes", "eigenvalues above the MP bulk",
               "#{lambda > lambda_+ + sqrt(TW)} (WeightWatcher's Tracy-Widom margin)", mp(3)),
        Metric("mp_softrank", "MP soft rank", "lambda_+ / lambda_max", mp(4)),
        Metric("over_trained", "WeightWatcher's over-trained flag", "1 if alpha < 2 else 0",
               flag(0)),
        Metric("under_trained", "WeightWatcher's under-trained flag", "1 if alpha > 6 else 0",
               flag(1)),
        Metric("rand_distance", "Jensen-Shannon distance to the randomised ESD",
               "JS distance of sorted sigma^2 of W and of W with shuffled entries (seeded)",
               from_entries=rand(0)),
        Metric("max_rand_eval", "largest eigenvalue of the randomised matrix",
               "max sigma^2 over 5 shuffles (1 if min(m,n) >= 100)", from_entries=rand(1)),
        Metric("num_rand_spikes", "MP spikes of the randomised matrix (correlation traps)",
               "num_spikes of the shuffled replicas' ESD", from_entries=rand(2)),
    ]


METRICS.update({m.name: m for m in _weightwatcher_metrics()})


def _tail_fit_metrics() -> list[Metric]:
    """WeightWatcher's other tail fits (dynlab.analysis.heavytail): α with x_min searched near
    the ESD's peak (`fix_fingers='xmin_peak'`) and the truncated power law (`fit='TPL'`) at
    the plain fit's x_min, from the eigenvalues `alpha` fits."""
    from dynlab.analysis import heavytail as H

    nan_when = (f"NaN for fewer than {H.MIN_EIGENVALUES} eigenvalues above tol (zero or "
                "rank-deficient matrix, a 1 x n matrix), fewer than 2 distinct ones (all "
                "equal), a matrix holding NaN/Inf")

    def peak(i):
        return lambda s, d, eps=None, **kw: torch.from_numpy(np.ascontiguousarray(
            H.peak_fits(s, zero_tolerance(s, d, eps, **kw))[..., i]))

    def tpl(i):
        return lambda s, d, eps=None, **kw: torch.from_numpy(np.ascontiguousarray(
            H.tpl_fits(s, zero_tolerance(s, d, eps, **kw))[..., i]))

    rule = ("x_min rule xmin_peak: the KS-minimal x_min among the eigenvalues in "
            "[log10(0.95 p), 1.5 p], p = the peak of a 100-bin histogram of log10 sigma^2 "
            "(WeightWatcher's fix_fingers='xmin_peak'); ")
    tpl_def = ("truncated power law p(x) ~ x^-alpha exp(-Lambda x) on x >= xmin of alpha's fit, "
               "maximum likelihood as powerlaw's Fit(...).truncated_power_law (Nelder-Mead, "
               "tol 1e-4, alpha > 1, Lambda > 0); ")
    return [
        Metric("alpha_peak", "heavy-tail exponent, x_min near the ESD peak",
               rule + "alpha = 1 + n/sum ln(x/xmin); " + nan_when + " or no x_min candidate "
               "in the range", peak(0)),
        Metric("alpha_peak_ks", "KS distance of the xmin_peak fit",
               rule + "max |F(x) - C(x)| over the tail; " + nan_when, peak(1)),
        Metric("alpha_peak_n_tail", "eigenvalues in the xmin_peak fit",
               rule + "#{sigma^2 >= xmin}; " + nan_when, peak(2)),
        Metric("tpl_alpha", "truncated power-law exponent alpha",
               tpl_def + "WeightWatcher's alpha with fit='TPL'; " + nan_when, tpl(0)),
        Metric("tpl_lambda", "truncated power-law cut-off rate Lambda",
               tpl_def + "powerlaw's and WeightWatcher's Lambda (units 1/sigma^2); " + nan_when,
               tpl(1)),
        Metric("tpl_llr", "log-likelihood ratio power law / truncated power law",
               "R = sum ln p_PL(x) - ln p_TPL(x) over alpha's tail (powerlaw's "
               "distribution_compare('power_law', 'truncated_power_law')); R < 0: the TPL fits "
               "better; " + nan_when, tpl(2)),
        Metric("tpl_p", "significance of tpl_llr",
               "p = 1 - chi2_1(|2R|) (nested models, Wilks; Clauset et al. 2009 appendix C); "
               + nan_when, tpl(3)),
    ]


METRICS.update({m.name: m for m in _tail_fit_metrics()})

#: Metrics computed only when named (or with 'all'): the Marchenko–Pastur fit (a density fit
#: per spectrum) and the correlation traps (six SVDs and an MP fit per matrix).
OPT_IN_METRICS: tuple[str, ...] = ("mp_sigma", "mp_sigma2", "mp_bulk_max", "num_spikes",
                                   "mp_softrank", "rand_distance", "max_rand_eval",
                                   "num_rand_spikes") + (
    # the other tail fits: one more fit per spectrum each (the TPL a numerical optimisation)
    "alpha_peak", "alpha_peak_ks", "alpha_peak_n_tail", "tpl_alpha", "tpl_lambda", "tpl_llr",
    "tpl_p")

DEFAULT_METRICS: tuple[str, ...] = tuple(m for m in METRICS if m not in OPT_IN_METRICS)


def parse_metrics(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'per,cn' -> ('per', 'cn'). None -> the defaults (all but `OPT_IN_METRICS`); 'all' ->
    every metric. Unknown names raise
    ValueError listing the valid ones."""
    if spec is None:
        return DEFAULT_METRICS
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if names == ["all"]:
        return tuple(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(
            f"unknown metric(s) {', '.join(unknown) or '(none given)'}; "
            f"valid: {', '.join(METRICS)} (or 'all')"
        )
    return tuple(dict.fromkeys(names))
