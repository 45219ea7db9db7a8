"""What a small analysis spends before its first checkpoint is read, and on what.

Each round starts fresh interpreters (alternating, so load changes hit every phase alike):

  python        `python -c pass`: the interpreter itself
  torch floor   `python -c "import torch"`: what any analysis must pay
  phases        one process that imports the command line (typer, rich), then the analysis
                (torch, numpy: `dynlab.analysis`), then runs `dynlab.analyze` on one
                checkpoint of one matrix of a dynlab run (the store's creation, the read and
                the write), timing each phase, and lists which optional heavy packages were
                imported at all (they should not be: Dask only with --scheduler,
                transformers only for Hugging Face sources, plotly/xarray only for figures
                and reading stores).
  importtime    `python -X importtime -m dynlab analyze ...` of the same job: the packages
                that cost most to import, cumulative.

    python bench/startup_bench.py [--rounds 3] [--workdir /tmp/dynlab-startup]

Record the figures with `uptime` in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPTIONAL = ("dask", "distributed", "transformers", "huggingface_hub", "plotly", "xarray",
            "scipy", "pandas")

CHILD = f"OPTIONAL = {OPTIONAL!r}\n" + r"""
import json, sys, time
t0 = time.perf_counter()
import dynlab_cli.main  # noqa: F401  the command line (typer, rich)
t1 = time.perf_counter()
import dynlab.analysis  # noqa: F401  torch, numpy
t2 = time.perf_counter()
import dynlab
marks = []
dynlab.analyze([sys.argv[1]], sys.argv[2], metrics="per", kinds="weights", steps="0",
               matrices="swiglu.w_2", device="cpu", progress=False,
               on_checkpoint=lambda task: marks.append(time.perf_counter()))
t3 = time.perf_counter()
print(json.dumps({"cli": t1 - t0, "analysis imports": t2 - t1, "analyze call": t3 - t2,
                  "modules": [m for m in OPTIONAL if m in sys.modules]}))
"""


def wall(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def importtime(run: Path, out: Path, env: dict, top: int = 12) -> list[tuple[str, float]]:
    """The `top` packages by import time, in seconds: per package (a module name's first
    component) the cumulative time of its outermost imports, so that torch imported by
    dynlab counts for torch (and for dynlab too)."""
    cmd = [sys.executable, "-X", "importtime", "-m", "dynlab", "analyze", str(run), "-o",
           str(out), "--metrics", "per", "--kinds", "weights", "--steps", "0", "--matrices",
           "swiglu.w_2", "--device", "cpu", "--no-progress"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum, name = line.split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((depth, name.strip().split(".")[0], int(cum) / 1e6))
    per_pkg: dict[str, float] = {}
    stack: list[tuple[int, str]] = []
    for depth, pkg, cum in reversed(rows):  # importtime prints children before parents
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if all(p != pkg for _, p in stack):
            per_pkg[pkg] = per_pkg.get(pkg, 0.0) + cum
        stack.append((depth, pkg))
    return sorted(per_pkg.items(), key=lambda kv: -kv[1])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    from dynlab.runs.checkpoints import ModelSpec
    from dynlab.testing import make_run

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dynlab-startup-"))
    run = work / "run"
    if not (run / "run.json").exists():
        make_run(run, ModelSpec(d_model=96, n_layers=12, n_heads=12, n_kv_heads=4,
                                activation_hidden_dim=384, vocab_size=2048), [0, 100])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    figures: dict[str, list[float]] = {}
    modules: list[str] = []
    print(f"load before: {os.getloadavg()}")
    for r in range(args.rounds):
        figures.setdefault("python", []).append(wall([sys.executable, "-c", "pass"], env))
        figures.setdefault("torch floor", []).append(
            wall([sys.executable, "-c", "import torch"], env))
        store = work / f"s{r}.zarr"
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, str(run), str(store)], env=env,
                           capture_output=True, text=True, check=True)
        figures.setdefault("whole process", []).append(time.perf_counter() - t)
        phases = json.loads(p.stdout.strip().splitlines()[-1])
        modules = phases.pop("modules")
        for k, v in phases.items():
            figures.setdefault(k, []).append(v)
    print(f"\nmedians of {args.rounds} rounds (s):")
    for k, v in figures.items():
        print(f"  {k:18s} {statistics.median(v):6.2f}   {[round(x, 2) for x in v]}")
    print(f"  optional packages imported by the job: {', '.join(modules) or 'none'}")
    print("\ncumulative import time by package (python -X importtime, one run):")
    for pkg, sec in importtime(run, work / "it.zarr", env):
        print(f"  {pkg:18s} {sec:6.2f}")
    print(f"\nload after: {os.getloadavg()}")
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"SUMMARY whole_process={med['whole process']:.2f}s "
          f"torch_floor={med['torch floor']:.2f}s python={med['python']:.2f}s "
          f"optional_imports={','.join(modules) or 'none'} load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
