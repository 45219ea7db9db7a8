"""The update-to-weight ratio ‖W_t − W_prev‖_F / ‖W_prev‖_F of a matrix between two
checkpoints: the relative size of the step the optimiser took (e.g. Karpathy's "update:data
ratio"; ≈1e-3 per update is the usual rule of thumb for Adam). Between checkpoints k updates
apart it is the ratio of the accumulated change.
"""

from __future__ import annotations

import numpy as np
import torch


def update_ratio(w_prev: torch.Tensor, w_new: torch.Tensor) -> float:
    """‖W_new − W_prev‖_F / ‖W_prev‖_F in float64 (inf for a zero W_prev and a non-zero
    change; NaN for 0/0)."""
    a, b = w_prev.double(), w_new.double()
    num, den = float((b - a).norm()), float(a.norm())
    if den == 0:
        return float("inf") if num > 0 else float("nan")
    return num / den


def ratio_from_norms(update_norm: np.ndarray, weight_norm: np.ndarray) -> np.ndarray:
    """The ratio from stored norms: ‖ΔW‖_F / ‖W_prev‖_F elementwise (NaN where either is
    missing or the weight norm is 0)."""
    u = np.asarray(update_norm, dtype=np.float64)
    w = np.asarray(weight_norm, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(w > 0, u / np.where(w > 0, w, 1.0), np.nan)
