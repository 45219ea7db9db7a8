"""Independent numpy references shared by the tests (no dynlab code)."""

from __future__ import annotations

import numpy as np


def product_norm(left: np.ndarray, right: np.ndarray) -> float:
    """S of the product left·right of stored factors (m × k, k × n), written out with numpy's
    norms: (‖L‖_F‖R‖_2(1/√m + 1/√k) + ‖L‖_2‖R‖_F(1/√k + 1/√n)) / (1/√m + 1/√n)."""
    (m, k), n = left.shape, right.shape[1]
    lf, rf = np.linalg.norm(left), np.linalg.norm(right)
    l2, r2 = np.linalg.norm(left, 2), np.linalg.norm(right, 2)
    return float((lf * r2 * (m**-0.5 + k**-0.5) + l2 * rf * (k**-0.5 + n**-0.5))
                 / (m**-0.5 + n**-0.5))
