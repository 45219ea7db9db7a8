"""Sibling seeds: runs that differ only in their seed, and a view of a store in which the
figures' bands run across those seeds instead of across layers.

`sibling_groups(ds)` groups the store's runs by their run.json (`run_configs`): two runs are
siblings when kind, model and every training option agree except `SEED_FREE` (the seed and
options that do not change training: output folder, threads, progress, device). A group is
named after its first run with the `-s<seed>` suffix dropped when all its runs carry one.

`seed_view(ds, groups)` is a Dataset whose `run` is the group and whose `layer` is the seed:
each run is first reduced over layers (the mean of the finite values; the geometric mean for
LOG_METRICS), then its group's runs are stacked along `layer`. Every figure function that
bands over layers (`figures.trajectory_grid`, `conditioning_grid`, `relora_comparison`)
therefore bands over seeds when given this view: the line is the mean over seeds of each
seed's layer mean, the band its 95% t-interval across seeds. Variables without a layer dim
(train_loss, ppl, ...) are averaged over the group's seeds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import numpy as np
import xarray as xr

from dynlab.viz.figures import LOG_METRICS, run_configs

SEED_FREE = frozenset({"seed", "out", "threads", "progress", "device", "resume", "overwrite",
                       "stop_at", "log_every", "compile", "eval_batch_size"})
SEED_SUFFIX = re.compile(r"-s\d+$")


def _identity(config: Mapping) -> str:
    train = {k: v for k, v in (config.get("train") or {}).items() if k not in SEED_FREE}
    return json.dumps({"kind": config.get("kind"), "model": config.get("model"),
                       "train": train}, sort_keys=True, default=str)


def sibling_groups(ds: xr.Dataset) -> dict[str, list[str]]:
    """{group: [runs]} for every group of at least two runs that differ only in their seed
    (module docstring); {} when no run has a sibling."""
    configs = run_configs(ds)
    by: dict[str, list[str]] = {}
    for run in (str(r) for r in ds["run"].values):
        cfg = configs.get(run)
        if not cfg or not isinstance(cfg.get("train"), Mapping):
            continue
        by.setdefault(_identity(cfg), []).append(run)
    out = {}
    for runs in by.values():
        if len(runs) < 2:
            continue
        base = [SEED_SUFFIX.sub("", r) for r in runs]
        name = base[0] if all(SEED_SUFFIX.search(r) for r in runs) and len(set(base)) == 1 \
            else f"{runs[0]} (+{len(runs) - 1} seeds)"
        out[name] = runs
    return out


def _layer_reduce(da: xr.DataArray, name: str) -> xr.DataArray:
    x = da.where(np.isfinite(da))
    if name in LOG_METRICS:
        return np.exp(np.log(x.where(x > 0)).mean("layer", skipna=True))
    return x.mean("layer", skipna=True)


def seed_view(ds: xr.Dataset, groups: Mapping[str, list[str]]) -> xr.Dataset:
    """The store with runs → groups and layers → seeds (module docstring)."""
    n = max(len(r) for r in groups.values())
    names = list(groups)
    out = {}
    for name, da in ds.data_vars.items():
        if "run" not in da.dims:
            continue
        parts = []
        for g in names:
            sub = da.sel(run=groups[g])
            if "layer" in da.dims:
                sub = _layer_reduce(sub, name).rename(run="layer")
                sub = sub.assign_coords(layer=np.arange(sub.sizes["layer"]))
                sub = sub.reindex(layer=np.arange(n))
            else:
                sub = sub.mean("run", skipna=True)
            parts.append(sub)
        out[name] = xr.concat(parts, dim=xr.DataArray(names, dims="run", name="run"))
    view = xr.Dataset(out)
    view.attrs = dict(ds.attrs)
    configs = run_configs(ds)
    view.attrs["run_configs"] = json.dumps({g: configs.get(runs[0], {})
                                            for g, runs in groups.items()})
    return view


def band_caption(groups: Mapping[str, list[str]]) -> str:
    """The sentence a caption gains when its bands run across seeds."""
    sizes = sorted({len(r) for r in groups.values()})
    n = "–".join(str(s) for s in (sizes[0], sizes[-1])) if len(sizes) > 1 else str(sizes[0])
    return (f" Runs that differ only in their seed are drawn as one line per condition "
            f"({', '.join(groups)}): the mean over its {n} seeds of each seed's layer mean, "
            "with a 95% t-interval across seeds (not across layers); hollow markers mark "
            "steps where some seeds have no finite value.")
