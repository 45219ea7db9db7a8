"""Metrics that need only the singular values, computed from a store's stored spectra.

Every metric with a `from_spectrum` function (analysis.metrics.METRICS: ER, PER, CN, the norms,
the heavy-tail α, ...) is a function of a matrix's singular values σ (stored in the `*sigma`
variables, NaN past the rank bound) and of its largest dimension max(m, n) (the numerical-
zero tolerance). `spectrum_metric` is the one function that evaluates them: `dynlab analyze`
calls it on freshly computed spectra, and `recompute` on the stored ones, so a metric added
later can be filled into an existing store without the checkpoints and gives the same numbers
as an analysis that computed it from the start.

max(m, n) is not stored; it follows from the run's model shape (the store's `run_configs`
record of the run: run.json's "model", or the config.json of a Hugging Face, pico-train or
relora-pico source, `recorded_spec`): for each cell of each table, the shape of the matrix it
holds (`site_max_dims`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dynlab.analysis import components as C
from dynlab.analysis import metrics as metrics_mod
from dynlab.errors import InputError
from dynlab.runs.checkpoints import ModelSpec


def spectrum_metric(name: str, sigma: torch.Tensor, max_dim: torch.Tensor,
                    convention: str = "dynlab", eps: torch.Tensor | float | None = None,
                    **tol_args) -> torch.Tensor:
    """Metric `name` of spectra sigma (..., K) (descending, NaN-padded) of matrices whose
    largest dimension is max_dim (...) and storage eps `eps` (...); tol_args: the rest of
    the numerical-zero tolerance's inputs (`metrics_mod.zero_tolerance`: min_dim, norm,
    compute_eps, or a precomputed tol), in `convention` (dynlab.analysis.conventions: under "pico",
    cn has no tolerance). Raises InputError for a metric that needs the entries."""
    metric = metrics_mod.METRICS[name]
    if convention == "pico" and name == "cn":
        from dynlab.analysis.conventions import condition_number_pico

        return condition_number_pico(sigma)
    if metric.from_spectrum is None:
        raise InputError(f"metric {name!r} needs the matrix entries, not only the spectrum")
    return metric.from_spectrum(sigma, max_dim, eps, **tol_args)


def site_max_dims(spec: ModelSpec, table: str, n_layers: int, n_heads: int,
                  kind: str = "weights", convention: str = "dynlab") -> np.ndarray:
    """max(m, n) of the matrix in every cell of `table` (shape: the table's dims after (run,
    kind, step)), for a run of model shape `spec`; 1 for cells the run does not have (padding
    of a store holding larger models). Gradients, updates and LoRA products have their
    matrix's shape; only pico's OV matrices (dynlab.analysis.conventions) depend on the kind."""
    shapes = spec.expected_shapes()
    d, hd, h = spec.d_model, spec.head_dim, spec.n_heads
    grads = kind in ("grads", "train_grads")  # conventions.GRADIENT_KINDS
    pico = convention == "pico" and (grads or kind in ("weights", "updates"))
    if table == "layer":
        out = np.ones((n_layers, len(C.MATRICES)))
        for j, name in enumerate(C.MATRICES):
            if name != "ov_circuit":
                dim = max(shapes[f"layers.0.{name}.weight"])
            elif pico:
                dim = h * d if grads else h * hd
            else:
                dim = d
            out[: spec.n_layers, j] = dim
        return out
    if table in ("head", "qk_head"):
        out = np.ones((n_layers, n_heads))
        small = pico and table == "head" and not grads
        out[: spec.n_layers, : spec.n_heads] = hd if small else d
        return out
    if table == "qk":
        out = np.ones(n_layers)
        out[: spec.n_layers] = d
        return out
    if table == "emb":
        return np.array([max(shapes[f"{name}.weight"]) for name in C.EMBEDDINGS], dtype=float)
    raise ValueError(f"unknown table {table!r}")


def recorded_spec(config: dict, where: str) -> ModelSpec:
    """The model shape of a run from the store's record of it (`run_configs`): a dynlab
    run's run.json; a Hugging Face run's config.json (its architecture's adapter,
    dynlab.sources.arch); a pico-train or relora-pico run's config.json (pico's names)."""
    from dynlab.sources.arch import adapter_for, pico_spec

    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InputError(f"{where}: the store's record of the run holds no model object")
    source = config.get("source") if isinstance(config.get("source"), dict) else {}
    fmt = source.get("format")
    model = config["model"]
    if config.get("kind") == "hf" or fmt in ("hf", "hf-hub"):
        return adapter_for(model, Path(where)).spec(model, Path(where))
    if fmt in ("pico-train", "relora-pico"):
        return pico_spec(model, Path(where))
    return ModelSpec.from_run_config(config, where)


def spectrum_metric_names(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Parse --metrics for recompute: only metrics computable from σ are accepted."""
    try:
        names = metrics_mod.parse_metrics(spec)
    except ValueError as e:
        raise InputError(f"--metrics: {e}") from None
    if spec is None or spec == "all" or list(spec) == ["all"]:
        names = tuple(n for n in names if not metrics_mod.METRICS[n].entrywise)
    entrywise = [n for n in names if metrics_mod.METRICS[n].entrywise]
    if entrywise:
        raise InputError(
            f"--metrics: {', '.join(entrywise)} need the matrix entries, not only the stored "
            "spectra; compute them with `dynlab analyze` from the checkpoints")
    return names


def recompute(
    store: str | Path, metrics: str | Sequence[str], *, progress: bool = False
) -> list[str]:
    """Compute `metrics` (only-σ ones) from the stored spectra of every analysed checkpoint
    into the store, adding the metrics to the store's list (and their variables) when new,
    overwriting them when present. Returns the variables written. Needs no checkpoint."""
    from dynlab.analysis.storelock import StoreAccess

    path = Path(store)
    if not (path / "zarr.json").is_file():
        raise InputError(f"{path}: not a Zarr store (expected a store written by dynlab analyze)")
    with StoreAccess(path):  # one writer at a time (dynlab.analysis.storelock)
        return _recompute(path, metrics, progress=progress)


def _recompute(
    store: str | Path, metrics: str | Sequence[str], *, progress: bool = False
) -> list[str]:
    """recompute's work, with the store held."""
    from dynlab.analysis.store import (
        Layout,
        StoreError,
        consolidate,
        open_group_for_update,
        read_attrs,
    )

    path = Path(store)
    if not (path / "zarr.json").is_file():
        raise InputError(f"{path}: not a Zarr store (expected a store written by dynlab analyze)")
    names = spectrum_metric_names(metrics)
    attrs = read_attrs(path)
    if "metrics" not in attrs or "run_configs" not in attrs:
        raise InputError(f"{path}: not a dynlab analysis store (no metrics/run_configs)")
    group = open_group_for_update(path)
    if "sigma" not in group:
        raise InputError(f"{path}: the store holds no spectra ('sigma'); nothing to recompute")
    configs = json.loads(attrs["run_configs"])
    runs = [str(r) for r in group["run"][...]]
    specs = {}
    for run in runs:
        if run not in configs:
            raise StoreError(f"{path}: run {run!r} has no model config in the store")
        specs[run] = recorded_spec(configs[run], f"{path} (run {run!r})")
    stored = list(attrs["metrics"])
    new = [n for n in names if n not in stored]
    layout = Layout(runs, [int(s) for s in group["step"][...]], list(attrs["kinds"]),
                    stored + new, group["layer"].shape[0], group["head"].shape[0],
                    group["sv"].shape[0], group["head_sv"].shape[0], group["emb_sv"].shape[0],
                    configs, convention=attrs.get("convention", "dynlab"))
    add_missing_variables(path, layout)
    group = open_group_for_update(path)
    if new:
        group.attrs.update({"metrics": stored + new})
    analyzed = np.asarray(group["analyzed"][...])
    tables = [(t, s, p) for t, (s, p, _, _) in C.TABLES.items() if s in group]
    written = [prefix + name for _, _, prefix in tables for name in names]
    cells = list(zip(*np.nonzero(analyzed), strict=True))
    bar = _bar(progress, len(cells))
    for i, j in cells:
        spec = specs[runs[i]]
        for table, sigma_var, prefix in tables:
            sig = torch.from_numpy(np.asarray(group[sigma_var][i, :, j], dtype=np.float64))
            max_dim = torch.from_numpy(np.stack([
                site_max_dims(spec, table, layout.n_layers, layout.n_heads, kind,
                              layout.convention) for kind in layout.kinds]))
            tol_args = {}  # the tolerance analyze used, as stored (metrics_mod.zero_tolerance)
            if f"{prefix}tol" in group:
                tol_args["tol"] = torch.from_numpy(
                    np.asarray(group[f"{prefix}tol"][i, :, j], dtype=np.float64))
            for name in names:
                values = spectrum_metric(name, sig, max_dim, layout.convention, **tol_args)
                group[prefix + name][i, :, j] = values.numpy()
        bar()
    if "act_sigma" in group and "act_max_dim" in group:
        written += _recompute_activations(path, names)
    consolidate(path)
    return written


def add_missing_variables(path: Path, layout) -> list[str]:
    """Create the spectral variables of `layout` that the store lacks (new metrics, or the
    QK tables of a store made before them), empty, chunked one (run, step) cell each."""
    from dynlab.analysis.store import (
        create_variable,
        open_group_for_update,
        quiet_zarr,
        spectral_variables,
        template,
    )

    group = open_group_for_update(path)
    specs = template(layout.metrics, {})
    missing = [n for n in spectral_variables(layout.metrics) if n not in group]
    sizes = {d: group[d].shape[0] for d in layout.dims() if d in group}
    with quiet_zarr():
        for name in missing:
            spec = specs[name]
            shape = tuple(sizes[d] for d in spec.dims)
            chunks = tuple(1 if d in ("run", "step") else sizes[d] for d in spec.dims)
            create_variable(group, name, spec.dims, shape=shape, chunks=chunks,
                            dtype=spec.dtype, fill_value=spec.fill, attrs=spec.attrs)
    return missing


def _recompute_activations(path: Path, names: Sequence[str]) -> list[str]:
    """The same for the activation table: act_<metric> from act_sigma and act_max_dim."""
    from dynlab.analysis.store import create_variable, open_group_for_update, quiet_zarr

    group = open_group_for_update(path)
    sig_arr = group["act_sigma"]
    shape, chunks = sig_arr.shape[:-1], (1, 1, *sig_arr.shape[2:-1])
    with quiet_zarr():
        for name in names:
            if f"act_{name}" not in group:
                create_variable(group, f"act_{name}", ("run", "step", "layer", "act_site"),
                                shape=shape, chunks=chunks, attrs={
                                    "long_name": f"{metrics_mod.METRICS[name].long_name} of the "
                                                 "centred activations"})
    done = np.asarray(group["act_analyzed"][...])
    for i, j in zip(*np.nonzero(done), strict=True):
        sig = torch.from_numpy(np.asarray(sig_arr[i, j], dtype=np.float64))
        max_dim = torch.from_numpy(np.nan_to_num(np.asarray(group["act_max_dim"][i, j]),
                                                 nan=1.0))
        for name in names:
            group[f"act_{name}"][i, j] = spectrum_metric(name, sig, max_dim,
                                                         eps=metrics_mod.ACT_EPS).numpy()
    return [f"act_{name}" for name in names]


def _bar(enabled: bool, total: int):
    if not enabled or total == 0:
        return lambda: None
    from rich.progress import Progress

    prog = Progress(transient=True)
    prog.start()
    task = prog.add_task("recompute", total=total)

    def advance():
        prog.update(task, advance=1)
        if prog.tasks[0].completed >= total:
            prog.stop()

    return advance
