"""The analysis store: a Zarr (format 3) store that `xr.open_zarr` opens as one Dataset.

Layout (see README "Store schema"):
    <metric>        (run, kind, step, layer, matrix)        scalar metrics of layer matrices
    head_<metric>   (run, kind, step, layer, head)          per-head OV circuit
    emb_<metric>    (run, kind, step, embedding)            embeddings
    sigma / head_sigma / emb_sigma   the same with a last dim sv / head_sv / emb_sv
    analyzed        (run, step) int8, 1 once a checkpoint is fully written
    train_loss, lr, tokens, wall_seconds, relora_cycle, ppl_macro, blimp_overall (run, step)
    ppl (run, step, domain), blimp (run, step, uid), blimp_field (run, step, field)

The whole grid is written first as a template (metadata only: missing chunks read as NaN);
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
from dynlab.components import EMBEDDINGS, MATRICES

SCHEMA_VERSION = 1

#: (run, step) variables read from each checkpoint's meta.json
META_VARIABLES: dict[str, str] = {
    "train_loss": "training loss (mean cross-entropy of the logged step)",
    "lr": "learning rate",
    "tokens": "tokens seen",
    "wall_seconds": "wall-clock seconds since the start of training",
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

    def dims(self) -> dict[str, int]:
        return {
            "run": len(self.runs), "kind": len(self.kinds), "step": len(self.steps),
            "layer": self.n_layers, "matrix": len(MATRICES), "head": self.n_heads,
            "embedding": len(EMBEDDINGS), "sv": self.n_sv, "head_sv": self.n_head_sv,
            "emb_sv": self.n_emb_sv,
        }


def spectral_variables(metrics: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Variable name -> dims, for every spectral variable of a store with these metrics."""
    layer = ("run", "kind", "step", "layer", "matrix")
    head = ("run", "kind", "step", "layer", "head")
    emb = ("run", "kind", "step", "embedding")
    out: dict[str, tuple[str, ...]] = {}
    for m in metrics:
        out[m] = layer
        out[f"head_{m}"] = head
        out[f"emb_{m}"] = emb
    out["sigma"] = layer + ("sv",)
    out["head_sigma"] = head + ("head_sv",)
    out["emb_sigma"] = emb + ("emb_sv",)
    return out


def _template(layout: Layout, runs: Sequence[str], steps: Sequence[int]):
    """A lazy all-NaN Dataset over `runs` × `steps` (nothing is computed or written)."""
    import dask.array as da
    import xarray as xr

    from dynlab.spectral import METRICS

    sizes = layout.dims() | {"run": len(runs), "step": len(steps)}
    chunk_of = {"run": 1, "step": 1}
    data_vars = {}
    for name, dims in spectral_variables(layout.metrics).items():
        shape = tuple(sizes[d] for d in dims)
        chunks = tuple(chunk_of.get(d, sizes[d]) for d in dims)
        base = name.removeprefix("head_").removeprefix("emb_")
        attrs = {"long_name": "singular values, descending, NaN past the rank bound"}
        if base in METRICS:
            attrs = {"long_name": METRICS[base].long_name, "definition": METRICS[base].definition}
        data_vars[name] = (dims, da.full(shape, np.nan, chunks=chunks, dtype="float64"), attrs)
    data_vars["analyzed"] = (
        ("run", "step"),
        da.zeros((len(runs), len(steps)), chunks=(1, 1), dtype="int8"),
        {"long_name": "1 once every kind of this checkpoint is written"},
    )
    coords = {
        "run": list(runs), "kind": list(layout.kinds), "step": np.asarray(steps, dtype="int64"),
        "layer": np.arange(layout.n_layers), "matrix": list(MATRICES),
        "head": np.arange(layout.n_heads), "embedding": list(EMBEDDINGS),
        "sv": np.arange(layout.n_sv), "head_sv": np.arange(layout.n_head_sv),
        "emb_sv": np.arange(layout.n_emb_sv),
    }
    return xr.Dataset(data_vars, coords=coords)


def _attrs(layout: Layout) -> dict:
    return {
        "dynlab_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "metrics": list(layout.metrics),
        "kinds": list(layout.kinds),
        "run_configs": json.dumps(layout.run_configs, sort_keys=True),
        "description": "dynlab spectral analysis of checkpoints; see the README's store schema",
    }


def create_store(path: Path, layout: Layout) -> None:
    """Write the template (coordinates and metadata; all data reads as NaN / 0)."""
    ds = _template(layout, layout.runs, layout.steps)
    ds.attrs.update(_attrs(layout))
    with quiet_zarr():
        ds.to_zarr(path, mode="w-", compute=False, zarr_format=3, consolidated=True)


def read_attrs(path: Path) -> dict:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
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
    import xarray as xr

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
    if not set(layout.kinds) <= set(stored_kinds):
        problems.append(f"kinds {stored_kinds} (these runs need {list(layout.kinds)})")
    ds = xr.open_zarr(path, consolidated=True)
    sizes = {}
    for dim, size in layout.dims().items():
        if dim in ("run", "step", "kind"):
            continue
        sizes[dim] = ds.sizes.get(dim, 0)
        if sizes[dim] < size or (dim == "matrix" and sizes[dim] != size):
            problems.append(f"dimension {dim} of size {sizes[dim]} (these runs need {size})")
    if problems:
        raise StoreError(
            f"{path}: this store was made by another analysis: " + "; ".join(problems)
            + ". Use another -o path, or delete the store to start over."
        )
    runs = [str(r) for r in ds["run"].values]
    steps = [int(s) for s in ds["step"].values]
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
                    sizes["sv"], sizes["head_sv"], sizes["emb_sv"], configs)
    new_steps = [s for s in layout.steps if s not in set(steps)]
    new_runs = [r for r in layout.runs if r not in set(runs)]
    attrs = {**attrs, "run_configs": json.dumps(configs, sort_keys=True),
             "dynlab_version": __version__}
    if new_steps or new_runs:
        drop_meta_variables(path)  # rebuilt by the caller over the new grid
    with quiet_zarr():
        if new_steps:
            ds_new = _template(stored, runs, new_steps)
            ds_new.attrs.update(attrs)
            ds_new.to_zarr(path, append_dim="step", compute=False, consolidated=True)
            steps += new_steps
        if new_runs:
            ds_new = _template(stored, new_runs, steps)
            ds_new.attrs.update(attrs)
            ds_new.to_zarr(path, append_dim="run", compute=False, consolidated=True)
            runs += new_runs
    _update_attrs(path, attrs)
    stored.runs, stored.steps = runs, steps
    return stored


def _update_attrs(path: Path, attrs: Mapping) -> None:
    import zarr

    with quiet_zarr():
        group = zarr.open_group(str(path), mode="r+")
        group.attrs.update(dict(attrs))
        zarr.consolidate_metadata(str(path))


def ensure_store(
    path: Path, layout: Layout, *, metrics_given: bool = True, kinds_given: bool = True
) -> Layout:
    """Create the store, or reconcile an existing one with this analysis."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: exists and is not a directory (expected a Zarr store)")
    if path.exists() and any(path.iterdir()):
        return reconcile(path, layout, metrics_given=metrics_given, kinds_given=kinds_given)
    if path.exists():
        path.rmdir()
    create_store(path, layout)
    return layout


class RegionWriter:
    """Writes one checkpoint's results into its (run, step) chunks, straight through zarr."""

    def __init__(self, path: Path):
        import zarr

        self.path = path
        self.group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
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
    import xarray as xr

    r_index = {r: i for i, r in enumerate(runs)}
    s_index = {s: j for j, s in enumerate(steps)}
    shape = (len(runs), len(steps))
    scalars = {name: np.full(shape, np.nan) for name in META_VARIABLES}
    labels: dict[str, list[str]] = {"domain": [], "uid": [], "field": []}
    by_dim: dict[str, dict[tuple[int, int], Mapping]] = {"domain": {}, "uid": {}, "field": {}}
    for (run, step), meta in metas.items():
        i, j = r_index[run], s_index[step]
        for name in ("train_loss", "lr", "tokens", "wall_seconds", "relora_cycle"):
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
    data_vars = {
        name: (("run", "step"), arr, {"long_name": META_VARIABLES[name]})
        for name, arr in scalars.items()
    }
    coords: dict = {}
    for var, (dim, long_name) in EVAL_VARIABLES.items():
        names = sorted(labels[dim])
        if not names:
            continue
        coords[dim] = names
        arr = np.full(shape + (len(names),), np.nan)
        col = {n: c for c, n in enumerate(names)}
        for (i, j), table in by_dim[dim].items():
            for k, v in table.items():
                arr[i, j, col[k]] = _number(v)
        data_vars[var] = (("run", "step", dim), arr, {"long_name": long_name})

    with quiet_zarr():
        attrs = drop_meta_variables(path)
        ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
        ds.to_zarr(path, mode="a", consolidated=True)


def drop_meta_variables(path: Path) -> dict:
    """Delete the training/evaluation variables (they are rebuilt from meta.json) and return
    the store's attrs."""
    import zarr

    with quiet_zarr():
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        names = list(META_VARIABLES) + list(EVAL_VARIABLES) + ["domain", "uid", "field"]
        for name in names:
            if name in group:
                del group[name]
        zarr.consolidate_metadata(str(path))
        return dict(group.attrs)


def metas_from_store(path: Path, exclude: set[str]) -> dict[tuple[str, int], dict]:
    """The training/evaluation values already in the store, as meta.json-shaped dicts, for
    the runs not in `exclude` (so rewriting the meta variables keeps them)."""
    import xarray as xr

    ds = xr.open_zarr(path, consolidated=True)
    if "train_loss" not in ds:
        return {}
    out: dict[tuple[str, int], dict] = {}
    for run in (str(r) for r in ds["run"].values):
        if run in exclude:
            continue
        sub = ds.sel(run=run)
        for j, step in enumerate(int(s) for s in ds["step"].values):
            meta: dict = {n: float(sub[n].values[j]) for n in
                          ("train_loss", "lr", "tokens", "wall_seconds", "relora_cycle")}
            ev: dict = {}
            if "ppl" in ds:
                ev["perplexity"] = {
                    "by_domain": _table(sub["ppl"].values[j], ds["domain"].values),
                    "macro": float(sub["ppl_macro"].values[j]),
                }
            if "blimp" in ds:
                ev["blimp"] = {
                    "by_uid": _table(sub["blimp"].values[j], ds["uid"].values),
                    "by_field": _table(sub["blimp_field"].values[j], ds["field"].values)
                    if "blimp_field" in ds else {},
                    "overall": float(sub["blimp_overall"].values[j]),
                }
            if ev:
                meta["eval"] = ev
            out[(run, step)] = meta
    return out


def _table(values: np.ndarray, labels: np.ndarray) -> dict[str, float]:
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
