"""Curvature of the loss: Hessian-vector products, the top eigenvalues of the Hessian
(Lanczos), its trace (Hutchinson), and the sharpness of Adam's preconditioned Hessian against
the adaptive edge-of-stability threshold.

Contract: every function takes a *matvec*, a function v ↦ H·v on flat vectors (1-D tensors of
the parameters' total size), made by `hvp_operator` from a loss closure and a list of
parameters; nothing here reads files. Probe vectors come from a `torch.Generator` seeded by
the caller, so the same seed gives the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' entries concatenated into one 1-D tensor (in order)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector back into tensors shaped as `like`."""
    out, start = [], 0
    for t in like:
        out.append(vec[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def hvp_operator(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
                 ) -> MatVec:
    """v ↦ H·v with H = ∇²_θ L(θ) over `params` (Pearlmutter 1994: H·v = ∇_θ(∇_θL · v), two
    backward passes). The gradient graph is built once and reused for every product;
    `loss_fn()` computes the loss from `params` (which require grad)."""
    params = list(params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = flatten(grads)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        dot = torch.dot(flat_grad, v.to(flat_grad.dtype))
        hv = torch.autograd.grad(dot, params, retain_graph=True)
        return flatten(hv).detach()

    return matvec


@dataclass(frozen=True)
class Lanczos:
    """Top eigenvalues (descending) of a symmetric operator and the Lanczos iterations made."""

    eigenvalues: torch.Tensor  # float64, (k,)
    iterations: int


def lanczos(matvec: MatVec, dim: int, k: int = 4, iters: int | None = None, *,
            seed: int = 0, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> Lanczos:
    """The k largest (algebraic) eigenvalues of a symmetric dim×dim operator by the Lanczos
    method with full reorthogonalisation (Lanczos 1950; Golub & Van Loan, "Matrix
    Computations" §10.1): m = iters steps (default min(dim, max(2k + 10, 20))) build an
    orthonormal Krylov basis Q and the tridiagonal T = Qᵀ·H·Q; the Ritz values, the
    eigenvalues of T (float64), approximate the extreme eigenvalues of H, the largest
    converging first. With m = dim they are exact (up to rounding). The start vector is
    Gaussian from `torch.Generator().manual_seed(seed)`; the basis is kept in `dtype`."""
    if dim < 1:
        raise ValueError("lanczos: the operator has no dimension")
    m = int(min(dim, iters if iters is not None else max(2 * k + 10, 20)))
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(dim, generator=gen, dtype=torch.float64)
    q = (q / q.norm()).to(device=device, dtype=dtype)
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(m):
        w = matvec(basis[j]).to(dtype)
        alpha = float(torch.dot(w.double(), basis[j].double()))
        alphas.append(alpha)
        Q = torch.stack(basis)
        for _ in range(2):  # full reorthogonalisation, twice is enough (Kahan–Parlett)
            w = w - Q.T @ (Q @ w)
        beta = float(w.double().norm())
        if j == m - 1 or not math.isfinite(beta) or beta <= 1e-10 * max(1.0, abs(alpha)):
            break  # the Krylov space is exhausted (or the iteration budget is)
        betas.append(beta)
        basis.append(w / beta)
    n = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    if not bool(torch.isfinite(T).all()):
        return Lanczos(torch.full((k,), math.nan, dtype=torch.float64), n)
    ritz = torch.linalg.eigvalsh(T).flip(0)
    out = torch.full((k,), math.nan, dtype=torch.float64)
    out[: min(k, n)] = ritz[:k]
    return Lanczos(out, n)


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate of tr(H), its standard error and the number of probes."""

    trace: float
    stderr: float
    probes: int


def hutchinson(matvec: MatVec, dim: int, probes: int = 16, *, seed: int = 0,
               dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> TraceEstimate:
    """tr(H) ≈ (1/n)·Σ_i z_iᵀ·H·z_i with Rademacher probes z_i ∈ {±1}^dim (Hutchinson 1990),
    unbiased; its standard error is the sample standard deviation of the n terms over √n
    (for Rademacher probes Var(zᵀHz) = 2·Σ_{i≠j} H_ij², so a diagonal H has zero error). The
    probes come from `torch.Generator().manual_seed(seed)`."""
    if probes < 1:
        raise ValueError("hutchinson: need at least one probe")
    gen = torch.Generator().manual_seed(int(seed))
    terms = []
    for _ in range(probes):
        z = (torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
        terms.append(float(torch.dot(z.double(), matvec(z).double())))
    t = torch.tensor(terms, dtype=torch.float64)
    stderr = float(t.std(unbiased=True) / math.sqrt(probes)) if probes > 1 else math.nan
    return TraceEstimate(float(t.mean()), stderr, probes)


def adam_preconditioner(exp_avg_sq: torch.Tensor, step: int, betas: tuple[float, float],
                        eps: float) -> torch.Tensor:
    """The diagonal of Adam's preconditioner P = (1 − β₁^(t+1))·(√(v̂) + ε) with
    v̂ = v / (1 − β₂^t) the bias-corrected second moment after t updates (Cohen et al. 2022,
    "Adaptive gradient methods at the edge of stability", §2: Adam's update is
    θ ← θ − η·P⁻¹·m with m the bias-uncorrected first moment). Flat or shaped as v."""
    beta1, beta2 = betas
    t = max(int(step), 1)
    v_hat = exp_avg_sq.double() / (1.0 - beta2 ** t)
    return (1.0 - beta1 ** (t + 1)) * (v_hat.sqrt() + eps)


def preconditioned(matvec: MatVec, p_diag: torch.Tensor) -> MatVec:
    """v ↦ P^(-1/2)·H·P^(-1/2)·v: symmetric, with the eigenvalues of P⁻¹·H (similar
    matrices), so its top eigenvalue is the preconditioned sharpness λ_max(P⁻¹H)."""
    inv_sqrt = p_diag.double().rsqrt()

    def pmv(v: torch.Tensor) -> torch.Tensor:
        s = inv_sqrt.to(device=v.device, dtype=v.dtype)
        return s * matvec(s * v)

    return pmv


def adaptive_eos_threshold(lr: float, beta1: float) -> float:
    """The stability threshold of Adam with momentum β₁ and step η on a quadratic:
    λ_max(P⁻¹H) < (2 + 2β₁) / ((1 − β₁)·η)  (38/η for β₁ = 0.9; Cohen et al. 2022, eq. 2).
    NaN for a zero or non-finite learning rate."""
    if not (lr > 0 and math.isfinite(lr)):
        return math.nan
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
