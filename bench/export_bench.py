"""How `dynlab export` (pico-analyze's JSON files) reads a store: every cell through the
lazily opened (dask-backed) store, what export did before, versus one run loaded into memory
first (`export`'s way now). Both write the same files; prints the seconds of each and their
ratio, measured in this process, and checks that the files are equal.

    python bench/export_bench.py [--runs 2] [--steps 6] [--layers 2]

The store is a synthetic one written by dynlab.analysis.store's writer: every run, kind, step,
layer and matrix holds a value of every metric (tests/viz_fixtures.py's shape when run from
the repository, with --steps and --layers as given).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def write_store(path: Path, runs: int, steps: int, layers: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import viz_fixtures as vf

    ds = vf.make_dataset()
    names = [f"run{i}" for i in range(runs)]
    ds = ds.isel(run=[i % ds.sizes["run"] for i in range(runs)]).assign_coords(run=names)
    ds = ds.isel(step=[i % ds.sizes["step"] for i in range(steps)],
                 layer=[i % ds.sizes["layer"] for i in range(layers)])
    ds = ds.assign_coords(step=list(range(0, 10 * steps, 10)), layer=list(range(layers)))
    return vf.write_dataset(ds, path)


def files_lazily(store: Path) -> dict[tuple[str, int], dict]:
    """The earlier way: step_files on the lazily opened store (a dask compute per cell)."""
    from dynlab.analysis.export import step_files
    from dynlab.analysis.store import open_store

    ds = open_store(store)
    return {(str(r), int(s)): step_files(ds, str(r), int(s), "val")
            for r in ds.run.values for s in ds.step.values}


def files_loaded(store: Path) -> dict[tuple[str, int], dict]:
    """export's way: one run in memory, then step_files."""
    from dynlab.analysis.export import step_files
    from dynlab.analysis.store import open_store

    ds = open_store(store)
    out = {}
    for r in ds.run.values:
        one = ds.sel(run=[r]).load()
        out.update({(str(r), int(s)): step_files(one, str(r), int(s), "val")
                    for s in ds.step.values})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "s.zarr", args.runs, args.steps, args.layers)
        t = time.perf_counter()
        lazy = files_lazily(store)
        t_lazy = time.perf_counter() - t
        t = time.perf_counter()
        loaded = files_loaded(store)
        t_loaded = time.perf_counter() - t
    assert lazy == loaded, "the two ways wrote different files"
    n = sum(len(v) for f in loaded.values() for v in f.values())
    print(f"store: {args.runs} runs x {args.steps} steps x {args.layers} layers, {n} values")
    print(f"cell by cell (lazy store): {t_lazy:8.2f} s")
    print(f"one run loaded first     : {t_loaded:8.2f} s")
    print(f"ratio                    : {t_lazy / t_loaded:8.1f}x")


if __name__ == "__main__":
    main()
