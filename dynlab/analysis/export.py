"""Export an analysis store in pico-analyze's per-step JSON layout.

    OUT/step_<N>/<metric_name>_<split>.json     {"<component key>": value, ...}

(with several runs in the store and no run chosen: OUT/<run>/step_<N>/...), so notebooks
written for pico-analyze's output read dynlab's numbers. Names:

* metric_name: the store's metric for weights (`per`, `cn`, ...), `<metric>_<kind>` for the
  other kinds (`per_gradients`, `per_updates`, `per_lora`), `<metric>_activations` for the
  spectral metrics of activations, `anisotropy` / `isoscore`, and the comparative indices
  under their name against the target `final` (`cka`, `pwcca`, ...) or `<index>_vs_<target>`.
* component keys: `layers.<i>.<matrix>` (`layers.3.attention.v_proj`, `layers.3.swiglu.w_0`),
  `layers.<i>.ov_circuit` (whole layer), `layers.<i>.ov_circuit.heads.<h>`,
  `layers.<i>.qk_circuit[.heads.<h>]`, `embedding_proj`, `de_embedding_proj`; for activations
  `layers.<i>` (the residual stream) and `layers.<i>.<module>`.
* values: floats; +inf as JSON `Infinity` (as Python's json, which pico-analyze uses, writes
  it); cells without a value (NaN: kinds a run lacks, absent heads) are left out.

The numbers are dynlab's (its default convention for the OV circuit, O_h·V_g); the README
states how they differ from pico-analyze's own.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import xarray as xr

from dynlab.errors import InputError

FORMATS = ("pico-analyze",)
KIND_NAMES = {"weights": "", "grads": "gradients", "updates": "updates", "lora": "lora"}


def _value(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def parameter_entries(ds: xr.Dataset, metric: str, kind: str, run: str, step: int
                      ) -> dict[str, float]:
    """Component key -> value of one parameter metric at (run, kind, step)."""
    out: dict[str, float] = {}
    tables = (("", ("layer", "matrix")), ("head_", ("layer", "head")),
              ("emb_", ("embedding",)), ("qk_", ("layer",)), ("qk_head_", ("layer", "head")))
    for prefix, _ in tables:
        name = prefix + metric
        if name not in ds.data_vars:
            continue
        da = ds[name].sel(run=run, kind=kind, step=step).values
        for idx in np.ndindex(da.shape):
            v = _value(da[idx])
            if v is None:
                continue
            out[_key(prefix, idx, ds)] = v
    return out


def _key(prefix: str, idx: tuple[int, ...], ds: xr.Dataset) -> str:
    if prefix == "":
        layer, j = idx
        return f"layers.{int(ds['layer'][layer])}.{str(ds['matrix'].values[j])}"
    if prefix == "head_":
        return f"layers.{int(ds['layer'][idx[0]])}.ov_circuit.heads.{int(ds['head'][idx[1]])}"
    if prefix == "emb_":
        return str(ds["embedding"].values[idx[0]])
    if prefix == "qk_":
        return f"layers.{int(ds['layer'][idx[0]])}.qk_circuit"
    return f"layers.{int(ds['layer'][idx[0]])}.qk_circuit.heads.{int(ds['head'][idx[1]])}"


def activation_entries(da: xr.DataArray) -> dict[str, float]:
    """(layer, act_site) values -> `layers.<i>` / `layers.<i>.<module>` keys."""
    out: dict[str, float] = {}
    sites = [str(s) for s in da["act_site"].values]
    vals = da.transpose("layer", "act_site").values
    for i, layer in enumerate(da["layer"].values):
        for j, site in enumerate(sites):
            v = _value(vals[i, j])
            if v is None:
                continue
            out[f"layers.{int(layer)}" if site == "residual" else
                f"layers.{int(layer)}.{site}"] = v
    return out


def step_files(ds: xr.Dataset, run: str, step: int, split: str) -> dict[str, dict[str, float]]:
    """File name -> {key: value} of everything the store holds for one (run, step)."""
    from dynlab.analysis.activations import COMPARATIVE, GEOMETRY

    files: dict[str, dict[str, float]] = {}
    metrics = list(ds.attrs.get("metrics", []))
    kinds = [str(k) for k in ds["kind"].values] if "kind" in ds.coords else []
    for metric in metrics:
        for kind in kinds:
            suffix = KIND_NAMES.get(kind, kind)
            name = metric if not suffix else f"{metric}_{suffix}"
            files[f"{name}_{split}.json"] = parameter_entries(ds, metric, kind, run, step)
        if f"act_{metric}" in ds.data_vars:
            files[f"{metric}_activations_{split}.json"] = activation_entries(
                ds[f"act_{metric}"].sel(run=run, step=step))
    for name in GEOMETRY:
        if name in ds.data_vars:
            files[f"{name}_{split}.json"] = activation_entries(ds[name].sel(run=run, step=step))
    for name in COMPARATIVE:
        if name not in ds.data_vars:
            continue
        for target in (str(t) for t in ds["target"].values):
            label = name if target == "final" else f"{name}_vs_{target}"
            files[f"{label}_{split}.json"] = activation_entries(
                ds[name].sel(run=run, step=step, target=target))
    return {f: entries for f, entries in files.items() if entries}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=None))
    os.replace(tmp, path)


def export(store: str | Path, out: str | Path, *, fmt: str = "pico-analyze",
           run: str | None = None, split: str = "val") -> list[Path]:
    """Write the store's results in `fmt` under `out`; returns the files written. Existing
    files of the same names are replaced; nothing else in `out` is touched."""
    from dynlab.analysis.store import open_store

    if fmt not in FORMATS:
        raise InputError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if not split or "/" in split or split.startswith("."):
        raise InputError(f"--split: expected a plain name such as val or train, got {split!r}")
    path = Path(store)
    if not (path / "zarr.json").is_file():
        raise InputError(f"{path}: not a Zarr store (expected a store written by dynlab analyze)")
    ds = open_store(path)
    runs = [str(r) for r in ds["run"].values]
    if run is not None and run not in runs:
        raise InputError(f"--run {run!r}: not in {path} (runs: {', '.join(runs)})")
    chosen = [run] if run is not None else runs
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    analyzed = ds["analyzed"].load() if "analyzed" in ds.data_vars else None
    written: list[Path] = []
    for r in chosen:
        root = out / r if len(chosen) > 1 else out
        for step in (int(s) for s in ds["step"].values):
            if analyzed is not None and not int(analyzed.sel(run=r, step=step)):
                continue
            files = step_files(ds, r, step, split)
            if not files:
                continue
            folder = root / f"step_{step}"
            folder.mkdir(parents=True, exist_ok=True)
            for name, entries in files.items():
                _write_json(folder / name, entries)
                written.append(folder / name)
    return written



