"""What to analyse: a selection of steps, layers and matrices, and the store cells it covers.

Three comma lists, the same on `dynlab analyze` (`--steps`, `--layers`, `--matrices`) and in
`dynlab.analyze(steps=, layers=, matrices=)`:

    steps      N (a step), A:B (every checkpoint with A <= step <= B), A:B:K (A, A+K, ... up
               to B inclusive), last (each run's last checkpoint)
    layers     N, A:B, A:B:K (inclusive, as for steps), last (the deepest layer)
    matrices   names or shell globs (fnmatch) over MATRIX_NAMES: the projections
               (attention.q_proj ... swiglu.w_2), the circuits ov_circuit and qk_circuit
               (each with its per-head circuits), and the embeddings embedding_proj,
               de_embedding_proj. --layers does not apply to the embeddings (they belong to
               no layer): leave them out with --matrices.

Cells: the unit the store records as analysed, per (run, step): one (layer, matrix) cell of
the layer table (its `ov_circuit` column stands for the layer's OV circuit and its heads), one
layer of the QK circuit (with its heads), one embedding (`Cells`). Every kind (weights,
grads, updates, ...) of a selected cell is computed. Nothing here reads tensors or a store.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dynlab.analysis.components import EMBEDDINGS, LAYER_MATRICES, MATRICES, OV, QK, Site
from dynlab.errors import InputError

#: every name --matrices accepts, in store order
MATRIX_NAMES: tuple[str, ...] = LAYER_MATRICES + ("ov_circuit", "qk_circuit") + EMBEDDINGS
OV_COLUMN = MATRICES.index("ov_circuit")


class SelectionError(InputError):
    """A selection that names nothing, or something the runs do not have (exit 2)."""


def describe(values: Sequence[int], limit: int = 8) -> str:
    """'0, 1, 2' or, for a long list, '0, 1000, 2000, ..., 19000 (20 in all)'."""
    values = list(values)
    if len(values) <= limit:
        return ", ".join(str(v) for v in values)
    head = ", ".join(str(v) for v in values[:3])
    return f"{head}, ..., {values[-1]} ({len(values)} in all)"


def _items(flag: str, spec: str | Sequence | int) -> list[str]:
    if isinstance(spec, int):
        return [str(spec)]
    parts = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    items = [p.strip() for p in parts if p.strip()]
    if not items:
        raise SelectionError(f"{flag} {spec!r}: expected a comma list")
    return items


def _int(flag: str, item: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SelectionError(f"{flag} {item!r}: expected N, A:B, A:B:K or last "
                             "(integers)") from None
    if value < 0:
        raise SelectionError(f"{flag} {item!r}: expected non-negative integers")
    return value


@dataclass(frozen=True)
class Ranges:
    """A parsed step or layer list: single values, ranges (a, b, k) and `last`."""

    values: tuple[int, ...] = ()
    ranges: tuple[tuple[int, int, int], ...] = ()
    last: bool = False

    def matches(self, value: int) -> bool:
        return value in self.values or any(a <= value <= b and (value - a) % k == 0
                                           for a, b, k in self.ranges)


def parse_ranges(flag: str, spec: str | Sequence | int) -> Ranges:
    """N, A:B, A:B:K (A <= B, K >= 1; inclusive of B) and `last`, comma separated."""
    values, ranges, last = [], [], False
    for item in _items(flag, spec):
        if item == "last":
            last = True
        elif ":" in item:
            parts = item.split(":")
            if len(parts) not in (2, 3):
                raise SelectionError(f"{flag} {item!r}: expected A:B or A:B:K")
            a, b = _int(flag, item, parts[0]), _int(flag, item, parts[1])
            k = _int(flag, item, parts[2]) if len(parts) == 3 else 1
            if a > b:
                raise SelectionError(f"{flag} {item}: a range A:B[:K] needs A <= B")
            if k < 1:
                raise SelectionError(f"{flag} {item}: the stride K must be at least 1")
            ranges.append((a, b, k))
        else:
            values.append(_int(flag, item, item))
    return Ranges(tuple(values), tuple(ranges), last)


def select_steps(spec: str | Sequence | int | None,
                 run_steps: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """run -> its selected steps (ascending), from each run's complete checkpoints. None
    selects every step. SelectionError, listing the steps that exist, for a step no run has
    or a selection that matches no checkpoint."""
    if spec is None:
        return {run: sorted(steps) for run, steps in run_steps.items()}
    sel = parse_ranges("--steps", spec)
    every = sorted({s for steps in run_steps.values() for s in steps})
    missing = [v for v in sel.values if v not in every]
    if missing:
        raise SelectionError(f"--steps: no checkpoint at step {describe(missing)}; the runs "
                             f"have steps {describe(every)}")
    out = {}
    for run, steps in run_steps.items():
        steps = sorted(steps)
        chosen = {s for s in steps if sel.matches(s)}
        if sel.last and steps:
            chosen.add(steps[-1])
        out[run] = sorted(chosen)
    if not any(out.values()):
        raise SelectionError(f"--steps {spec if isinstance(spec, str) else list(spec)}: "
                             f"matches no checkpoint; the runs have steps {describe(every)}")
    return out


def select_layers(spec: str | Sequence | int | None, n_layers: int) -> tuple[int, ...]:
    """The selected layers (ascending) of a model with `n_layers` (the deepest run's). None
    selects all; SelectionError for a layer beyond the model."""
    if spec is None:
        return tuple(range(n_layers))
    sel = parse_ranges("--layers", spec)
    beyond = [v for v in sel.values if v >= n_layers]
    beyond += [b for _, b, _ in sel.ranges if b >= n_layers]
    if beyond:
        raise SelectionError(f"--layers {describe(sorted(set(beyond)))}: beyond the model, "
                             f"which has layers 0-{n_layers - 1} ({n_layers} layers)")
    chosen = {v for v in range(n_layers) if sel.matches(v)}
    if sel.last:
        chosen.add(n_layers - 1)
    return tuple(sorted(chosen))


def select_matrices(spec: str | Sequence | None) -> tuple[str, ...]:
    """The selected MATRIX_NAMES (in their order) from names and globs; None selects all.
    SelectionError, listing every name, for an item that matches none."""
    if spec is None:
        return MATRIX_NAMES
    chosen: set[str] = set()
    for item in _items("--matrices", spec):
        hits = fnmatch.filter(MATRIX_NAMES, item)
        if not hits:
            raise SelectionError(f"--matrices {item!r}: matches no matrix; expected names or "
                                 f"globs over {', '.join(MATRIX_NAMES)}")
        chosen.update(hits)
    return tuple(n for n in MATRIX_NAMES if n in chosen)


# ----------------------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class Cells:
    """Which cells of one checkpoint: `layer` (layers, len(MATRICES)) over the layer table
    (its ov_circuit column also covers the per-head OV table), `qk` (layers,) over the QK
    circuits (layer and heads), `emb` (len(EMBEDDINGS),). Boolean arrays; picklable."""

    layer: np.ndarray
    qk: np.ndarray
    emb: np.ndarray

    @classmethod
    def none(cls, n_layers: int) -> Cells:
        return cls(np.zeros((n_layers, len(MATRICES)), bool), np.zeros(n_layers, bool),
                   np.zeros(len(EMBEDDINGS), bool))

    @classmethod
    def of(cls, layers: Sequence[int], matrices: Sequence[str], n_layers: int) -> Cells:
        """The cells of `matrices` in `layers` (embeddings whatever the layers)."""
        out = cls.none(n_layers)
        rows = np.asarray([v for v in layers if v < n_layers], dtype=np.int64)
        for j, name in enumerate(MATRICES):
            if name in matrices:
                out.layer[rows, j] = True
        if "qk_circuit" in matrices:
            out.qk[rows] = True
        for e, name in enumerate(EMBEDDINGS):
            out.emb[e] = name in matrices
        return out

    @classmethod
    def every(cls, model_layers: int, n_layers: int) -> Cells:
        """Every cell of a model with `model_layers` layers, in a store of `n_layers`."""
        return cls.of(range(model_layers), MATRIX_NAMES, n_layers)

    def _combine(self, other: Cells, op) -> Cells:
        return Cells(op(self.layer, other.layer), op(self.qk, other.qk), op(self.emb, other.emb))

    def __or__(self, other: Cells) -> Cells:
        return self._combine(other, np.logical_or)

    def __and__(self, other: Cells) -> Cells:
        return self._combine(other, np.logical_and)

    def __sub__(self, other: Cells) -> Cells:
        return self._combine(other, lambda a, b: a & ~b)

    def any(self) -> bool:
        return bool(self.layer.any() or self.qk.any() or self.emb.any())

    def key(self) -> bytes:
        """The cells as bytes (equal for equal cells): a dictionary key."""
        return b"|".join(a.astype(np.int8).tobytes() + bytes(str(a.shape), "ascii")
                         for a in (self.layer, self.qk, self.emb))

    def covers(self, other: Cells) -> bool:
        """Whether every cell of `other` is in this one."""
        return not (other - self).any()

    def wants(self, site: Site) -> bool:
        """Whether a component's site (dynlab.analysis.components.Site) is selected."""
        if site.table == "layer":
            return bool(self.layer[site.index])
        if site.table == "head":
            return bool(self.layer[site.index[0], OV_COLUMN])
        if site.table in ("qk", "qk_head"):
            return bool(self.qk[site.index[0]])
        return bool(self.emb[site.index[0]])

    def mask(self, table: str) -> np.ndarray:
        """The cells over a result table's dims (dynlab.analysis.components.TABLES) without
        kind and the singular-value dim: layer (layer, matrix), head (layer, head: its
        layer's OV cell, broadcastable), emb (embedding,), qk (layer,), qk_head (layer, 1)."""
        if table == "layer":
            return self.layer
        if table == "head":
            return self.layer[:, OV_COLUMN, None]
        if table == "qk":
            return self.qk
        if table == "qk_head":
            return self.qk[:, None]
        return self.emb

    def flags(self) -> dict[str, np.ndarray]:
        """The store's per-cell record (`done`, `qk_done`, `emb_done`) as int8."""
        return {"done": self.layer.astype(np.int8), "qk_done": self.qk.astype(np.int8),
                "emb_done": self.emb.astype(np.int8)}

    @classmethod
    def from_flags(cls, done: np.ndarray, qk_done: np.ndarray, emb_done: np.ndarray) -> Cells:
        return cls(np.asarray(done) != 0, np.asarray(qk_done) != 0, np.asarray(emb_done) != 0)


#: `tensor_keep` of the cells of the last few selections (every checkpoint of an analysis
#: asks for the same one)
_KEEPS: dict[bytes, Callable[[str], bool]] = {}


def tensor_keep(cells: Cells | None) -> Callable[[str], bool] | None:
    """Which of a checkpoint's tensors (by dynlab name) the components of `cells` are built
    from: `layers.<i>.<matrix>.*` (the weight and, in relora runs, its LoRA factors) where
    cell (i, matrix) is selected or a selected circuit of layer i is built from the matrix,
    and `<embedding>.*` where the embedding is selected; every other tensor (norms, biases)
    is kept. None (read everything) for `cells` None. Each name's answer is worked out
    once."""
    if cells is None:
        return None
    key = cells.key()
    if key not in _KEEPS:
        if len(_KEEPS) >= 16:
            _KEEPS.clear()
        _KEEPS[key] = _tensor_keep(cells)
    return _KEEPS[key]


def _tensor_keep(cells: Cells) -> Callable[[str], bool]:
    wanted: list[set[str]] = []
    for layer in range(cells.layer.shape[0]):
        names = {m for j, m in enumerate(LAYER_MATRICES) if cells.layer[layer, j]}
        if cells.layer[layer, OV_COLUMN]:
            names.update((OV.first, OV.second))
        if cells.qk[layer]:
            names.update((QK.first, QK.second))
        wanted.append(names)
    embeddings = {name for e, name in enumerate(EMBEDDINGS) if cells.emb[e]}

    answers: dict[str, bool] = {}

    def keep(name: str) -> bool:
        if name not in answers:
            answers[name] = decide(name)
        return answers[name]

    def decide(name: str) -> bool:
        head, _, rest = name.partition(".")
        if head == "layers":
            layer, _, module = rest.partition(".")
            matrix = next((m for m in LAYER_MATRICES if module.startswith(m + ".")), None)
            if matrix is None or not layer.isdigit():
                return True
            return int(layer) < len(wanted) and matrix in wanted[int(layer)]
        if head in EMBEDDINGS:
            return head in embeddings
        return True

    return keep


#: the per-cell record of a store: variable -> (dims after (run, step), long name)
CELL_VARIABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "done": (("layer", "matrix"), "1 where this layer matrix (ov_circuit: and its heads' OV) "
                                  "was analysed; read with `analyzed` (see the selection guide)"),
    "qk_done": (("layer",), "1 where this layer's QK circuit (and its heads') was analysed"),
    "emb_done": (("embedding",), "1 where this embedding was analysed"),
}


def stored_cells(analyzed: int, flags: Cells, n_layers: int) -> Cells:
    """The cells a store holds for one checkpoint: `analyzed` 1 means every cell (stores
    written before selections were recorded hold no flags), 2 the flagged cells, 0 none."""
    if analyzed == 1:
        return Cells.every(n_layers, n_layers)
    if analyzed == 2:
        return flags
    return Cells.none(n_layers)


def held_matrix(ds, matrix: str):
    """Where a store (an xarray Dataset from dynlab.open_store) holds layer matrix `matrix`
    (a MATRICES name): boolean (run, step, layer), from `analyzed` (1: every cell) and the
    `done` flags (analyzed 2). Stores without flags: wherever `analyzed` is set."""
    analyzed = ds["analyzed"]
    held = (analyzed == 1).broadcast_like(ds["layer"])
    if "done" in ds.data_vars:
        held = held | ((analyzed == 2) & (ds["done"].sel(matrix=matrix) != 0))
    else:
        held = held | (analyzed != 0)
    return held


def not_analysed(ds, matrix: str) -> str | None:
    """A note for a figure of `matrix` that the store does not hold at any (run, step,
    layer) because a selection left it out, or None."""
    if "analyzed" not in ds.data_vars or not bool((ds["analyzed"] != 0).any()):
        return None
    if bool(held_matrix(ds, matrix).any()):
        return None
    return (f"matrix '{matrix}' not analysed (the analysis selected other matrices; rerun "
            f"dynlab analyze with --matrices {matrix} to add it)")
