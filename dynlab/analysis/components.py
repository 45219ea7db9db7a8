"""Which matrices to analyse, for each kind: projections, OV circuits, LoRA products, updates.

Every component is a `Dense` matrix or a `LowRank` product left·right whose singular values are
taken without forming it. Components are keyed by a `Site`: a (layer, matrix) cell, a
(layer, head) cell of the per-head OV circuit, or an embedding.

OV circuit of head h (grouped-query attention, g(h) = h // (n_heads / n_kv_heads)):
    O_h = o_proj[:, h·hd:(h+1)·hd]      (d × hd)
    V_g = v_proj[g·hd:(g+1)·hd, :]      (hd × d)
    OV_h = O_h · V_g(h)                 (d × d, rank ≤ hd)
and the whole layer's OV = Σ_h OV_h = Σ_g (Σ_{h ∈ g} O_h)·V_g = O_sum·v_proj, a product of
rank ≤ n_kv_heads·hd (with grouped-query attention that is less than d_model).

QK circuit of head h (tables "qk_head" and "qk"):
    Q_h = q_proj[h·hd:(h+1)·hd, :]      (hd × d)
    K_g = k_proj[g·hd:(g+1)·hd, :]      (hd × d)
    QK_h = Q_hᵀ · K_g(h)                (d × d, rank ≤ hd)
the bilinear form of head h's attention score x_iᵀ·QK_h·x_j / √hd between the (normed)
residual streams of a query and a key. It is the position-free part of the score: RoPE
rotates Q_h·x_i and K_g·x_j by their positions, so the score at relative offset Δ is
x_iᵀ·Q_hᵀ·R(Δ)·K_g·x_j with a block rotation R(Δ) = R(0) = I at Δ = 0. The whole layer's QK is
Σ_h QK_h = Σ_g (Σ_{h ∈ g} Q_h)ᵀ·K_g = Q_sumᵀ·k_proj (rank ≤ n_kv_heads·hd), the analogue of
the layer's OV sum. Like OV, its gradient follows the product rule and its update is
QK_t − QK_prev, each a product of rank ≤ 2·hd per head.

Every component carries the precision its entries were stored in (`stored`: for a matrix
formed from stored tensors, the coarsest among its inputs); `eps` is that precision's machine
epsilon, which sets the numerical-zero tolerance of its spectrum
(`analysis.metrics.zero_tolerance`), together with `storage_norm`, the Frobenius norm S of the
stored inputs whose rounding noise it carries: ‖X‖_F for a stored matrix,
√(‖W_t‖_F² + ‖W_prev‖_F²) for a dense difference, `analysis.metrics.product_noise_norm` of the
factors for a product (`sum_of_products_norm` of the terms for a sum of products such as a
gradient or an update of the OV circuit). `max_rank` is the rank bound by construction:
min(m, n) for a dense matrix, the inner dimension for a product of factors.

ReLoRA updates within one cycle: a checkpoint stores W_eff = W + s·B·A (rounded to float32)
and the factors A, B. While the frozen base W is unchanged between two checkpoints,
    W_eff,t − W_eff,t−1 = s·(B_t·A_t − B_{t−1}·A_{t−1}) = [s·B_t, −s·B_{t−1}]·[A_t; A_{t−1}],
a product of inner dimension 2r whose singular values are computed exactly from the stored
factors (the dense difference would add the rounding of both W_eff). Across a reset (W
changed by the merge) the update is the dense difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from dynlab.runs.checkpoints import ModelSpec

LAYER_MATRICES: tuple[str, ...] = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "swiglu.w_0",
    "swiglu.w_1",
    "swiglu.w_2",
)
MATRICES: tuple[str, ...] = LAYER_MATRICES + ("ov_circuit",)
EMBEDDINGS: tuple[str, ...] = ("embedding_proj", "de_embedding_proj")
KINDS: tuple[str, ...] = ("weights", "grads", "updates", "lora", "train_grads")
#: Result tables: table -> (its sigma variable, the prefix of its metric variables, its dims
#: after (run, kind, step), its singular-value dim). "layer", "head" and "emb" are the
#: original tables; the QK tables were added later (a store made before them gets them on its
#: next analyze, see dynlab.analysis.store.add_missing_variables).
TABLES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "layer": ("sigma", "", ("layer", "matrix"), "sv"),
    "head": ("head_sigma", "head_", ("layer", "head"), "head_sv"),
    "emb": ("emb_sigma", "emb_", ("embedding",), "emb_sv"),
    "qk": ("qk_sigma", "qk_", ("layer",), "sv"),
    "qk_head": ("qk_head_sigma", "qk_head_", ("layer", "head"), "head_sv"),
}

Tensors = Mapping[str, torch.Tensor]


class Site(NamedTuple):
    """Where a component's results go: table "layer" (index (layer, matrix)), "head"
    (index (layer, head)), "emb" (index (embedding,)), "qk" (index (layer,)) or "qk_head"
    (index (layer, head)). A named tuple: a dict key hashed by the interpreter itself, for
    the thousands of sites of every checkpoint."""

    table: str
    index: tuple[int, ...]


def coarsest(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of largest machine epsilon (the least precise) among `dtypes`."""
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


class Sides:
    """The sides of a component's m × n `shape`; with `DenseBound`, the bounds of a matrix
    judged as dense."""

    shape: tuple[int, int]

    @property
    def max_dim(self) -> int:
        return max(self.shape)

    @property
    def min_dim(self) -> int:
        return min(self.shape)


class DenseBound(Sides):
    """Rank bound and `max_rank` min(m, n): nothing known of the matrix beyond its shape."""

    @property
    def rank_bound(self) -> int:
        return min(self.shape)

    @property
    def max_rank(self) -> int:
        return min(self.shape)


@dataclass(frozen=True)
class Dense(DenseBound):
    """A matrix given by its entries: x, or x − minus when `minus` is given (a difference of
    two stored tensors, formed in float64 only where it is used: `entries`, or block by block
    for its spectrum (`spectra.svdvals_of`), so an analysis never holds every update at
    once). `shape` is the
    true shape when `x` holds only its non-zero rows (singular values are then padded with
    zeros up to min(shape)). `stored`: the precision its entries (or the tensors they were
    formed from) were stored in; None means x's own dtype. `norm`: S, the Frobenius norm of
    the stored inputs it was formed from (√(‖W_t‖_F² + ‖W_prev‖_F²) for a difference); None
    means ‖x‖_F. `rows`: where x holds only some rows, which (a boolean mask over the
    true rows; the others are zero, or equal in both terms of a difference)."""

    x: torch.Tensor
    shape: tuple[int, int]
    stored: torch.dtype | None = None
    norm: float | None = None
    minus: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    @property
    def eps(self) -> float:
        return torch.finfo(self.stored or self.x.dtype).eps

    @property
    def storage_norm(self) -> float:
        """S of the zero tolerance: `norm`, or ‖x‖_F (the matrix is itself stored)."""
        return frobenius(self.x) if self.norm is None else self.norm

    def entries(self) -> torch.Tensor:
        """The matrix of `shape` (the dropped rows as zeros); a difference in float64."""
        x = self.x if self.minus is None else self.x.double() - self.minus.double()
        if self.rows is None:
            return x
        out = x.new_zeros(self.shape)
        out[self.rows] = x
        return out


@dataclass(frozen=True)
class LowRank(Sides):
    """The product left·right, left (m × r), right (r × n); rank ≤ max_rank = min(m, r, n).

    rank_bound, the length k of its spectrum, is max_rank, or min(m, n) when `full`: the
    spectrum is then padded with exact zeros, so the product is judged as the m × n matrix it
    stands for (rank max_rank of min(m, n)). `stored`: the coarsest precision among the
    stored tensors the factors come from; None means that of left and right. `norm`: S of the
    zero tolerance; None means `analysis.metrics.product_noise_norm` of the factors' Frobenius
    and spectral norms (each factor a stored tensor, a concatenation of stored tensors or, for the
    whole-layer OV circuit, a sum of stored head blocks); a `StoredProductNorm` is S taken when
    first asked."""

    left: torch.Tensor
    right: torch.Tensor
    stored: torch.dtype | None = None
    full: bool = False
    norm: float | StoredProductNorm | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def max_rank(self) -> int:
        return min(self.left.shape[0], self.left.shape[1], self.right.shape[1])

    @property
    def rank_bound(self) -> int:
        return min(self.shape) if self.full else self.max_rank

    @property
    def eps(self) -> float:
        return torch.finfo(self.stored or coarsest(self.left.dtype, self.right.dtype)).eps

    @property
    def storage_norm(self) -> float:
        """S of the zero tolerance (see the class docstring)."""
        if isinstance(self.norm, StoredProductNorm):
            return self.norm.value()
        if self.norm is not None:
            return self.norm
        return float(sum_of_products_norm((self.left, self.right)))

    def entries(self) -> torch.Tensor:
        from dynlab.analysis.spectra import matmul

        return matmul(self.left.double(), self.right.double())


@dataclass(frozen=True)
class Columns(DenseBound):
    """Products side by side, X = [L_0·R_0 | … | L_{H−1}·R_{H−1}] (m × H·n), with left
    (H, m, r) and right (H, r, n) and m ≤ H·n: judged as the dense matrix it is (rank bound
    and `max_rank` min(m, H·n)), but never formed for its spectrum — its Gram matrix
    X·Xᵀ = Σ_h L_h·(R_h·R_hᵀ)·L_hᵀ comes from the factors (`spectra.columns_grams`).
    `stored`: the coarsest precision of the stored tensors the factors come from. `norm`: S of
    the zero tolerance; None means ‖X‖_F, taken from the spectrum (as for a `Dense` matrix)."""

    left: torch.Tensor
    right: torch.Tensor
    stored: torch.dtype
    norm: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[-2], self.right.shape[0] * self.right.shape[-1])

    @property
    def eps(self) -> float:
        return torch.finfo(self.stored).eps

    @property
    def storage_norm(self) -> float:
        return frobenius(self.entries()) if self.norm is None else self.norm

    def entries(self) -> torch.Tensor:
        from dynlab.analysis.spectra import matmul

        products = matmul(self.left.double(), self.right.double())  # (H, m, n)
        h, m, n = products.shape
        return products.movedim(0, 1).reshape(m, h * n)


Component = Dense | LowRank | Columns


#: elements per block of `frobenius` (converted to float64 one block at a time, in the cache)
NORM_BLOCK = 1 << 16


def frobenius(x: torch.Tensor) -> float:
    """‖x‖_F, accumulated in float64 (on the CPU, float32 and float64 through numpy one
    block at a time: no float64 copy of x)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return float(torch.linalg.vector_norm(x, dtype=torch.float64))
    v = x.detach().reshape(-1).numpy()
    total = 0.0
    for a in range(0, v.shape[0], NORM_BLOCK):
        b = v[a:a + NORM_BLOCK].astype(np.float64)
        total += float(np.dot(b, b))
    return math.sqrt(total)


def difference_norm(cur: torch.Tensor, prev: torch.Tensor) -> float:
    """S of a difference of two stored tensors: √(‖cur‖_F² + ‖prev‖_F²) (their independent
    rounding errors add in quadrature)."""
    return math.hypot(frobenius(cur), frobenius(prev))


def rows_where(x: torch.Tensor, other: torch.Tensor | float) -> torch.Tensor:
    """Boolean mask of the rows of x with an entry that differs from `other` (a tensor of
    x's shape, or a number) or is not finite."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        a = x.detach().numpy()
        b = other.detach().numpy() if isinstance(other, torch.Tensor) else other
        return torch.from_numpy((a != b).any(axis=1) | ~np.isfinite(a).all(axis=1))
    return (x.ne(other) | ~torch.isfinite(x)).any(dim=1)


def dense(x: torch.Tensor, stored: torch.dtype | None = None, norm: float | None = None) -> Dense:
    """A Dense component; `norm` (S of the zero tolerance) None means ‖x‖_F (which the
    analysis takes from the spectrum: ‖x‖_F² = Σσ_i²)."""
    return Dense(x, (x.shape[0], x.shape[1]), stored, norm)


def drop_zero_rows(
    x: torch.Tensor, stored: torch.dtype | None = None, norm: float | None = None
) -> Dense:
    """The same singular values from fewer rows: all-zero rows (e.g. the embedding gradient
    of tokens absent from the batch) contribute nothing to σ (nor to ‖x‖_F)."""
    nonzero = rows_where(x, 0.0)
    if bool(nonzero.all()):
        return dense(x, stored, norm)
    return Dense(x[nonzero], (x.shape[0], x.shape[1]), stored, norm, rows=nonzero)


def difference(cur: torch.Tensor, prev: torch.Tensor) -> Dense:
    """cur − prev of two stored tensors, formed lazily (`Dense.minus`), rows equal in both
    dropped (they contribute nothing to σ): stored precision the coarser of the two, S =
    `difference_norm`."""
    stored, norm = coarsest(cur.dtype, prev.dtype), difference_norm(cur, prev)
    changed = rows_where(cur, prev)
    changed[0] = True  # at least one row: an unchanged matrix is the zero matrix, σ = 0
    if bool(changed.all()):
        return Dense(cur, (cur.shape[0], cur.shape[1]), stored, norm, prev)
    return Dense(cur[changed], (cur.shape[0], cur.shape[1]), stored, norm, prev[changed],
                 rows=changed)


def weight(tensors: Tensors, layer: int, matrix: str) -> torch.Tensor:
    return tensors[f"layers.{layer}.{matrix}.weight"]


def has(tensors: Tensors, layer: int, *matrices: str) -> bool:
    """Whether every one of `matrices` of `layer` is present. Architectures without a matrix
    (GPT-NeoX and GPT-2 have no MLP gate `swiglu.w_0`) and sources that hold only some
    gradients (pico-train's learning-dynamics files) leave those cells NaN."""
    return all(f"layers.{layer}.{m}.weight" in tensors for m in matrices)


def ov_head_factors(
    o_proj: torch.Tensor, v_proj: torch.Tensor, spec: ModelSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O_h for all heads (..., H, d, hd), V_g(h) for all heads (..., H, hd, d)) of o_proj
    (..., d, H·hd) and v_proj (..., kv·hd, d), with any leading (layer) dims."""
    h, kv, hd, d = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model
    o_heads = o_proj.reshape(*o_proj.shape[:-2], d, h, hd).movedim(-2, -3)
    v_groups = v_proj.reshape(*v_proj.shape[:-2], kv, hd, d)
    v_heads = v_groups.repeat_interleave(h // kv, dim=-3)
    return o_heads, v_heads


def ov_whole_factors(
    o_proj: torch.Tensor, v_proj: torch.Tensor, spec: ModelSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-layer OV = O_sum·v_proj, with O_sum[:, g·hd:(g+1)·hd] = Σ_{h ∈ group g} O_h
    (d × n_kv·hd) and v_proj (n_kv·hd × d), in float64."""
    h, kv, hd, d = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model
    o_sum = o_proj.double().reshape(d, kv, h // kv, hd).sum(dim=2).reshape(d, kv * hd)
    return o_sum, v_proj.double()


def qk_head_factors(
    q_proj: torch.Tensor, k_proj: torch.Tensor, spec: ModelSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_hᵀ for all heads (H, d, hd), K_g(h) for all heads (H, hd, d))."""
    h, kv, hd, d = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model
    q_heads = q_proj.reshape(h, hd, d).mT
    k_heads = k_proj.reshape(kv, hd, d).repeat_interleave(h // kv, dim=0)
    return q_heads, k_heads


def qk_whole_factors(
    q_proj: torch.Tensor, k_proj: torch.Tensor, spec: ModelSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-layer QK = Q_sumᵀ·k_proj, with Q_sum[g·hd:(g+1)·hd, :] = Σ_{h ∈ group g} Q_h
    (n_kv·hd × d), as (Q_sumᵀ (d × n_kv·hd), k_proj (n_kv·hd × d)) in float64."""
    h, kv, hd, d = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model
    q_sum = q_proj.double().reshape(kv, h // kv, hd, d).sum(dim=1).reshape(kv * hd, d)
    return q_sum.mT, k_proj.double()


@dataclass(frozen=True)
class Circuit:
    """A bilinear circuit of two projections of a layer, L·R: OV (L from o_proj, R from
    v_proj) or QK (L from q_proj transposed, R from k_proj), per head and for the whole
    layer. `head_factors(first, second, spec)` gives (L_h (H, d, hd), R_h (H, hd, d));
    `whole_factors(first, second, spec)` the layer's (L_sum, R) in float64; `layer_site` and
    `head_site` where their components go."""

    first: str
    second: str
    head_factors: Callable[[torch.Tensor, torch.Tensor, ModelSpec],
                           tuple[torch.Tensor, torch.Tensor]]
    whole_factors: Callable[[torch.Tensor, torch.Tensor, ModelSpec],
                            tuple[torch.Tensor, torch.Tensor]]
    layer_site: Callable[[int], Site]
    head_table: str


OV = Circuit("attention.o_proj", "attention.v_proj", ov_head_factors, ov_whole_factors,
             lambda layer: Site("layer", (layer, MATRICES.index("ov_circuit"))), "head")
QK = Circuit("attention.q_proj", "attention.k_proj", qk_head_factors, qk_whole_factors,
             lambda layer: Site("qk", (layer,)), "qk_head")

#: a sum of products Σ_j sign_j·L_j·R_j: per term, the tensors that L_j's projection comes
#: from, those that R_j's comes from, and the sign
Terms = Sequence[tuple[Tensors, Tensors, float]]


#: which components to build: a predicate on sites (dynlab.analysis.selection.Cells.wants);
#: None builds every one
Select = Callable[[Site], bool] | None


def _every(site: Site) -> bool:
    return True


def circuit_components(circuit: Circuit, spec: ModelSpec, terms: Terms,
                       select: Select = None) -> dict[Site, Component]:
    """The circuit's components (layer and heads) of the sum of products Σ_j sign_j·L_j·R_j,
    L_j built from `circuit.first` of terms[j][0] and R_j from `circuit.second` of
    terms[j][1]: the concatenated product [sign_1·L_1, …]·[R_1; …] (rank ≤ Σ_j inner dims).
    One term: the weights' circuit L·R, S from the factors (`LowRank`); several: S =
    `sum_of_products_norm` of the terms. Layers missing a projection in any term are
    skipped, and so are layers whose circuit `select` leaves out.

    weights: [(w, w, 1)]; gradient by the product rule d(L·R) = L·dR + dL·R:
    [(w, g, 1), (g, w, 1)]; update L_t·R_t − L_prev·R_prev: [(w, w, 1), (w_prev, w_prev, −1)].
    """
    out: dict[Site, Component] = {}
    pair = (circuit.first, circuit.second)
    want = select or _every
    layers = [layer for layer in range(spec.n_layers) if want(circuit.layer_site(layer))
              and all(has(t, layer, *pair) for lt, rt, _ in terms for t in (lt, rt))]
    if not layers:
        return out
    # per term, every layer's factors stacked: (layers, …) whole-layer and (layers, H, …) heads
    whole, heads = [], []
    for lt, rt, _ in terms:
        firsts = [weight(lt, layer, circuit.first) for layer in layers]
        seconds = [weight(rt, layer, circuit.second) for layer in layers]
        w_pairs = [circuit.whole_factors(f, s, spec) for f, s in zip(firsts, seconds,
                                                                      strict=True)]
        h_pairs = [circuit.head_factors(f.double(), s.double(), spec)
                   for f, s in zip(firsts, seconds, strict=True)]
        whole.append((torch.stack([p[0] for p in w_pairs]), torch.stack([p[1] for p in w_pairs])))
        heads.append((torch.stack([p[0] for p in h_pairs]), torch.stack([p[1] for p in h_pairs])))
    if whole_factors_stored(spec):  # S when asked: σ_1 from the layer's own spectra
        whole_norms = [stored_product_norm(whole, li, [
            (weight(lt, layer, circuit.first), weight(rt, layer, circuit.second))
            for lt, rt, _ in terms]) for li, layer in enumerate(layers)]
    else:
        whole_norms = [float(s) for s in sum_of_products_norm(*whole)]  # (layers,)
    head_norms = sum_of_products_norm(*heads)  # (layers, H)
    signs = [sign for _, _, sign in terms]
    w_left = torch.cat([_signed(lw, sign) for (lw, _), sign in zip(whole, signs, strict=True)],
                       dim=-1)
    w_right = torch.cat([rw for _, rw in whole], dim=-2)
    h_left = torch.cat([_signed(lh, sign) for (lh, _), sign in zip(heads, signs, strict=True)],
                       dim=-1)
    h_right = torch.cat([rh for _, rh in heads], dim=-2)
    for li, layer in enumerate(layers):
        stored = coarsest(*(weight(t, layer, name).dtype for lt, rt, _ in terms
                            for t, name in ((lt, circuit.first), (rt, circuit.second))))
        out[circuit.layer_site(layer)] = LowRank(w_left[li], w_right[li], stored,
                                                 norm=whole_norms[li])
        for head in range(h_left.shape[1]):
            out[Site(circuit.head_table, (layer, head))] = LowRank(
                h_left[li, head], h_right[li, head], stored, norm=float(head_norms[li, head]))
    return out


def _signed(x: torch.Tensor, sign: float) -> torch.Tensor:
    return x if sign > 0 else -x


def sum_of_products_norm(*terms: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """S of Σ_j L_j·R_j formed from stored factors (each L_j (…, m, k_j), R_j (…, k_j, n),
    with any leading batch dims): Σ_j `analysis.metrics.product_noise_norm` of the pair, since
    the rounding errors of the terms add (‖Σ_j E_j‖_2 ≤ Σ_j ‖E_j‖_2). Taking the terms
    apart, rather than the product of the concatenated factors [L_1, L_2]·[R_1; R_2], keeps
    the rounding of a large factor paired only with what it multiplies: in the gradient
    O·dV + dO·V the rounding of O meets dV, never V."""
    from dynlab.analysis.metrics import product_noise_norm

    total = torch.zeros((), dtype=torch.float64)
    for left, right in terms:
        (m, k), n = left.shape[-2:], right.shape[-1]
        ln = torch.linalg.vector_norm(left, dim=(-2, -1), dtype=torch.float64).cpu()
        rn = torch.linalg.vector_norm(right, dim=(-2, -1), dtype=torch.float64).cpu()
        total = total + product_noise_norm(ln, rn, m, k, n, spectral_norms(left),
                                           spectral_norms(right))
    return total


#: shorter side from which `spectral_norms` are remembered
MEMO_MIN_SIDE = 128


def spectral_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x‖_2 of each matrix of a batch (…, a, b), in float64 on the CPU: √λ_max of the Gram
    matrix of the shorter side (σ_1 is accurate on the Gram route whatever κ). NaN for a
    matrix holding NaN/Inf (its metrics are NaN). Remembered by content (`memo.remembered`):
    the factors of the weights' circuits come back in the updates of this checkpoint and the
    next one."""
    from dynlab.analysis.memo import remembered

    if min(x.shape[-2:]) <= MEMO_MIN_SIDE:  # cheaper to compute than to hash
        return _spectral_norms(x)
    return remembered(_spectral_norms, x)


#: the projections whose stored matrices are the whole-layer circuits' factors
CIRCUIT_PROJECTIONS = ("attention.o_proj", "attention.v_proj", "attention.q_proj",
                       "attention.k_proj")


def whole_factors_stored(spec: ModelSpec) -> bool:
    """Whether the whole-layer circuits' factors are the stored projections themselves (up to a
    float64 copy and, for QK, a transposition): multi-head attention, where each key/value
    group holds one head and O_sum = o_proj, Q_sum = q_proj (`ov_whole_factors`,
    `qk_whole_factors`), and the factors are large enough for `spectral_norms` to remember
    them."""
    return (spec.n_kv_heads == spec.n_heads
            and min(spec.d_model, spec.n_heads * spec.head_dim) > MEMO_MIN_SIDE)


@dataclass(frozen=True)
class StoredProductNorm:
    """S of a sum of products Σ_j L_j·R_j (`sum_of_products_norm`) whose factors are stored
    matrices up to a float64 copy or a transposition, with the factors' spectral norms taken
    when `value()` is first asked: by then the checkpoint's spectra have recorded the σ_1 of
    its stored projections (`record_spectral_norms`), so none is computed twice.
    terms: per term (‖L_j‖_F, ‖R_j‖_F, (m, k, n), the stored matrix of L_j, that of R_j)."""

    terms: tuple[tuple[float, float, tuple[int, int, int], torch.Tensor, torch.Tensor], ...]

    def value(self) -> float:
        from dynlab.analysis.metrics import product_noise_norm

        total = 0.0
        for ln, rn, (m, k, n), left, right in self.terms:
            total += product_noise_norm(ln, rn, m, k, n, float(spectral_norms(left)),
                                        float(spectral_norms(right)))
        return total


def stored_product_norm(terms: Sequence[tuple[torch.Tensor, torch.Tensor]], index: int,
                        stored: Sequence[tuple[torch.Tensor, torch.Tensor]]
                        ) -> StoredProductNorm:
    """The `StoredProductNorm` of matrix `index` of stacked factors `terms` (per term
    (L (…, m, k), R (…, k, n))), whose stored matrices are `stored` (per term (of L, of R))."""
    parts = []
    for (left, right), (sl, sr) in zip(terms, stored, strict=True):
        (m, k), n = left.shape[-2:], right.shape[-1]
        ln = torch.linalg.vector_norm(left[index], dtype=torch.float64)
        rn = torch.linalg.vector_norm(right[index], dtype=torch.float64)
        parts.append((float(ln), float(rn), (m, k, n), sl, sr))
    return StoredProductNorm(tuple(parts))


def record_spectral_norms(comps: Mapping[Site, Component], sigmas: Mapping[Site, torch.Tensor]
                          ) -> None:
    """Offer to `spectral_norms`' memory σ_1 of each whole stored circuit projection among
    `comps` (a `Dense` of the stored tensor itself, large enough to be remembered), taken from
    its singular values `sigmas[site]` (computed in float64): the whole-layer circuits of this
    checkpoint, its gradients' and the next checkpoint's updates then find it
    (`StoredProductNorm`)."""
    from dynlab.analysis.memo import offer

    wanted = {MATRICES.index(name) for name in CIRCUIT_PROJECTIONS}
    for site, comp in comps.items():
        if (site.table == "layer" and site.index[1] in wanted and isinstance(comp, Dense)
                and comp.minus is None and comp.rows is None
                and min(comp.x.shape) > MEMO_MIN_SIDE and site in sigmas):
            s = sigmas[site]
            offer(_spectral_norms, comp.x, s[0].to(device="cpu", dtype=torch.float64).clone())


def _spectral_norms(x: torch.Tensor) -> torch.Tensor:
    from dynlab.analysis.spectra import eigvalsh, finite_matrices

    x = x.to(torch.float64)
    finite = finite_matrices(x)
    if not bool(finite.all()):
        x = torch.where(finite[..., None, None], x, torch.zeros((), dtype=x.dtype))
    gram = x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x
    norms = eigvalsh(gram)[..., -1].clamp_min(0).sqrt()
    return torch.where(finite, norms, torch.full((), math.nan, dtype=norms.dtype)).cpu()


def weight_components(w: Tensors, spec: ModelSpec, select: Select = None
                      ) -> dict[Site, Component]:
    """Each layer's projections, its whole-layer OV circuit (rank ≤ n_kv·hd), each head's
    OV_h (rank ≤ hd), the embeddings, and the QK circuits (layer and heads); only the sites
    `select` keeps."""
    out: dict[Site, Component] = {}
    want = select or _every
    ov = circuit_components(OV, spec, [(w, w, 1.0)], want)
    for layer in range(spec.n_layers):
        for j, name in enumerate(LAYER_MATRICES):
            if has(w, layer, name) and want(Site("layer", (layer, j))):
                out[Site("layer", (layer, j))] = dense(weight(w, layer, name))
        out.update(_layer_items(ov, layer))
    for e, name in enumerate(EMBEDDINGS):
        if f"{name}.weight" in w and want(Site("emb", (e,))):
            out[Site("emb", (e,))] = drop_zero_rows(w[f"{name}.weight"])
    out.update(circuit_components(QK, spec, [(w, w, 1.0)], want))
    return out


def grad_components(g: Tensors, w: Tensors, spec: ModelSpec, select: Select = None
                    ) -> dict[Site, Component]:
    """Gradients of every matrix; OV by the product rule d(O·V) = O·dV + dO·V: per head the
    rank-≤2hd product [O_h, dO_h]·[dV_g; V_g], for the layer [O_sum, dO_sum]·[dV; V]."""
    out: dict[Site, Component] = {}
    want = select or _every
    product_rule = [(w, g, 1.0), (g, w, 1.0)]
    ov = circuit_components(OV, spec, product_rule, want)
    for layer in range(spec.n_layers):
        for j, name in enumerate(LAYER_MATRICES):
            if has(g, layer, name) and want(Site("layer", (layer, j))):
                out[Site("layer", (layer, j))] = dense(weight(g, layer, name))
        out.update(_layer_items(ov, layer))
    for e, name in enumerate(EMBEDDINGS):
        if f"{name}.weight" in g and want(Site("emb", (e,))):
            out[Site("emb", (e,))] = drop_zero_rows(g[f"{name}.weight"])
    out.update(circuit_components(QK, spec, product_rule, want))
    return out


def lora_keys(layer: int, matrix: str) -> tuple[str, str]:
    """The checkpoint names of a wrapped matrix's factors A (r × in) and B (out × r)."""
    return f"layers.{layer}.{matrix}.lora_A", f"layers.{layer}.{matrix}.lora_B"


def base_unchanged(
    w_eff: torch.Tensor, w_eff_prev: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor],
    factors_prev: tuple[torch.Tensor, torch.Tensor], scale: float,
) -> bool:
    """Whether the frozen base W = W_eff − s·B·A is the same in two checkpoints, up to the
    rounding of the stored W_eff = fl(W + fl(s·B·A)).

    With R = (W_eff,t − W_eff,t−1) − s·(B_t·A_t − B_{t−1}·A_{t−1}) (float64) and eps the
    coarsest storage precision, the base is unchanged when for every entry
        |R_ij| ≤ eps·(|W_eff,t| + |W_eff,t−1|)_ij
                 + (r + 2)·eps·s·(|B_t|·|A_t| + |B_{t−1}|·|A_{t−1}|)_ij,
    the rounding bound of both W_eff (one rounding of the sum, and the r-term product and
    scaling: Higham, Accuracy and Stability of Numerical Algorithms, §3.5) with a factor 2
    of slack (eps = 2u). A reset in between changes W by the merged s·B·A, far above it."""
    (a, b), (pa, pb) = factors, factors_prev
    eps = torch.finfo(coarsest(w_eff.dtype, w_eff_prev.dtype, a.dtype, b.dtype, pa.dtype,
                               pb.dtype)).eps
    w, pw = w_eff.double(), w_eff_prev.double()
    a, b, pa, pb = a.double(), b.double(), pa.double(), pb.double()
    resid = (w - pw) - scale * (b @ a - pb @ pa)
    bound = eps * (w.abs() + pw.abs()) + (a.shape[0] + 2) * eps * abs(scale) * (
        b.abs() @ a.abs() + pb.abs() @ pa.abs())
    return bool((resid.abs() <= bound).all())


def relora_update(
    w: Tensors, w_prev: Tensors, layer: int, matrix: str, scale: float
) -> LowRank | None:
    """The within-cycle update s·(B_t·A_t − B_{t−1}·A_{t−1}) of a wrapped matrix as the
    product [s·B_t, −s·B_{t−1}]·[A_t; A_{t−1}] (rank ≤ 2r, judged as the full m × n matrix),
    or None where the factors are missing or the base W changed (a reset in between)."""
    a_key, b_key = lora_keys(layer, matrix)
    if not all(k in t for t in (w, w_prev) for k in (a_key, b_key)):
        return None
    factors, prev = (w[a_key], w[b_key]), (w_prev[a_key], w_prev[b_key])
    if not base_unchanged(weight(w, layer, matrix), weight(w_prev, layer, matrix), factors,
                          prev, scale):
        return None
    stored = coarsest(*(x.dtype for x in (*factors, *prev)))
    left = torch.cat([scale * factors[1].double(), -scale * prev[1].double()], dim=1)
    right = torch.cat([factors[0].double(), prev[0].double()], dim=0)
    r = factors[1].shape[1]
    norm = sum_of_products_norm((left[:, :r], right[:r]), (left[:, r:], right[r:]))
    return LowRank(left, right, stored, full=True, norm=float(norm))


def update_components(
    w: Tensors, w_prev: Tensors, spec: ModelSpec, scale: float | None = None,
    select: Select = None,
) -> dict[Site, Component]:
    """Updates W_t − W_prev; OV_t − OV_prev as [O^t, −O^prev]·[V^t; V^prev] (per head and for
    the layer). With `scale` (a relora run's s = alpha/r), a wrapped matrix whose base W is
    unchanged between the two checkpoints gets its update from the factors (`relora_update`);
    otherwise, and across a reset, the update is the dense float64 difference of the stored
    tensors, whose zero tolerance counts the rounding of both (S = √(‖W_t‖_F² + ‖W_prev‖_F²)).
    """
    out: dict[Site, Component] = {}
    want = select or _every
    difference_terms = [(w, w, 1.0), (w_prev, w_prev, -1.0)]
    ov = circuit_components(OV, spec, difference_terms, want)
    for layer in range(spec.n_layers):
        for j, name in enumerate(LAYER_MATRICES):
            if not (has(w, layer, name) and has(w_prev, layer, name)
                    and want(Site("layer", (layer, j)))):
                continue
            comp = relora_update(w, w_prev, layer, name, scale) if scale is not None else None
            if comp is None:
                comp = difference(weight(w, layer, name), weight(w_prev, layer, name))
            out[Site("layer", (layer, j))] = comp
        out.update(_layer_items(ov, layer))
    for e, name in enumerate(EMBEDDINGS):
        key = f"{name}.weight"
        if key not in w or key not in w_prev or not want(Site("emb", (e,))):
            continue
        out[Site("emb", (e,))] = difference(w[key], w_prev[key])
    out.update(circuit_components(QK, spec, difference_terms, want))
    return out


def _layer_items(comps: Mapping[Site, Component], layer: int) -> dict[Site, Component]:
    """The components of one layer (insertion order kept: the layer's OV, then its heads)."""
    return {site: c for site, c in comps.items() if site.index[0] == layer}


def lora_components(w: Tensors, spec: ModelSpec, scale: float, select: Select = None
                    ) -> dict[Site, Component]:
    """s·B·A of every wrapped module (relora runs), as the product (s·B)·A (rank ≤ r)."""
    out: dict[Site, Component] = {}
    want = select or _every
    for layer in range(spec.n_layers):
        for j, name in enumerate(LAYER_MATRICES):
            a_key, b_key = lora_keys(layer, name)
            if a_key in w and b_key in w and want(Site("layer", (layer, j))):
                stored = coarsest(w[a_key].dtype, w[b_key].dtype)
                out[Site("layer", (layer, j))] = LowRank(scale * w[b_key].double(), w[a_key],
                                                         stored)
    return out
