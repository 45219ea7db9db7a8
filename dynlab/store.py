"""The analysis store: a Zarr (format 3) store that `xr.open_zarr` opens as one Dataset.

Layout (see README "Store schema"):
    <metric>        (run, kind, step, layer, matrix)        scalar metrics of layer matrices
    head_<metric>   (run, kind, step, layer, head)          per-head OV circuit
    emb_<metric>    (run, kind, step, embedding)            embeddings
    qk_<metric>     (run, kind, step, layer)                whole-layer QK circuit
    qk_head_<metric> (run, kind, step, layer, head)         per-head QK circuit
    sigma / head_sigma / emb_sigma / qk_sigma / qk_head_sigma   the same with a last dim
                    sv / head_sv / emb_sv / sv / head_sv
    analyzed        (run, step) int8, 1 once a checkpoint is fully written
    train_loss, lr, tokens, wall_seconds, relora_cycle, ppl_macro, blimp_overall (run, step)
    ppl (run, step, domain), blimp (run, step, uid), blimp_field (run, step, field)

The whole grid is created first (metadata only: unwritten chunks read as NaN), with zarr
directly (each array's `dimension_names` make it an xarray variable);
each checkpoint then fills its own (run, step) chunks, and `analyzed` is set last, so a killed
analysis resumes where it stopped and parallel writers never share a chunk.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynlab import __version__
from dynlab.components import EMBEDDINGS, MATRICES, TABLES

SCHEMA_VERSION = 2

#: (run, step) variables read from each checkpoint's meta.json
META_VARIABLES: dict[str, str] = {
    "train_loss": "training loss (mean cross-entropy of the logged step)",
    "lr": "learning rate",
    "tokens": "tokens seen",
    "wall_seconds": "wall-clock seconds since the start of training",
    "gpu_hours": "device-hours since the start of training (wall-clock x processes)",
    "relora_cycle": "ReLoRA cycle (number of merge-and-resets so far)",
    "ppl_macro": "perplexity, macro average over domains",
    "blimp_overall": "BLiMP accuracy, mean over UIDs",
}
EVAL_VARIABLES: dict[str, tuple[str, str]] = {
    "ppl": ("domain", "perplexity per domain: exp(total NLL / total tokens)"),
    "blimp": ("uid", "BLiMP accuracy per UID"),
    "blimp_field": ("field", "BLiMP accuracy per field (mean over its UIDs)"),
}


@contextlib.contextmanager
def quiet_zarr():
    """Silence zarr's notes that string dtypes and consolidated metadata are not yet in the
    Zarr v3 spec (xarray and zarr-python read both; see README)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*Consolidated metadata is currently not.*")
        yield


class StoreError(ValueError):
    """The store on disk does not match what this analysis would write."""


@dataclass
class Layout:
    """Everything that fixes the shape of a store."""

    runs: list[str]
    steps: list[int]
    kinds: list[str]
    metrics: list[str]
    n_layers: int
    n_heads: int
    n_sv: int
    n_head_sv: int
    n_emb_sv: int
    run_configs: dict[str, dict] = field(default_factory=dict)
    convention: str = "dynlab"  # dynlab.conventions: which OV matrices and CN the store holds

    def dims(self) -> dict[str, int]:
        return {
            "run": len(self.runs), "kind": len(self.kinds), "step": len(self.steps),
            "layer": self.n_layers, "matrix": len(MATRICES), "head": self.n_heads,
            "embedding": len(EMBEDDINGS), "sv": self.n_sv, "head_sv": self.n_head_sv,
            "emb_sv": self.n_emb_sv,
        }


def spectral_variables(metrics: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Variable name -> dims, for every spectral variable of a store with these metrics (one
    group per result table of dynlab.components.TABLES)."""
    base = ("run", "kind", "step")
    out: dict[str, tuple[str, ...]] = {}
    for m in metrics:
        for _, prefix, dims, _ in TABLES.values():
            out[prefix + m] = base + dims
    for sigma, prefix, dims, sv in TABLES.values():
        out[sigma] = base + dims + (sv,)
        out[f"{prefix}tol"] = base + dims
        out[f"{prefix}max_rank"] = base + dims
    return out


#: fixed widths of string coordinates (zarr's fixed-length UTF-32; a longer name is an error)
NAME_WIDTH = 256


def _coordinates(layout: Layout, runs: Sequence[str], steps: Sequence[int]) -> dict:
    return {
        "run": _names(runs, "run"), "kind": _names(layout.kinds, "kind"),
        "step": np.asarray(steps, dtype="int64"), "layer": np.arange(layout.n_layers),
        "matrix": _names(MATRICES, "matrix"), "head": np.arange(layout.n_heads),
        "embedding": _names(EMBEDDINGS, "embedding"), "sv": np.arange(layout.n_sv),
        "head_sv": np.arange(layout.n_head_sv), "emb_sv": np.arange(layout.n_emb_sv),
    }


def _names(values: Sequence[str], what: str) -> np.ndarray:
    too_long = [v for v in values if len(v) > NAME_WIDTH]
    if too_long:
        raise StoreError(f"{what} name {too_long[0][:40]!r}... is longer than {NAME_WIDTH}")
    return np.asarray(list(values), dtype=f"<U{NAME_WIDTH}")


def _create(group, name: str, dims: Sequence[str], data: np.ndarray | None = None, *,
            shape: tuple[int, ...] | None = None, chunks: tuple[int, ...] | None = None,
            dtype: str = "float64", fill_value=np.nan, attrs: Mapping | None = None):
    """An array whose `dimension_names` make it an xarray variable over `dims`."""
    if data is not None:
        shape, dtype = data.shape, data.dtype
        fill_value = "" if data.dtype.kind == "U" else (np.nan if data.dtype.kind == "f" else 0)
    arr = group.create_array(name, shape=shape, chunks=chunks or shape, dtype=dtype,
                             fill_value=fill_value, dimension_names=tuple(dims),
                             attributes=dict(attrs or {}))
    if data is not None and data.size:
        arr[...] = data
    return arr


def _variable_attrs(name: str) -> dict:
    from dynlab.spectral import METRICS, TOL_FACTOR

    base = name
    for prefix in sorted((p for _, p, _, _ in TABLES.values() if p), key=len, reverse=True):
        if name.startswith(prefix):
            base = name.removeprefix(prefix)
            break
    if base in METRICS:
        return {"long_name": METRICS[base].long_name, "definition": METRICS[base].definition}
    if base == "tol":
        return {"long_name": "numerical-zero tolerance of the spectrum",
                "definition": "tol = c*max(m,n)*eps*sigma_1; sigma_i <= tol counts as zero in "
                              "numerical_rank, cn, cn_nz and rank_deficit; eps = the coarser "
                              "of the machine epsilon of the precision the matrix (or, for a "
                              "matrix formed from stored tensors, its inputs) was stored in and "
                              "of the analysis precision",
                "c": TOL_FACTOR}
    if base == "max_rank":
        return {"long_name": "rank bound by construction",
                "definition": "min(m,n) for a dense matrix; the inner dimension for a product "
                              "of factors (OV circuit n_kv*hd, head OV hd, LoRA s*B*A r, a "
                              "relora update within a cycle [s*B_t, -s*B_t-1]*[A_t; A_t-1] "
                              "2r); numerical_rank <= max_rank"}
    return {"long_name": "singular values, descending, NaN past the rank bound"}


def _attrs(layout: Layout) -> dict:
    return {
        "dynlab_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "metrics": list(layout.metrics),
        "kinds": list(layout.kinds),
        "run_configs": json.dumps(layout.run_configs, sort_keys=True),
        "convention": layout.convention,
        "description": "dynlab spectral analysis of checkpoints; see the README's store schema",
    }


def _open_group(path: Path, mode: str = "r+"):
    import zarr

    return zarr.open_group(str(path), mode=mode, use_consolidated=False)


def _consolidate(path: Path) -> None:
    import zarr

    with quiet_zarr():
        zarr.consolidate_metadata(str(path))


def create_store(path: Path, layout: Layout) -> None:
    """Write the structure: coordinates, metadata, and no data chunks (data reads as NaN and
    `analyzed` as 0 until written). Chunks: one (run, step) cell of every variable."""
    import zarr

    with quiet_zarr():
        group = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes=_attrs(layout))
        for name, values in _coordinates(layout, layout.runs, layout.steps).items():
            _create(group, name, (name,), values)
        sizes = layout.dims()
        for name, dims in spectral_variables(layout.metrics).items():
            shape = tuple(sizes[d] for d in dims)
            chunks = tuple(1 if d in ("run", "step") else sizes[d] for d in dims)
            _create(group, name, dims, shape=shape, chunks=chunks, attrs=_variable_attrs(name))
        _create(group, "analyzed", ("run", "step"), shape=(sizes["run"], sizes["step"]),
                chunks=(1, 1), dtype="int8", fill_value=0,
                attrs={"long_name": "1 once every kind of this checkpoint is written"})
    _consolidate(path)


def _grow(group, dim: str, new_values: np.ndarray) -> None:
    """Append `new_values` to coordinate `dim` and grow every variable along it (new cells
    read as NaN / 0)."""
    with quiet_zarr():
        for name, arr in list(group.arrays()):
            dims = arr.metadata.dimension_names or ()
            if dim in dims and name != dim:
                shape = list(arr.shape)
                shape[dims.index(dim)] += len(new_values)
                arr.resize(tuple(shape))
        coord = group[dim]
        old = coord.shape[0]
        coord.resize((old + len(new_values),))
        coord[old:] = new_values


def read_attrs(path: Path) -> dict:
    import zarr

    try:
        with quiet_zarr():
            group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    except Exception as e:  # zarr raises several types for a non-store
        raise StoreError(f"{path}: exists but is not a Zarr store ({e})") from None
    return dict(group.attrs)


def reconcile(
    path: Path, layout: Layout, *, metrics_given: bool = True, kinds_given: bool = True
) -> Layout:
    """Make an existing store ready for `layout`: check it was made with the same schema,
    metrics and kinds (adopting the store's when not given explicitly) and large enough
    dimensions, then append the runs and steps it lacks. Returns the store's layout (its run
    and step order). Raises StoreError, before changing anything, on a mismatch."""
    attrs = read_attrs(path)
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: not a dynlab store of schema {SCHEMA_VERSION} (found "
            f"{attrs.get('schema_version')!r}); use another -o path"
        )
    stored_metrics, stored_kinds = list(attrs["metrics"]), list(attrs["kinds"])
    problems = []
    if metrics_given and stored_metrics != list(layout.metrics):
        problems.append(f"metrics {stored_metrics} (this analysis: {list(layout.metrics)})")
    if kinds_given and stored_kinds != list(layout.kinds):
        problems.append(f"kinds {stored_kinds} (this analysis: {list(layout.kinds)})")
    if attrs.get("convention", "dynlab") != layout.convention:
        problems.append(f"convention {attrs.get('convention', 'dynlab')!r} (this analysis: "
                        f"{layout.convention!r})")
    if not set(layout.kinds) <= set(stored_kinds):
        problems.append(f"kinds {stored_kinds} (these runs need {list(layout.kinds)})")
    group = _open_group(path, "r")
    sizes = {}
    for dim, size in layout.dims().items():
        if dim in ("run", "step", "kind"):
            continue
        sizes[dim] = group[dim].shape[0] if dim in group else 0
        if sizes[dim] < size or (dim == "matrix" and sizes[dim] != size):
            problems.append(f"dimension {dim} of size {sizes[dim]} (these runs need {size})")
    if problems:
        raise StoreError(
            f"{path}: this store was made by another analysis: " + "; ".join(problems)
            + ". Use another -o path, or delete the store to start over."
        )
    runs = [str(r) for r in group["run"][...]]
    steps = [int(s) for s in group["step"][...]]
    configs = json.loads(attrs.get("run_configs", "{}"))
    for run in layout.runs:
        old, new = configs.get(run), layout.run_configs.get(run)
        if old is not None and new is not None and old.get("model") != new.get("model"):
            raise StoreError(
                f"{path}: run {run!r} is in the store with another model config; "
                "use another -o path"
            )
    configs.update(layout.run_configs)
    stored = Layout(runs, steps, stored_kinds, stored_metrics, sizes["layer"], sizes["head"],
                    sizes["sv"], sizes["head_sv"], sizes["emb_sv"], configs,
                    attrs.get("convention", "dynlab"))
    new_steps = [s for s in layout.steps if s not in set(steps)]
    new_runs = [r for r in layout.runs if r not in set(runs)]
    group = _open_group(path)
    if new_steps:
        _grow(group, "step", np.asarray(new_steps, dtype="int64"))
    if new_runs:
        _grow(group, "run", _names(new_runs, "run"))
    group.attrs.update({"run_configs": json.dumps(configs, sort_keys=True),
                        "dynlab_version": __version__})
    _consolidate(path)
    stored.runs, stored.steps = runs + new_runs, steps + new_steps
    return stored


def ensure_store(
    path: Path, layout: Layout, *, metrics_given: bool = True, kinds_given: bool = True
) -> Layout:
    """Create the store, or reconcile an existing one with this analysis."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: exists and is not a directory (expected a Zarr store)")
    if path.exists() and any(path.iterdir()):
        stored = reconcile(path, layout, metrics_given=metrics_given, kinds_given=kinds_given)
        add_missing_variables(path, stored)
        return stored
    if path.exists():
        path.rmdir()
    create_store(path, layout)
    return layout


def create_variable(group, name: str, dims: Sequence[str], data: np.ndarray | None = None,
                    **kwargs):
    """An array `name` over `dims` in an open group (as the store's own variables are made:
    `dimension_names` make it an xarray variable). kwargs: shape, chunks, dtype, fill_value,
    attrs."""
    return _create(group, name, dims, data, **kwargs)


def string_coordinate(values: Sequence[str], what: str) -> np.ndarray:
    """Fixed-width strings for a coordinate (a name longer than NAME_WIDTH is an error)."""
    return _names(values, what)


def grow_dimension(path: Path, dim: str, new_values: np.ndarray) -> None:
    """Append values to coordinate `dim`, growing every variable along it (new cells empty)."""
    _grow(_open_group(path), dim, new_values)
    _consolidate(path)


def open_group_for_update(path: Path):
    """The store's root Zarr group, writable."""
    return _open_group(path)


def consolidate(path: Path) -> None:
    """Rewrite the consolidated metadata after variables or attributes changed."""
    _consolidate(path)


def add_missing_variables(path: Path, layout: Layout) -> list[str]:
    """Create the spectral variables a store made by an earlier dynlab lacks (e.g. the QK
    circuit's `qk_*` / `qk_head_*`), chunked like the others and empty (NaN). Checkpoints
    analysed before keep NaN there (`analyzed` stays 1: their other variables are complete);
    checkpoints analysed from now on fill them. Returns the names created."""
    group = _open_group(path)
    sizes = {d: group[d].shape[0] for d in layout.dims() if d in group}
    missing = [(n, d) for n, d in spectral_variables(layout.metrics).items() if n not in group]
    if not missing:
        return []
    with quiet_zarr():
        for name, dims in missing:
            shape = tuple(sizes[d] for d in dims)
            chunks = tuple(1 if d in ("run", "step") else sizes[d] for d in dims)
            _create(group, name, dims, shape=shape, chunks=chunks, attrs=_variable_attrs(name))
    _consolidate(path)
    return [n for n, _ in missing]


class RegionWriter:
    """Writes one checkpoint's results into its (run, step) chunks, straight through zarr."""

    def __init__(self, path: Path):
        self.path = path
        self.group = _open_group(path)
        self._arrays: dict = {}

    def array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def write(self, run_index: int, step_index: int, values: Mapping[str, np.ndarray]) -> None:
        """values: variable -> array of the variable's shape without its run and step dims."""
        for name, arr in values.items():
            self.array(name)[run_index, :, step_index] = arr

    def mark_analyzed(self, run_index: int, step_index: int) -> None:
        self.array("analyzed")[run_index, step_index] = 1

    def analyzed(self) -> np.ndarray:
        return np.asarray(self.array("analyzed")[...])


def write_meta_variables(
    path: Path, runs: Sequence[str], steps: Sequence[int], metas: Mapping[tuple[str, int], dict]
) -> None:
    """(Re)write the training/evaluation variables from the checkpoints' meta.json.

    These are small (run × step [× domain/uid/field]) and always rewritten whole, so new
    evaluation results (e.g. from a later `dynlab eval`) reach the store on the next analyze.
    """
    r_index = {r: i for i, r in enumerate(runs)}
    s_index = {s: j for j, s in enumerate(steps)}
    shape = (len(runs), len(steps))
    scalars = {name: np.full(shape, np.nan) for name in META_VARIABLES}
    labels: dict[str, list[str]] = {"domain": [], "uid": [], "field": []}
    by_dim: dict[str, dict[tuple[int, int], Mapping]] = {"domain": {}, "uid": {}, "field": {}}
    for (run, step), meta in metas.items():
        if run not in r_index or step not in s_index:
            continue
        i, j = r_index[run], s_index[step]
        for name in ("train_loss", "lr", "tokens", "wall_seconds", "gpu_hours", "relora_cycle"):
            scalars[name][i, j] = _number(meta.get(name))
        ev = meta.get("eval") or {}
        ppl = ev.get("perplexity") or {}
        blimp = ev.get("blimp") or {}
        scalars["ppl_macro"][i, j] = _number(ppl.get("macro"))
        scalars["blimp_overall"][i, j] = _number(blimp.get("overall"))
        for dim, table in (("domain", ppl.get("by_domain")), ("uid", blimp.get("by_uid")),
                           ("field", blimp.get("by_field"))):
            if isinstance(table, Mapping):
                by_dim[dim][(i, j)] = table
                labels[dim].extend(k for k in table if k not in labels[dim])
    group = drop_meta_variables(path)
    with quiet_zarr():
        for name, arr in scalars.items():
            _create(group, name, ("run", "step"), arr,
                    attrs={"long_name": META_VARIABLES[name]})
        for var, (dim, long_name) in EVAL_VARIABLES.items():
            names = sorted(labels[dim])
            if not names:
                continue
            arr = np.full(shape + (len(names),), np.nan)
            col = {n: c for c, n in enumerate(names)}
            for (i, j), table in by_dim[dim].items():
                for k, v in table.items():
                    arr[i, j, col[k]] = _number(v)
            if dim not in group:
                _create(group, dim, (dim,), _names(names, dim))
            _create(group, var, ("run", "step", dim), arr, attrs={"long_name": long_name})
    _consolidate(path)


def drop_meta_variables(path: Path):
    """Delete the training/evaluation variables (they are rebuilt from meta.json); returns
    the open group."""
    group = _open_group(path)
    with quiet_zarr():
        for name in list(META_VARIABLES) + list(EVAL_VARIABLES) + ["domain", "uid", "field"]:
            if name in group:
                del group[name]
    return group


def metas_from_store(path: Path, exclude: set[str]) -> dict[tuple[str, int], dict]:
    """The training/evaluation values already in the store, as meta.json-shaped dicts, for
    the runs not in `exclude` (so rewriting the meta variables keeps them)."""
    group = _open_group(path, "r")
    if "train_loss" not in group:
        return {}
    runs = [str(r) for r in group["run"][...]]
    steps = [int(s) for s in group["step"][...]]
    data = {name: group[name][...] for name in list(META_VARIABLES) + list(EVAL_VARIABLES)
            if name in group}
    labels = {dim: [str(x) for x in group[dim][...]] for dim in ("domain", "uid", "field")
              if dim in group}
    out: dict[tuple[str, int], dict] = {}
    for i, run in enumerate(runs):
        if run in exclude:
            continue
        for j, step in enumerate(steps):
            meta: dict = {n: float(data[n][i, j]) for n in
                          ("train_loss", "lr", "tokens", "wall_seconds", "relora_cycle")}
            ev: dict = {}
            if "ppl" in data:
                ev["perplexity"] = {"by_domain": _table(data["ppl"][i, j], labels["domain"]),
                                    "macro": float(data["ppl_macro"][i, j])}
            if "blimp" in data:
                ev["blimp"] = {
                    "by_uid": _table(data["blimp"][i, j], labels["uid"]),
                    "by_field": _table(data["blimp_field"][i, j], labels["field"])
                    if "blimp_field" in data else {},
                    "overall": float(data["blimp_overall"][i, j]),
                }
            if ev:
                meta["eval"] = ev
            out[(run, step)] = meta
    return out


def _table(values: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    return {str(k): float(v) for k, v in zip(labels, values, strict=True) if not np.isnan(v)}


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def open_store(path: str | Path):
    """Open an analysis store as an xarray Dataset (lazy), sorted by step."""
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    ds = xr.open_zarr(path, consolidated=True)
    if "step" in ds.dims and ds.sizes["step"] > 1:
        ds = ds.sortby("step")
    return ds
