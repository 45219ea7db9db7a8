"""Conventions: which OV matrices and which condition number a store holds.

`dynlab` (the default) analyses the OV circuit as the map it is — per head O_h·V_g(h) (d × d,
rank ≤ hd) and for the layer Σ_h O_h·V_g(h) — with rank bounds from the factorisation and a
numerical-zero tolerance in the condition number (analysis.components, analysis.metrics).

`pico` reproduces pico-analyze's matrices and formulas, so that its numbers (e.g. the study's
OV figures) can be put beside dynlab's:

* OV of weights, per head: V_g(h)·O_h (hd × hd, in that order); the layer: the heads'
  products concatenated along columns, [V_g(0)·O_0 | … | V_g(H−1)·O_{H−1}] (hd × H·hd).
* OV of gradients, per head: O_h·dV_g + dO_h·V_g as a dense d × d matrix, so PER is
  normalised by d and CN runs over all d singular values; the layer: the heads' gradient
  products concatenated along columns (d × H·d). Every gradient kind (`GRADIENT_KINDS`: the
  fixed batch's `grads`, pico-train's `val_gradients`, and the training batch's
  `train_grads`, its `train_gradients`) is built so: pico-analyze's OV component reads both
  splits with one code path.
* OV of updates (pico-analyze has none): the weights' convention at both steps,
  V^t_g·O^t_h − V^p_g·O^p_h per head and the concatenation of those for the layer.
* condition number: σ_max / σ_min over all min(m, n) singular values, with no tolerance
  (+inf only when σ_min is exactly 0).

Everything else (the projections, embeddings, QK circuit, LoRA products and every other
metric) is computed as in the default convention.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dynlab.analysis import components as C
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


def pico_ov_weights(o: torch.Tensor, v: torch.Tensor, spec: ModelSpec
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head V_g·O_h (H, hd, hd), the layer's concatenation (hd, H·hd))."""
    o_h, v_h = _heads(o, v, spec)
    heads = v_h @ o_h
    return heads, torch.cat(list(heads), dim=1)


def pico_ov_grads(o, v, do, dv, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head O_h·dV_g + dO_h·V_g (H, d, d), the layer's concatenation (d, H·d))."""
    o_h, v_h = _heads(o, v, spec)
    do_h, dv_h = _heads(do, dv, spec)
    heads = o_h @ dv_h + do_h @ v_h
    return heads, torch.cat(list(heads), dim=1)


def apply(convention: str, kind: str, comps: dict[C.Site, C.Component], spec: ModelSpec,
          weights, grads=None, prev=None, select: C.Select = None) -> dict[C.Site, C.Component]:
    """The components of `kind` under `convention`: for `pico`, the OV entries (table "head"
    and the layer's `ov_circuit` cell) are replaced as the module docstring says. `grads`:
    the gradients of `kind` (for a gradient kind, `GRADIENT_KINDS`). `select`: only the
    layers of which it keeps the OV cell or a head are computed (None: every layer)."""
    if convention == "dynlab" or kind not in ("weights", "updates", *GRADIENT_KINDS):
        return comps
    out = dict(comps)
    ov = C.MATRICES.index("ov_circuit")
    ov_keys = ("attention.o_proj", "attention.v_proj")
    for layer in range(spec.n_layers):
        other = grads if kind in GRADIENT_KINDS else prev if kind == "updates" else weights
        if not (C.has(weights, layer, *ov_keys) and other is not None
                and C.has(other, layer, *ov_keys)):
            continue  # a source without these matrices: no OV cell, as in the default
        if select is not None and not (select(C.Site("layer", (layer, ov))) or any(
                select(C.Site("head", (layer, h))) for h in range(spec.n_heads))):
            continue  # left out of this selection (the caller keeps only what it selects)
        o, v = C.weight(weights, layer, "attention.o_proj"), C.weight(weights, layer,
                                                                      "attention.v_proj")
        stored = C.coarsest(o.dtype, v.dtype)
        if kind == "weights":
            heads, whole = pico_ov_weights(o, v, spec)
        elif kind in GRADIENT_KINDS:
            heads, whole = pico_ov_grads(o, v, C.weight(grads, layer, "attention.o_proj"),
                                         C.weight(grads, layer, "attention.v_proj"), spec)
        else:
            heads, whole = pico_ov_weights(o, v, spec)
            p_heads, p_whole = pico_ov_weights(C.weight(prev, layer, "attention.o_proj"),
                                               C.weight(prev, layer, "attention.v_proj"), spec)
            heads, whole = heads - p_heads, whole - p_whole
        out[C.Site("layer", (layer, ov))] = C.dense(whole, stored)
        # a gradient head O_h·dV_g + dO_h·V_g has rank ≤ 2·hd: below d when 2·hd < d
        deficient = kind in GRADIENT_KINDS and 2 * spec.head_dim < spec.d_model
        for h in range(spec.n_heads):
            out[C.Site("head", (layer, h))] = dataclasses.replace(
                C.dense(heads[h], stored), deficient=deficient)
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
