"""Conventions: which OV matrices and which condition number a store holds.

`dynlab` (the default) analyses the OV circuit as the map it is — per head O_h·V_g(h) (d × d,
rank ≤ hd) and for the layer Σ_h O_h·V_g(h) — with rank bounds from the factorisation and a
numerical-zero tolerance in the condition number (analysis.components, analysis.metrics).

`pico` reproduces pico-analyze's matrices and formulas, so that its numbers (e.g. the study's
OV figures) can be put beside dynlab's:

* OV of weights, per head: V_g(h)·O_h (hd × hd, in that order); the layer: the heads'
  products concatenated along columns, [V_g(0)·O_0 | … | V_g(H−1)·O_{H−1}] (hd × H·hd).
* OV of gradients, per head: O_h·dV_g + dO_h·V_g as the d × d matrix it is, so PER is
  normalised by d and CN runs over all d singular values; the layer: the heads' gradient
  products concatenated along columns (d × H·d). Every gradient kind (`GRADIENT_KINDS`:
  the fixed batch's `grads`, pico-train's `val_gradients`, and the training batch's
  `train_grads`, its `train_gradients`) is built so: pico-analyze's OV component reads both
  splits with one code path. A head is the product [O_h | dO_h]·[dV_g ; V_g] of rank
  ≤ 2·hd: where 2·hd < d its singular values come from those factors (`components.LowRank`,
  padded with exact zeros to d), so its CN is +inf — the matrix is singular — where an SVD
  of the dense matrix reports rounding noise as σ_min (≈ 1e7 in pico-analyze's float32);
  and the layer's concatenation is then not formed for its spectrum either: its Gram matrix
  Σ_h L_h·(R_h·R_hᵀ)·L_hᵀ comes from the same factors (`components.Columns`).
* OV of updates (pico-analyze has none): the weights' convention at both steps,
  V^t_g·O^t_h − V^p_g·O^p_h per head and the concatenation of those for the layer.
* condition number: σ_max / σ_min over all min(m, n) singular values, with no tolerance
  (+inf only when σ_min is exactly 0).

Everything else (the projections, embeddings, QK circuit, LoRA products and every other
metric) is computed as in the default convention.
"""

from __future__ import annotations

import math

import torch

from dynlab.analysis import components as C
from dynlab.analysis.spectra import matmul
from dynlab.errors import InputError
from dynlab.runs.checkpoints import ModelSpec

CONVENTIONS: tuple[str, ...] = ("dynlab", "pico")

#: The kinds holding gradients, whose OV circuit is the product rule's O·dV + dO·V.
GRADIENT_KINDS: tuple[str, ...] = ("grads", "train_grads")


def check_convention(name: str) -> str:
    if name not in CONVENTIONS:
        raise InputError(f"--convention: expected one of {', '.join(CONVENTIONS)}, "
                         f"got {name!r}")
    return name


def condition_number_pico(sigma: torch.Tensor) -> torch.Tensor:
    """pico-analyze's κ = σ_max / σ_min over the k non-NaN singular values, no tolerance:
    +inf when σ_min = 0, NaN for an all-zero or all-NaN spectrum."""
    k = (~torch.isnan(sigma)).sum(-1)
    idx = (k - 1).clamp_min(0).unsqueeze(-1)
    smin = torch.gather(sigma, -1, idx).squeeze(-1)
    smax = sigma[..., 0]
    cn = torch.where(smin > 0, smax / smin, torch.full((), math.inf, dtype=sigma.dtype))
    bad = (k == 0) | ~(smax > 0)
    return torch.where(bad, torch.full((), math.nan, dtype=sigma.dtype), cn)


def _heads(o: torch.Tensor, v: torch.Tensor, spec: ModelSpec
           ) -> tuple[torch.Tensor, torch.Tensor]:
    return C.ov_head_factors(o.double(), v.double(), spec)


def _columns(heads: torch.Tensor) -> torch.Tensor:
    """The heads (..., H, m, n) side by side, [head_0 | … | head_{H−1}] (..., m, H·n)."""
    *lead, h, m, n = heads.shape
    return heads.movedim(-3, -2).reshape(*lead, m, h * n)


def pico_ov_weights(o: torch.Tensor, v: torch.Tensor, spec: ModelSpec
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head V_g·O_h (..., H, hd, hd), the layer's concatenation (..., hd, H·hd)) of
    o_proj, v_proj (..., of one layer or stacked layers)."""
    o_h, v_h = _heads(o, v, spec)
    heads = matmul(v_h, o_h)
    return heads, _columns(heads)


def pico_ov_grad_factors(o, v, do, dv, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The product rule's factors of every head's OV gradient, O_h·dV_g + dO_h·V_g =
    [O_h | dO_h]·[dV_g ; V_g]: (left (..., H, d, 2·hd), right (..., H, 2·hd, d)), float64."""
    o_h, v_h = _heads(o, v, spec)
    do_h, dv_h = _heads(do, dv, spec)
    return torch.cat([o_h, do_h], dim=-1), torch.cat([dv_h, v_h], dim=-2)


def product_frobenius(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """‖L·R‖_F of each product of a batch (..., m, r)·(..., r, n), float64, without forming
    it: ‖L·R‖_F² = tr(Lᵀ·L·R·Rᵀ) = Σ_ij (Lᵀ·L)_ij·(R·Rᵀ)_ij (both r × r and symmetric)."""
    ll = matmul(left.mT, left)
    rr = matmul(right, right.mT)
    return (ll * rr).sum(dim=(-2, -1)).clamp_min(0).sqrt()


def pico_ov_grads(o, v, do, dv, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head O_h·dV_g + dO_h·V_g (..., H, d, d), the layer's concatenation (..., d, H·d))."""
    left, right = pico_ov_grad_factors(o, v, do, dv, spec)
    heads = matmul(left, right)
    return heads, _columns(heads)


def apply(convention: str, kind: str, comps: dict[C.Site, C.Component], spec: ModelSpec,
          weights, grads=None, prev=None, select: C.Select = None) -> dict[C.Site, C.Component]:
    """The components of `kind` under `convention`: for `pico`, the OV entries (table "head"
    and the layer's `ov_circuit` cell) are replaced as the module docstring says. `grads`:
    the gradients of `kind` (for a gradient kind, `GRADIENT_KINDS`). `select`: only the
    layers of which it keeps the OV cell or a head are computed (None: every layer). The
    layers are computed together (stacked), each matrix product on its own, so a value does
    not depend on which other layers are computed."""
    if convention == "dynlab" or kind not in ("weights", "updates", *GRADIENT_KINDS):
        return comps
    out = dict(comps)
    ov = C.MATRICES.index("ov_circuit")
    ov_keys = ("attention.o_proj", "attention.v_proj")
    other = grads if kind in GRADIENT_KINDS else prev if kind == "updates" else weights
    layers = []
    for layer in range(spec.n_layers):
        if not (C.has(weights, layer, *ov_keys) and other is not None
                and C.has(other, layer, *ov_keys)):
            continue  # a source without these matrices: no OV cell, as in the default
        if select is not None and not (select(C.Site("layer", (layer, ov))) or any(
                select(C.Site("head", (layer, h))) for h in range(spec.n_heads))):
            continue  # left out of this selection (the caller keeps only what it selects)
        layers.append(layer)
    if not layers:
        return out

    def stacked(tensors, name: str) -> torch.Tensor:
        return torch.stack([C.weight(tensors, layer, name).double() for layer in layers])

    stored = [C.coarsest(C.weight(weights, layer, "attention.o_proj").dtype,
                         C.weight(weights, layer, "attention.v_proj").dtype) for layer in layers]
    o, v = stacked(weights, "attention.o_proj"), stacked(weights, "attention.v_proj")
    # a gradient head O_h·dV_g + dO_h·V_g has rank ≤ 2·hd: below d when 2·hd < d
    if kind in GRADIENT_KINDS and 2 * spec.head_dim < spec.d_model:
        left, right = pico_ov_grad_factors(o, v, stacked(grads, "attention.o_proj"),
                                           stacked(grads, "attention.v_proj"), spec)
        norms = product_frobenius(left, right).tolist()
        for i, layer in enumerate(layers):  # S of a head's tolerance: its ‖x‖_F
            # the layer's concatenation, its Gram matrix from these factors
            out[C.Site("layer", (layer, ov))] = C.Columns(left[i], right[i], stored[i])
            for h in range(spec.n_heads):
                out[C.Site("head", (layer, h))] = C.LowRank(left[i, h], right[i, h], stored[i],
                                                            full=True, norm=norms[i][h])
        return out
    if kind == "weights":
        heads, whole = pico_ov_weights(o, v, spec)
    elif kind in GRADIENT_KINDS:
        heads, whole = pico_ov_grads(o, v, stacked(grads, "attention.o_proj"),
                                     stacked(grads, "attention.v_proj"), spec)
    else:
        heads, whole = pico_ov_weights(o, v, spec)
        p_heads, p_whole = pico_ov_weights(stacked(prev, "attention.o_proj"),
                                           stacked(prev, "attention.v_proj"), spec)
        heads, whole = heads - p_heads, whole - p_whole
    for i, layer in enumerate(layers):
        out[C.Site("layer", (layer, ov))] = C.dense(whole[i], stored[i])
        for h in range(spec.n_heads):
            out[C.Site("head", (layer, h))] = C.dense(heads[i, h], stored[i])
    return out


def replaces(convention: str, kind: str, site: C.Site) -> bool:
    """Whether `apply` puts its own component at `site` of `kind` under `convention` (the
    pico convention's OV entries: every head and the layer's `ov_circuit` cell), so that the
    default one need not be built first."""
    if convention == "dynlab" or kind not in ("weights", "updates", *GRADIENT_KINDS):
        return False
    return site.table == "head" or (site.table == "layer"
                                    and site.index[1] == C.MATRICES.index("ov_circuit"))


def head_sv_size(convention: str, spec: ModelSpec) -> int:
    """Singular values a head's OV can have: d under pico (dense d × d gradients)."""
    return spec.d_model if convention == "pico" else min(spec.d_model, 2 * spec.head_dim)
