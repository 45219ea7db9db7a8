"""Benchmark `dynlab analyze` against the real pico-analyze, as whole processes, on the same
run, components, steps and metrics; and check that their values agree.

pico-analyze is not part of dynlab and is never installed into dynlab's environment. Get it
at a pinned commit, with its own virtual environment and its documented dependencies
(pyproject.toml: huggingface-hub, torch, datasets, rich, wandb; pre-commit is a development
tool and not needed), outside this repository:

    git clone https://github.com/pico-lm/pico-analyze /work/pico-analyze-src
    git -C /work/pico-analyze-src checkout c4a4e84        # the commit these figures used
    python -m venv /work/pa-venv
    /work/pa-venv/bin/pip install torch==2.13.0           # first, so nothing resolves another
    /work/pa-venv/bin/pip install 'huggingface-hub[cli]==0.25.2' datasets==3.2.0 \\
        rich==13.9.4 wandb==0.19.5 pyyaml click torch==2.13.0

Then, from dynlab's environment:

    python bench/pico_analyze_bench.py --pico-analyze /work/pico-analyze-src \\
        --pico-python /work/pa-venv/bin/python [--checkpoints 20] [--rounds 2] [--threads 1]

The script writes a pico-train-layout run of pico-tiny's shapes (d 96, 12 layers, 12 heads /
4 kv heads, hidden 384, vocabulary 50 304; `dynlab.testing.make_pico_run`: model.safetensors
and learning_dynamics/{train,val}_{gradients,weights,activations}.pt at every checkpoint,
the last with val only, as pico-train writes them; laid out as a 2-device run, whose
activations both tools read as stored). Two jobs, each run by both tools, alternating
(ABAB...) after an untimed warm-up round (`--warmup`), fresh outputs each time, OMP/MKL threads
and torch threads set alike, Python's bytecode caching on for both:

  simple+OV   per and condition_number of the weights and the (val) gradients of
              attention.v_proj, attention.o_proj, swiglu.w_2 (pico-train's layer_suffixes)
              and the OV circuit, every layer and every step.
              dynlab analyze RUN --metrics per,cn --kinds weights,grads --convention pico
                  --matrices attention.v_proj,attention.o_proj,swiglu.w_2,ov_circuit
  everything  the same components with every metric pico-analyze has (per,
              condition_number, gini, hoyer, norm (frobenius; pico-analyze keeps one norm
              per analysis)) and CKA and PWCCA of the three modules' activations against the
              last step. dynlab adds its nuclear and inf norms and the rest of its activation
              metrics (its activation analysis computes all of them).

Values: dynlab's store is exported in pico-analyze's layout (`dynlab.analysis.export`) and
every value pico-analyze wrote is compared with dynlab's (relative difference; pico-analyze
computes in float32). Condition numbers above 1e5 are rank-deficient matrices (every OV
gradient, of rank <= 2·hd, is one) whose smallest singular value is rounding noise in either
tool: they are counted, and only checked to be large in both.

Prints seconds, ratios pico-analyze / dynlab (above 1: dynlab faster) and the machine's load,
and one line per job starting with `SUMMARY`. `--baseline TREE` also times another dynlab
source tree (an earlier commit, e.g. `git archive OLD | tar -x -C TREE`: its dynlab/ and cli/
come first on PYTHONPATH), alternately with the others, for before/after ratios; `--no-pico` leaves
pico-analyze out (dynlab and the baseline only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODULES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
PICO_TINY = dict(d_model=96, n_layers=12, n_heads=12, n_kv_heads=4, activation_hidden_dim=384,
                 vocab_size=50304)
PREFIX = "_forward_module.module.layers."  # a 2-device pico-train run's module names
#: pico-analyze metric file -> dynlab's exported file
FILES = {"per": "per", "condition_number": "condition_number", "gini": "gini",
         "hoyer": "hoyer", "norm": "frobenius_norm", "cka": "cka", "pwcca": "pwcca"}
RANK_DEFICIENT_CN = 1e5


def write_run(run: Path, n_ckpt: int) -> list[int]:
    from dynlab.runs.checkpoints import ModelSpec
    from dynlab.testing import make_pico_run

    steps = [i * 1000 for i in range(n_ckpt)]
    if not (run / "checkpoints" / f"step_{steps[-1]}" / "model.safetensors").exists():
        shutil.rmtree(run, ignore_errors=True)
        make_pico_run(run, ModelSpec(**PICO_TINY), steps, ld_batch=128, devices=2)
    return steps


def components(data_types: tuple[str, ...], layers: list[int]) -> list[dict]:
    out = [{"component_name": "simple", "data_type": dt, "layer_suffixes": m, "layers": layers}
           for dt in data_types for m in MODULES]
    if "activations" not in data_types:
        out += [{"component_name": "ov_circuit", "data_type": dt, "layers": layers,
                 "layer_suffixes": {"output_layer": "attention.o_proj",
                                    "value_layer": "attention.v_proj"}}
                for dt in data_types]
    return out


def pico_config(job: str, steps: list[int], out: Path) -> dict:
    layers = list(range(PICO_TINY["n_layers"]))
    params = components(("weights", "gradients"), layers)
    metrics = [{"metric_name": m, "data_split": "val", "components": params}
               for m in ("per", "condition_number")]
    if job == "everything":
        metrics += [{"metric_name": m, "data_split": "val", "components": params}
                    for m in ("gini", "hoyer")]
        metrics.append({"metric_name": "norm", "norm_type": "frobenius", "data_split": "val",
                        "components": params})
        acts = components(("activations",), layers)
        metrics += [{"metric_name": m, "target_checkpoint": steps[-1], "data_split": "val",
                     "components": acts} for m in ("cka", "pwcca")]
    return {"analysis_name": job, "metrics": metrics, "steps": steps,
            "monitoring": {"output_dir": str(out), "save_to_wandb": False}}


def dynlab_args(job: str, run: Path, store: Path, threads: int) -> list[str]:
    metrics = "per,cn" if job == "simple+OV" else \
        "per,cn,gini,hoyer,frobenius_norm,nuclear_norm,inf_norm"
    args = [sys.executable, "-m", "dynlab", "analyze", str(run), "-o", str(store),
            "--metrics", metrics, "--kinds", "weights,grads", "--convention", "pico",
            "--matrices", ",".join(MODULES) + ",ov_circuit", "--device", "cpu",
            "--threads", str(threads), "--no-progress"]
    args.append("--no-activations" if job == "simple+OV" else "--activations")
    return args


def environment(threads: int) -> dict:
    """The timed processes' environment: this one with the thread counts set, offline, and
    Python's default bytecode caching (PYTHONDONTWRITEBYTECODE removed: where it is set, as
    in some sandboxes, each tool would compile its own sources on every run)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def tree_environment(env: dict, tree: Path, workdir: Path) -> dict:
    """`env` with another dynlab source tree first on PYTHONPATH, and its `cli/` importable
    as `dynlab_cli` (through a link in `workdir`, the tree left as it is). The dynlab
    processes run in the work folder: `python -m` puts the current folder before PYTHONPATH,
    so run from a dynlab checkout they would import that checkout's dynlab instead."""
    shim = workdir / "baseline-shim"
    shim.mkdir(exist_ok=True)
    link = shim / "dynlab_cli"
    if link.is_symlink() and link.resolve() != (tree / "cli").resolve():
        link.unlink()
    if not link.is_symlink():
        link.symlink_to((tree / "cli").resolve(), target_is_directory=True)
    return {**env, "PYTHONPATH": os.pathsep.join([str(tree), str(shim)])}


#: CPU seconds (user + system) of each timed command, by command name, in order
CPU: dict[str, list[float]] = {}


def timed(cmd: list[str], env: dict, cwd: Path | None = None, name: str = "") -> float:
    """Wall seconds of a whole process; its CPU seconds (user + system, from the children's
    rusage) are appended to CPU[name]: on a shared machine the CPU time is the steadier
    figure."""
    import resource

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    t, c = time.perf_counter(), cpu()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    CPU.setdefault(name, []).append(cpu() - c)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return dt


def compare(pico_out: Path, dyn_out: Path) -> dict[str, tuple[int, float, int]]:
    """file -> (values compared, largest relative difference, rank-deficient cn pairs)."""
    result = {}
    for step_dir in sorted(pico_out.glob("step_*")):
        for f in sorted(step_dir.glob("*_val.json")):
            metric = f.stem.removesuffix("_val")
            mine = dyn_out / step_dir.name / f"{FILES[metric]}_val.json"
            theirs = json.loads(f.read_text())
            ours = json.loads(mine.read_text()) if mine.exists() else {}
            n, worst, deficient = result.get(metric, (0, 0.0, 0))
            for key, value in theirs.items():
                if key not in ours:
                    worst = math.inf  # a value pico-analyze has and dynlab not
                    continue
                a, b = float(value), float(ours[key])
                if metric == "condition_number" and max(a, b) > RANK_DEFICIENT_CN:
                    deficient += 1
                    if min(a, b) <= RANK_DEFICIENT_CN:
                        worst = math.inf
                    continue
                n += 1
                worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
            result[metric] = (n, worst, deficient)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pico-analyze", type=Path, default=os.environ.get("PICO_ANALYZE"),
                    help="pico-analyze's source folder (its scripts/analyze.py; default: "
                    "$PICO_ANALYZE)")
    ap.add_argument("--pico-python", type=Path, default=os.environ.get("PICO_ANALYZE_PYTHON"),
                    help="the Python of pico-analyze's own virtual environment (default: "
                    "$PICO_ANALYZE_PYTHON)")
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed rounds first (each tool's bytecode caches, the page cache)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", default="simple+OV,everything")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dynlab-pico-bench"))
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another dynlab source tree (e.g. `git archive` of an earlier commit), "
                         "timed alternately with this one: before/after ratios")
    ap.add_argument("--no-pico", action="store_true",
                    help="time dynlab (and --baseline) only, without pico-analyze")
    args = ap.parse_args()
    if args.no_pico:
        args.pico_analyze = args.pico_python = None
    elif args.pico_analyze is None or args.pico_python is None:
        sys.exit("--pico-analyze and --pico-python (or $PICO_ANALYZE, $PICO_ANALYZE_PYTHON) are "
                 "needed, or --no-pico (see this script's docstring)")
    elif not (Path(args.pico_analyze) / "scripts" / "analyze.py").is_file():
        sys.exit(f"{args.pico_analyze}: no scripts/analyze.py (see this script's docstring)")
    elif not Path(args.pico_python).is_file():
        sys.exit(f"{args.pico_python}: no such Python (see this script's docstring)")
    else:
        args.pico_analyze, args.pico_python = Path(args.pico_analyze), Path(args.pico_python)
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = args.workdir / "pico-tiny"
    steps = write_run(run, args.checkpoints)
    env = environment(args.threads)
    print(f"run: {run} ({len(steps)} checkpoints, pico-tiny shapes), threads {args.threads}, "
          f"load before: {os.getloadavg()}")
    for job in args.jobs.split(","):
        cfg_path = args.workdir / f"{job}.yaml"
        pico_out = args.workdir / f"pico-out-{job}"
        import yaml

        cfg_path.write_text(yaml.safe_dump(pico_config(job, steps, pico_out)))
        store = args.workdir / f"dynlab-{job}.zarr"
        tools = ["dynlab"] + ["dynlab-baseline"] * (args.baseline is not None) + \
            ["pico-analyze"] * (not args.no_pico)
        times: dict[str, list[float]] = {tool: [] for tool in tools}
        for round_ in range(-args.warmup, args.rounds):
            if round_ == 0:  # the warm-up rounds (bytecode caches, page cache) are not kept
                times = {tool: [] for tool in tools}
                for tool in tools:
                    CPU.pop(tool, None)
            for tool in tools:
                if tool == "dynlab":
                    shutil.rmtree(store, ignore_errors=True)
                    times[tool].append(timed(dynlab_args(job, run, store, args.threads), env,
                                             cwd=args.workdir, name=tool))
                elif tool == "dynlab-baseline":
                    base_store = args.workdir / f"dynlab-baseline-{job}.zarr"
                    shutil.rmtree(base_store, ignore_errors=True)
                    times[tool].append(timed(dynlab_args(job, run, base_store, args.threads),
                                             tree_environment(env, args.baseline, args.workdir),
                                             cwd=args.workdir, name=tool))
                else:
                    shutil.rmtree(pico_out, ignore_errors=True)
                    cmd = [str(args.pico_python), "-m", "scripts.analyze", "--config_path",
                           str(cfg_path), "--run_path", str(run)]
                    times[tool].append(timed(cmd, env, cwd=args.pico_analyze, name=tool))
        t_d = statistics.median(times["dynlab"])
        c = {tool: statistics.median(CPU[tool][-args.rounds:]) for tool in tools}
        summary = (f"SUMMARY job={job} checkpoints={len(steps)} dynlab={t_d:.1f}s "
                   f"(cpu {c['dynlab']:.1f}s)")
        if args.baseline is not None:
            t_b = statistics.median(times["dynlab-baseline"])
            print(f"\n[{job}] dynlab now {t_d:.1f} s {[round(t, 1) for t in times['dynlab']]}, "
                  f"baseline {t_b:.1f} s {[round(t, 1) for t in times['dynlab-baseline']]}: "
                  f"baseline / now = {t_b / t_d:.2f}x; CPU seconds now "
                  f"{[round(t, 1) for t in CPU['dynlab'][-args.rounds:]]}, baseline "
                  f"{[round(t, 1) for t in CPU['dynlab-baseline'][-args.rounds:]]}: "
                  f"{c['dynlab-baseline'] / c['dynlab']:.2f}x")
            summary += (f" baseline={t_b:.1f}s (cpu {c['dynlab-baseline']:.1f}s) "
                        f"baseline/now={t_b / t_d:.2f}x "
                        f"(cpu {c['dynlab-baseline'] / c['dynlab']:.2f}x)")
        if args.no_pico:
            print(f"{summary} load={os.getloadavg()[0]:.1f}")
            continue
        t_p = statistics.median(times["pico-analyze"])
        summary += (f" pico-analyze={t_p:.1f}s (cpu {c['pico-analyze']:.1f}s) "
                    f"pico-analyze/dynlab={t_p / t_d:.2f}x "
                    f"(cpu {c['pico-analyze'] / c['dynlab']:.2f}x)")
        from dynlab.analysis.export import export

        dyn_out = args.workdir / f"dynlab-export-{job}"
        shutil.rmtree(dyn_out, ignore_errors=True)
        export(store, dyn_out, prefix=PREFIX)
        agree = compare(pico_out / job, dyn_out)
        print(f"\n[{job}] {len(steps)} checkpoints, medians of {args.rounds} alternating rounds")
        print(f"  dynlab        {t_d:7.1f} s   {[round(t, 1) for t in times['dynlab']]}")
        print(f"  pico-analyze  {t_p:7.1f} s   {[round(t, 1) for t in times['pico-analyze']]}")
        print(f"  pico-analyze / dynlab = {t_p / t_d:5.2f}x")
        for metric, (n, worst, deficient) in sorted(agree.items()):
            extra = f", {deficient} rank-deficient cn (> {RANK_DEFICIENT_CN:g} in both)" \
                if deficient else ""
            print(f"  {metric:17s} {n:5d} values, max relative difference {worst:.1e}{extra}")
        print(f"{summary} load={os.getloadavg()[0]:.1f}")
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
