"""The study an analysis store holds, found from the store alone, and its claims.

A store holds a study when either

    beside     it is OUT/analysis.zarr of `dynlab study run` and OUT/study.json (the grid,
               `runner.read_design`) names runs the store has; each run's folder is
               OUT/runs/<run>
    seeds      its runs fall into groups of sibling seeds (`dynlab.viz.seeds.sibling_groups`:
               runs whose run.json agree except for the seed) with a decoder group and a
               relora group of the same scale (the run.json's `train.preset`, else the model's
               width and depth); each group is a condition, each run's seed its
               `train.seed`, its folder the run.json's `train.out` when that still holds a
               metrics.jsonl

and `store_claims` judges that design's claims (`claims.judge(claims.observe(...))`), the
same table `dynlab study report` prints. None when the store holds no study (a decoder and a
relora condition of one scale are needed for any claim).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import xarray as xr

from dynlab.experiment.claims import ClaimResult, judge, observe, scales_of
from dynlab.experiment.runner import DESIGN_NAME, STORE_NAME, read_design

#: where a design came from (`StoreStudy.source`)
SOURCES = ("study.json", "sibling seeds")


def store_runs(ds: xr.Dataset) -> list[str]:
    return [str(r) for r in ds["run"].values] if "run" in ds.coords else []


def design_beside(store: str | Path, ds: xr.Dataset) -> tuple[dict, dict[str, Path]] | None:
    """(design, run folders) from OUT/study.json when `store` is OUT/analysis.zarr and the
    grid names at least one of the store's runs; None otherwise. A study.json that is not
    the grid raises InputError (runner.read_design)."""
    store = Path(store)
    out = store.parent
    if store.name != STORE_NAME or not (out / DESIGN_NAME).is_file():
        return None
    design = read_design(out)
    if not set(design["runs"]) & set(store_runs(ds)):
        return None
    return design, {run: out / "runs" / run for run in design["runs"]}


def scale_of(config: Mapping) -> str:
    """A run's scale: its run.json's train.preset, else 'd<d_model>×<n_layers>' (×… when known)."""
    preset = (config.get("train") or {}).get("preset")
    if preset:
        return str(preset)
    model = config.get("model") or {}
    layers = model.get("n_layers")
    return f"d{model.get('d_model', '?')}" + ("" if layers is None else f"×{layers}")


def design_from_seeds(ds: xr.Dataset, name: str = "store"
                      ) -> tuple[dict, dict[str, Path]] | None:
    """(design, run folders) from the store's groups of sibling seeds (module docstring);
    None when no scale has both a decoder and a relora group. A run whose seed repeats one
    of its group's is left out (a design has one run per condition and seed)."""
    from dynlab.viz.figures import run_configs
    from dynlab.viz.seeds import sibling_groups

    configs = run_configs(ds)
    conditions, runs, dirs = [], {}, {}
    for group, members in sibling_groups(ds).items():
        first = configs[members[0]]
        kind = str(first.get("kind") or (first.get("train") or {}).get("kind"))
        conditions.append({"name": group, "kind": kind, "scale": scale_of(first)})
        seen: set[int] = set()
        for run in members:
            train = configs[run].get("train") or {}
            seed = train.get("seed")
            if not isinstance(seed, int) or seed in seen:
                continue
            seen.add(seed)
            runs[run] = {"condition": group, "seed": seed, "kind": kind}
            folder = train.get("out")
            if folder and (Path(folder) / "metrics.jsonl").is_file():
                dirs[run] = Path(folder)
    design = {"name": name, "conditions": conditions, "runs": runs}
    return (design, dirs) if scales_of(design) else None


def store_design(store: str | Path, ds: xr.Dataset
                 ) -> tuple[dict, dict[str, Path], str] | None:
    """(design, run folders, source) of the study `store` holds (module docstring: beside
    first, else sibling seeds), or None."""
    found = design_beside(store, ds)
    if found is not None:
        return (*found, SOURCES[0])
    found = design_from_seeds(ds, Path(store).name)
    return None if found is None else (*found, SOURCES[1])


def store_claims(store: str | Path, ds: xr.Dataset | None = None
                 ) -> tuple[dict, list[ClaimResult], str] | None:
    """(design, claims table, source) of the study `store` holds, or None (module
    docstring). `ds`: the store opened already (else it is opened here)."""
    if ds is None:
        from dynlab.viz.report import open_store

        ds = open_store(store)
    found = store_design(store, ds)
    if found is None:
        return None
    design, dirs, source = found
    return design, judge(observe(ds, design, dirs), design), source
