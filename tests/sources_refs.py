"""Independent float64 references (scipy) for the source tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg


def ref(w, k: int | None = None) -> dict[str, float]:
    """er, per, cn, spectral_norm, frobenius_norm of a matrix by scipy's float64 SVD; k is the
    rank bound (default min(m, n))."""
    w = np.asarray(w, dtype=np.float64)
    s = scipy.linalg.svdvals(w)
    k = k or min(w.shape)
    s = s[:k]
    p = s / s.sum()
    nz = p[p > 0]
    er = math.exp(-(nz * np.log(nz)).sum())
    tol = max(w.shape) * np.finfo(np.float64).eps * s[0]
    cn = math.inf if s[-1] <= tol else s[0] / s[-1]
    return {"er": er, "per": er / k, "cn": cn, "spectral_norm": s[0],
            "frobenius_norm": math.sqrt((s ** 2).sum())}


def check(ds, sel: dict, w, k: int | None = None, prefix: str = "",
          metrics=("per", "er", "spectral_norm", "frobenius_norm"), rel: float = 1e-6) -> None:
    """Every metric of the store cell `sel` equals the scipy reference of `w`."""
    r = ref(w, k)
    for m in metrics:
        got = float(ds[prefix + m].sel(**sel).values)
        assert got == pytest.approx(r[m], rel=rel), (m, sel, got, r[m])


def to64(t) -> np.ndarray:
    return t.detach().double().cpu().numpy()
