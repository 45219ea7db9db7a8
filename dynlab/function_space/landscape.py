"""The loss along the straight line between two parameter vectors, and its barrier.

    θ(α) = (1 − α)·θ_a + α·θ_b,   α ∈ [0, 1]
    barrier = max_α [ L(θ(α)) − ((1 − α)·L(θ_a) + α·L(θ_b)) ]

(linear interpolation of Goodfellow et al. 2015, "Qualitatively characterizing neural
network optimization problems"; the barrier as in Frankle et al. 2020, "Linear mode
connectivity and the lottery ticket hypothesis"). A barrier near 0 says the two points sit in
one basin (linearly connected); a positive one, a ridge between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch


def alpha_grid(n: int = 11) -> np.ndarray:
    """n equally spaced α from 0 to 1 inclusive (n ≥ 2)."""
    if n < 2:
        raise ValueError(f"the α grid needs at least 2 points (0 and 1), got {n}")
    return np.linspace(0.0, 1.0, int(n))


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """θ(α) = (1 − α)·θ_a + α·θ_b for every named tensor (the two must have the same names
    and shapes), computed in float32 or wider."""
    if set(a) != set(b):
        raise ValueError("interpolate: the two parameter sets have different names "
                         f"({sorted(set(a) ^ set(b))[:4]})")
    out = {}
    for name, ta in a.items():
        tb = b[name]
        if ta.shape != tb.shape:
            raise ValueError(f"interpolate: {name} has shape {tuple(ta.shape)} and "
                             f"{tuple(tb.shape)}")
        dt = torch.promote_types(ta.dtype, torch.float32)
        out[name] = torch.lerp(ta.to(dt), tb.to(dt), float(alpha))
    return out


def line_losses(loss_at: Callable[[Mapping[str, torch.Tensor]], float],
                a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                alphas: Sequence[float]) -> np.ndarray:
    """L(θ(α)) for each α, `loss_at(params)` evaluating the loss at a named parameter set."""
    return np.asarray([float(loss_at(interpolate(a, b, al))) for al in alphas], dtype=np.float64)


def barrier(losses: Sequence[float], alphas: Sequence[float]) -> float:
    """max_α [L(α) − ((1 − α)·L(0) + α·L(1))] over the grid (which must start at α = 0 and end
    at α = 1, so the barrier is ≥ 0); NaN when any loss is not finite."""
    loss = np.asarray(losses, dtype=np.float64)
    al = np.asarray(alphas, dtype=np.float64)
    if loss.shape != al.shape or al.size < 2 or al[0] != 0.0 or al[-1] != 1.0:
        raise ValueError("barrier: the α grid must run from 0 to 1 with one loss per α")
    if not np.isfinite(loss).all():
        return math.nan
    chord = (1.0 - al) * loss[0] + al * loss[-1]
    return float(np.max(loss - chord))
