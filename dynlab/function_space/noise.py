"""The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An empirical
model of large-batch training", eq. 2.9): the batch size at which the gradient's noise is as
large as its signal, an estimate of the critical batch size.

Estimated, as in that paper's Appendix A.1, from the gradients of m micro-batches of b examples
each (b = B_small) and their mean (B_big = m·b), using E|G_B|² = |G|² + tr(Σ)/B:

    |G|² ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

with |G_small|² the mean over micro-batches of |g_j|² and |G_big|² = |mean_j g_j|². Both are
unbiased; their ratio is not (and |G|²'s estimate can be ≤ 0 when the noise dominates, giving
a negative or infinite B_simple, kept as computed). With b = 1 the two estimates are exactly
the unbiased sample covariance trace of the per-example gradients and |Ḡ|² − tr(Σ)/m.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseScale:
    """tr(Σ) and |G|² estimates (per example), and B_simple = tr(Σ) / |G|²."""

    trace_sigma: float
    grad_sq: float
    b_simple: float


def noise_scale(sq_small: float, sq_big: float, b_small: float, b_big: float) -> NoiseScale:
    """B_simple from |G_small|² (mean squared norm of gradients over B_small examples) and
    |G_big|² (squared norm of the gradient over B_big > B_small examples)."""
    if not b_big > b_small > 0:
        raise ValueError(f"noise_scale: need B_big > B_small > 0, got {b_big} and {b_small}")
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    s = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    b = s / g2 if g2 != 0 else (math.copysign(math.inf, s) if s else math.nan)
    return NoiseScale(float(s), float(g2), float(b))


def grouped_sq_norms(grads: Mapping[str, torch.Tensor], groups: Mapping[str, Sequence[str]]
                     ) -> dict[str, float]:
    """Σ of squared entries (float64) of the named gradients of each group."""
    return {g: float(sum(grads[n].double().pow(2).sum() for n in names))
            for g, names in groups.items()}


def micro_batch_noise(micro: Sequence[Mapping[str, torch.Tensor]], b_small: int,
                      groups: Mapping[str, Sequence[str]]) -> dict[str, NoiseScale]:
    """B_simple per group of parameters from the gradients of m ≥ 2 equal micro-batches of
    b_small examples each (each the gradient of the mean loss over its examples)."""
    m = len(micro)
    if m < 2:
        raise ValueError("the gradient noise scale needs at least two micro-batches")
    mean = {n: sum(g[n].double() for g in micro) / m for n in micro[0]}
    small = [grouped_sq_norms(g, groups) for g in micro]
    big = grouped_sq_norms(mean, groups)
    return {name: noise_scale(sum(s[name] for s in small) / m, big[name], b_small, b_small * m)
            for name in groups}
