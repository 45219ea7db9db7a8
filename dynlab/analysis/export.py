"""Export an analysis store in pico-analyze's per-step JSON layout.

    OUT/step_<N>/<metric_name>_<split>.json     {"<component key>": value, ...}

(with several runs in the store and no run chosen: OUT/<run>/step_<N>/..., where <run> is
the run's name percent-encoded when it is not a plain folder name, `run_folder`), so notebooks
written for pico-analyze's output read dynlab's numbers. As pico-analyze writes them:

* one file per metric and split, holding every component and data type of that metric;
  metric_name is pico-analyze's name where it has the metric (`per`, `condition_number` for
  `cn`, `gini`, `hoyer`, `cka`, `pwcca`) and dynlab's otherwise (`er`, `frobenius_norm`,
  `alpha`, `anisotropy`, `isoscore`, `svcca`, `cka_debiased`, ...). A comparative index
  against a target other than `final` is `<index>_vs_<target>`.
* component keys `<prefix><layer>.<component>.<data_type>` (prefix `layers.` by default;
  pico-analyze's own files carry the prefix of pico-train's module names, e.g.
  `_forward_module.layers.`, which `prefix` reproduces): `layers.3.attention.v_proj.weights`,
  `layers.3.swiglu.w_2.gradients`, the OV circuit `layers.3.ov_circuit.weights` (whole layer)
  and `layers.3.ov_circuit.weights.heads.1`, activations `layers.3.swiglu.w_0.activations`.
  Components pico-analyze lacks follow the same pattern: `layers.3.qk_circuit.weights[.heads.1]`,
  `layers.3.residual.activations` (the residual stream), `embedding_proj.weights`, and the
  data types `updates` and `lora`.
* data types: `weights`; `gradients` = the kind `grads` (the fixed learning-dynamics batch,
  pico-train's `val_gradients`), or with split `train` the kind `train_grads` where the store
  has it (pico-train's `train_gradients`); `updates`, `lora`; `activations`.
* values: floats; +inf as JSON `Infinity` (as Python's json, which pico-analyze uses, writes
  it); cells without a value (NaN: kinds a run lacks, absent heads) are left out.

The numbers are the store's: dynlab's convention, or pico-analyze's OV matrices, condition
number, CKA and PWCCA for a store analysed with `--convention pico`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from urllib.parse import quote

import numpy as np
import xarray as xr

from dynlab.atomic import write_text_atomically
from dynlab.errors import InputError, quoted

FORMATS = ("pico-analyze", "tensorboard", "wandb")
#: dynlab metric -> pico-analyze's metric name (its file name), where they differ
PICO_METRIC_NAMES = {"cn": "condition_number"}
#: store kind -> pico-analyze's data type (the last part of a key)
DATA_TYPES = {"weights": "weights", "grads": "gradients", "train_grads": "gradients",
              "updates": "updates", "lora": "lora"}
DEFAULT_PREFIX = "layers."


def _value(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def pico_metric_name(metric: str) -> str:
    return PICO_METRIC_NAMES.get(metric, metric)


def exported_kinds(kinds: list[str], split: str) -> dict[str, str]:
    """Store kind -> data type written for `split`: `gradients` is train_grads for the split
    `train` when the store has that kind, else grads."""
    grads = "train_grads" if split == "train" and "train_grads" in kinds else "grads"
    return {k: DATA_TYPES.get(k, k) for k in kinds
            if not (DATA_TYPES.get(k) == "gradients" and k != grads)}


def parameter_entries(ds: xr.Dataset, metric: str, kind: str, run: str, step: int,
                      data_type: str | None = None, prefix: str = DEFAULT_PREFIX
                      ) -> dict[str, float]:
    """Component key -> value of one parameter metric at (run, kind, step)."""
    out: dict[str, float] = {}
    dt = data_type or DATA_TYPES.get(kind, kind)
    for table in ("", "head_", "emb_", "qk_", "qk_head_"):
        name = table + metric
        if name not in ds.data_vars:
            continue
        da = ds[name].sel(run=run, kind=kind, step=step).values
        for idx in np.ndindex(da.shape):
            v = _value(da[idx])
            if v is None:
                continue
            out[parameter_key(table, idx, ds, dt, prefix)] = v
    return out


def parameter_key(table: str, idx: tuple[int, ...], ds: xr.Dataset, dt: str,
                  prefix: str = DEFAULT_PREFIX) -> str:
    """pico-analyze's key of one cell of a parameter table (module docstring)."""
    coord = ds.indexes  # pandas indexes: a cell's label without building a DataArray
    if table == "emb_":
        return f"{coord['embedding'][idx[0]]}.{dt}"
    layer = f"{prefix}{int(coord['layer'][idx[0]])}"
    if table == "":
        return f"{layer}.{coord['matrix'][idx[1]]}.{dt}"
    circuit = "ov_circuit" if table == "head_" else "qk_circuit"
    if table == "qk_":
        return f"{layer}.{circuit}.{dt}"
    return f"{layer}.{circuit}.{dt}.heads.{int(coord['head'][idx[1]])}"


def activation_entries(da: xr.DataArray, prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """(layer, act_site) values -> `layers.<i>.<site>.activations` keys (site `residual` for
    the residual stream)."""
    out: dict[str, float] = {}
    sites = [str(s) for s in da["act_site"].values]
    vals = da.transpose("layer", "act_site").values
    for i, layer in enumerate(da["layer"].values):
        for j, site in enumerate(sites):
            v = _value(vals[i, j])
            if v is not None:
                out[f"{prefix}{int(layer)}.{site}.activations"] = v
    return out


def step_files(ds: xr.Dataset, run: str, step: int, split: str,
               prefix: str = DEFAULT_PREFIX) -> dict[str, dict[str, float]]:
    """File name -> {key: value} of everything the store holds for one (run, step)."""
    from dynlab.analysis.activations import COMPARATIVE, GEOMETRY

    files: dict[str, dict[str, float]] = {}
    metrics = list(ds.attrs.get("metrics", []))
    kinds = [str(k) for k in ds["kind"].values] if "kind" in ds.coords else []
    for metric in metrics:
        entries: dict[str, float] = {}
        for kind, dt in exported_kinds(kinds, split).items():
            entries.update(parameter_entries(ds, metric, kind, run, step, dt, prefix))
        if f"act_{metric}" in ds.data_vars:
            entries.update(activation_entries(ds[f"act_{metric}"].sel(run=run, step=step),
                                              prefix))
        files[f"{pico_metric_name(metric)}_{split}.json"] = entries
    for name in GEOMETRY:
        if name in ds.data_vars:
            files[f"{name}_{split}.json"] = activation_entries(
                ds[name].sel(run=run, step=step), prefix)
    for name in COMPARATIVE:
        if name not in ds.data_vars:
            continue
        for target in (str(t) for t in ds["target"].values):
            label = name if target == "final" else f"{name}_vs_{target}"
            files[f"{label}_{split}.json"] = activation_entries(
                ds[name].sel(run=run, step=step, target=target), prefix)
    return {f: entries for f, entries in files.items() if entries}


def run_folder(name: str) -> str:
    """The folder name of run `name` under --out: the name itself when it is a plain name
    (letters, digits, `-_.+@=,`, not starting with a dot), else its percent-encoding
    (`x/r` -> `x%2Fr`, `../r` -> `%2E.%2Fr`, `.hidden` -> `%2Ehidden`): one folder per run,
    always inside --out, never a path of several components and never `.` or `..`. Two
    different names never share a folder (percent-encoding is one-to-one)."""
    if not name:
        raise InputError("a run in the store has an empty name; it cannot be exported")
    folder = quote(name, safe="-_.+@=,")
    return "%2E" + folder[1:] if folder.startswith(".") else folder


def _write_json(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=None))


def export(store: str | Path, out: str | Path, *, fmt: str = "pico-analyze",
           run: str | None = None, split: str = "val", prefix: str = DEFAULT_PREFIX
           ) -> list[Path]:
    """Write the store's results in `fmt` under `out`; returns the files written. Existing
    files of the same names are replaced; nothing else in `out` is touched. `prefix` starts
    every layer's key (`layers.`; `_forward_module.layers.` gives the keys of pico-analyze's
    files for a pico-train run)."""
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
    if fmt in ("tensorboard", "wandb"):
        return export_logs(ds, out, fmt, chosen, split, prefix)
    analyzed = ds["analyzed"].load() if "analyzed" in ds.data_vars else None
    written: list[Path] = []
    for r in chosen:
        folder = run_folder(r)
        if len(chosen) > 1 and folder != r:
            warnings.warn(f"run {quoted(r)} is not a plain folder name; it is exported to "
                          f"{out / folder}", stacklevel=2)
        root = out / folder if len(chosen) > 1 else out
        one = ds.sel(run=[r]).load()  # one run in memory: cell reads without dask
        for step in (int(s) for s in ds["step"].values):
            if analyzed is not None and not int(analyzed.sel(run=r, step=step)):
                continue
            files = step_files(one, r, step, split, prefix)
            if not files:
                continue
            folder = root / f"step_{step}"
            folder.mkdir(parents=True, exist_ok=True)
            for name, entries in files.items():
                _write_json(folder / name, entries)
                written.append(folder / name)
    return written





# --- TensorBoard and Weights & Biases -------------------------------------------------------
#
# Both take the same series from a store: for each run and each analysed step, one scalar per
# tag and one histogram of singular values per matrix.
#
#   scalars     "<metric>/<key>": dynlab's metric name (`cn`, not `condition_number`) and
#               the keys above (`per/layers.3.attention.v_proj.weights`,
#               `cn/layers.0.ov_circuit.updates.heads.1`, `anisotropy/layers.2.residual.
#               activations`, ...), one per run/kind/layer/matrix/metric;
#               "training/<name>" for every per-checkpoint value (train_loss, lr, tokens,
#               wall_seconds, gpu_hours, relora_cycle, ppl_macro, blimp_overall) and
#               "training/<name>/<label>" for those per domain, UID or field (ppl, blimp, ...)
#   histograms  "sigma/<key>": the singular values of each layer matrix and embedding (the
#               `sigma` and `emb_sigma` variables, their finite entries)
#
# against the step. TensorBoard: one event-file folder per run, OUT/<run>/ (TensorBoard's own
# notion of a run). W&B: one offline run per dynlab run under OUT/<run>/wandb/ (wandb's
# offline mode: nothing is sent; `wandb sync OUT/<run>/wandb/offline-run-*` uploads it later).

#: per-checkpoint variables that are bookkeeping, not results
BOOKKEEPING = ("analyzed", "prev_step", "act_analyzed", "cmp_analyzed")
#: (run, step, label) variables: their label dimension
LABELLED = ("domain", "uid", "field")


def scalar_series(ds: xr.Dataset, run: str, step: int, split: str = "val",
                  prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """Tag -> value of every scalar the store holds for one (run, step) (see above)."""
    out: dict[str, float] = {}
    suffix = f"_{split}.json"
    dynlab_names = {v: k for k, v in PICO_METRIC_NAMES.items()}
    for name, entries in step_files(ds, run, step, split, prefix).items():
        label = dynlab_names.get(name[:-len(suffix)], name[:-len(suffix)])
        out.update({f"{label}/{key}": v for key, v in entries.items()})
    for name, da in ds.data_vars.items():
        if name in BOOKKEEPING or "run" not in da.dims or "step" not in da.dims:
            continue
        rest = [d for d in da.dims if d not in ("run", "step")]
        if not rest:
            v = _value(da.sel(run=run, step=step).values)
            if v is not None:
                out[f"training/{name}"] = v
        elif len(rest) == 1 and rest[0] in LABELLED:
            vals = da.sel(run=run, step=step).values
            for label, v in zip(da[rest[0]].values, vals, strict=True):
                v = _value(v)
                if v is not None:
                    out[f"training/{name}/{label}"] = v
    return out


def spectra_series(ds: xr.Dataset, run: str, step: int, prefix: str = DEFAULT_PREFIX
                   ) -> dict[str, np.ndarray]:
    """Tag `sigma/<key>` -> the finite singular values of each layer matrix and embedding of
    every kind at (run, step)."""
    out: dict[str, np.ndarray] = {}
    kinds = [str(k) for k in ds["kind"].values] if "kind" in ds.coords else []
    for table, name in (("", "sigma"), ("emb_", "emb_sigma")):
        if name not in ds.data_vars:
            continue
        for kind in kinds:
            da = ds[name].sel(run=run, kind=kind, step=step).values
            for idx in np.ndindex(da.shape[:-1]):
                s = np.asarray(da[idx], dtype=np.float64)
                s = s[np.isfinite(s)]
                if s.size:
                    key = parameter_key(table, idx, ds, DATA_TYPES.get(kind, kind), prefix)
                    out[f"sigma/{key}"] = s
    return out


def histogram_proto(values: np.ndarray, bins: int = 30):
    """TensorBoard's HistogramProto of `values`: min, max, count, sum, sum of squares, and
    `bins` equal-width buckets over [min, max] (bucket_limit: each bucket's right edge)."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    v = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(v, bins=bins if v.max() > v.min() else 1)
    return HistogramProto(min=float(v.min()), max=float(v.max()), num=float(v.size),
                          sum=float(v.sum()), sum_squares=float(np.square(v).sum()),
                          bucket_limit=[float(e) for e in edges[1:]],
                          bucket=[float(c) for c in counts])


class TensorBoardWriter:
    """Event files of one TensorBoard run (a folder), written with tensorboard's own
    EventFileWriter: `scalars(step, {tag: value})`, `histograms(step, {tag: values})`,
    `close()`. No torch, no TensorFlow."""

    def __init__(self, logdir: str | Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(logdir))

    def _add(self, step: int, values: list, wall_time: float | None = None) -> None:
        import time

        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.writer.add_event(Event(wall_time=wall_time or time.time(), step=int(step),
                                    summary=Summary(value=values)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._add(step, [Summary.Value(tag=t, simple_value=float(v)) for t, v in values.items()])

    def histograms(self, step: int, values: dict[str, np.ndarray]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._add(step, [Summary.Value(tag=t, histo=histogram_proto(v))
                         for t, v in values.items()])

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """One offline W&B run (wandb's offline mode: nothing leaves the machine) under
    `<dir>/wandb/`: `scalars(step, {tag: value})`, `histograms(step, {tag: values})`,
    `close()`. `wandb sync <dir>/wandb/offline-run-*` uploads it later."""

    def __init__(self, directory: str | Path, name: str, config: dict | None = None,
                 project: str = "dynlab") -> None:
        import os

        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(mode="offline", console="off", x_disable_stats=True,
                                  x_disable_machine_info=True, save_code=False,
                                  disable_git=True)
        self.wandb = wandb
        self.run = wandb.init(dir=str(directory), project=project, name=name,
                              config=config or {}, settings=settings, reinit="create_new")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=int(step))

    def histograms(self, step: int, values: dict[str, np.ndarray]) -> None:
        self.run.log({t: self.wandb.Histogram(np.asarray(v)) for t, v in values.items()},
                     step=int(step))

    def close(self) -> None:
        """Finish the run and stop wandb's service process, which writes the run's .wandb file
        asynchronously: once this returns, the file is complete on disk."""
        self.run.finish()
        self.wandb.teardown()


def open_logger(fmt: str, directory: str | Path, name: str, config: dict | None = None):
    """A TensorBoardWriter (`tensorboard`) or WandbWriter (`wandb`) writing under `directory`;
    a missing package is an InputError that says how to install it."""
    extra = {"tensorboard": "tensorboard", "wandb": "wandb"}
    if fmt not in extra:
        raise InputError(f"expected tensorboard or wandb, got {fmt!r}")
    try:
        if fmt == "tensorboard":
            return TensorBoardWriter(directory)
        return WandbWriter(directory, name, config)
    except ImportError as err:
        raise InputError(f"{fmt} is not installed: pip install 'dynlab[{extra[fmt]}]' "
                         f"({err})") from err


def export_logs(ds: xr.Dataset, out: Path, fmt: str, runs: list[str], split: str = "val",
                prefix: str = DEFAULT_PREFIX) -> list[Path]:
    """Write every run's scalars and spectra as TensorBoard event files or an offline W&B run,
    always in OUT/<run>/ (section comment above); returns the folder of each run."""
    analyzed = ds["analyzed"].load() if "analyzed" in ds.data_vars else None
    configs = json.loads(ds.attrs.get("run_configs", "{}") or "{}")
    written = []
    for r in runs:
        steps = [int(s) for s in ds["step"].values
                 if analyzed is None or int(analyzed.sel(run=r, step=int(s)))]
        folder = out / r
        one = ds.sel(run=[r]).load()  # one run in memory: cell reads without dask
        logger = open_logger(fmt, folder, r, configs.get(r))
        try:
            for step in steps:
                logger.scalars(step, scalar_series(one, r, step, split, prefix))
                logger.histograms(step, spectra_series(one, r, step, prefix))
        finally:
            logger.close()
        written.append(folder)
    return written
