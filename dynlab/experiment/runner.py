"""`dynlab study run`: every (condition, seed) of a study trained, evaluated and analysed into
one store, by composing the library's own commands:

    train     dynlab.train(kind, config=..., out=OUT/runs/<condition>-s<seed>, seed=...)
    evaluate  dynlab.eval.evaluate_run (the study file's `eval:`), checkpoints without eval.json
    analyze   dynlab.analyze(every finished run, out=OUT/analysis.zarr)

Layout: OUT/study.json (the grid, written atomically), OUT/runs/<run>/, OUT/analysis.zarr.

Every guarantee of the three commands holds: a run whose final checkpoint exists is skipped;
an interrupted run is continued exactly (the trainer's own rule: rerunning the options of an
unfinished run resumes it); a checkpoint evaluated already (eval.json) is not evaluated
again; the analysis skips what the store holds. So a study killed at any moment and run again
gives the store an uninterrupted run gives. A run that fails (bad options, a diverged loss)
is reported after the others have finished; completed runs are analysed and kept.

Where the train+evaluate units run (`analysis` always runs once, in this process, as the
store's only writer, or on the same Dask cluster):

    sequential   in this process (default)
    jobs=N       N local processes (multiprocessing, spawn), CPU threads divided among them
    scheduler    a Dask cluster, 'local:N' or 'tcp://HOST:PORT' (as `dynlab analyze`)
    slurm        one submitit job per unit (the study file's `slurm:` parameters); a unit
                 with `nproc: N` runs `dynlab train --nproc N` (torchrun) inside its job
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynlab.errors import DynlabFailure, InputError
from dynlab.experiment.studyfile import Study, Unit, training_options

#: the phases of a unit, in order (progress lines and results name them)
PHASES = ("train", "eval", "analyze")
STORE_NAME = "analysis.zarr"
DESIGN_NAME = "study.json"


@dataclass
class UnitResult:
    """What happened to one (condition, seed)."""

    run: str
    status: str  # "ok" | "failed"
    trained: str = ""  # "skipped" (finished before) | "trained"
    evaluated: int = 0  # checkpoints evaluated now
    seconds: float = 0.0
    error: str = ""
    bad_input: bool = False


@dataclass
class StudyResult:
    """The outcome of `run_study`."""

    out: Path
    store: Path | None
    units: list[UnitResult] = field(default_factory=list)

    @property
    def failed(self) -> list[UnitResult]:
        return [u for u in self.units if u.status != "ok"]


# ---------------------------------------------------------------- one unit (any process)


def unit_steps(unit: Unit) -> int:
    """The number of updates the unit's run makes (its options resolved as `dynlab train`)."""
    from dynlab.training.config import make_config

    return int(make_config(unit.kind, training_options(unit.options), unit.config)
               .resolved().steps)


def finished(run_dir: Path, steps: int) -> bool:
    """Whether run_dir holds the run's final complete checkpoint (step `steps`)."""
    from dynlab.runs.layout import complete_checkpoints

    return any(step >= steps for step, _ in complete_checkpoints(run_dir))


def thread_share(options: dict[str, Any], kind: str, config: Path | None, cap: int) -> int:
    """CPU threads of each process of one unit when `cap` threads are the unit's share of
    the machine: the share divided among the unit's `nproc` torchrun processes, or the
    unit's own (the preset's, e.g. micro's 1) when that is below it."""
    from dynlab.training.config import make_config

    cap = max(1, cap // max(1, int(options.get("nproc") or 1)))
    own = make_config(kind, training_options(options), config).resolved().threads
    return max(1, min(int(own), cap) if own else cap)


def train_argv(unit: Unit, run_dir: Path) -> list[str]:
    """`dynlab train KIND ...` arguments reproducing a unit's options (for --nproc N, which
    starts torchrun processes running this command line)."""
    args = [unit.kind, f"--out={run_dir}", "--no-progress"]
    if unit.config is not None:
        args.append(f"--config={unit.config}")
    flags = {"activation_hidden_dim": "hidden_dim"}
    for name, value in unit.options.items():
        if name in ("nproc", "progress") or value is None:
            continue
        flag = "--" + flags.get(name, name).replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            if name == "paper_compat":
                args.append("--no-paper-compat")
        else:
            args.append(f"{flag}={value}")
    return args


def train_unit(unit: Unit, run_dir: Path, steps: int) -> str:
    """Phase train: 'skipped' when the run is finished, else train (a rerun of an
    interrupted run continues it) and return 'trained'."""
    if finished(run_dir, steps):
        return "skipped"
    options = training_options(unit.options)
    nproc = unit.options.get("nproc")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if nproc and nproc > 1:  # exactly `dynlab train --nproc N` (cli/train.py's launch)
        from dynlab.training.ddp import launch
        from dynlab.training.trainer import check_launch

        cfg = check_launch(unit.kind, nproc, config=unit.config, out=str(run_dir), **options)
        code = launch(nproc, ["-m", "dynlab", "train", *train_argv(unit, run_dir)],
                      threads=cfg.threads)
        if code:
            raise DynlabFailure(f"{unit.run}: `dynlab train --nproc {nproc}` exited {code}")
        return "trained"
    import dynlab

    dynlab.train(unit.kind, config=unit.config, out=str(run_dir), progress=False, **options)
    return "trained"


def eval_unit(unit: Unit, run_dir: Path, spec: dict[str, Any] | None) -> int:
    """Phase eval: evaluate (dynlab.eval.evaluate_run) every complete checkpoint of the run
    that has no eval.json yet; returns how many. Nothing when the study has no `eval:`."""
    if spec is None:
        return 0
    from dynlab.eval import evaluate_run
    from dynlab.runs.layout import complete_checkpoints

    todo = [p for _, p in complete_checkpoints(run_dir) if not (p / "eval.json").is_file()]
    if not todo:
        return 0
    ppl, blimp = (None if spec.get(k) in (None, "default") else str(spec[k])
                  for k in ("ppl", "blimp"))
    options = dict(uid=spec.get("uid"), limit=spec.get("limit"),
                   batch_size=int(spec.get("batch_size", 32)),
                   device=str(spec.get("device", "cpu")))
    everything = len(todo) == len(complete_checkpoints(run_dir))
    for target in [run_dir] if everything else todo:  # one data load for a whole run
        evaluate_run(target, ppl, blimp, **options)
    return len(todo)


def run_unit(spec: dict[str, Any]) -> UnitResult:
    """Train and evaluate one unit (spec: see `unit_specs`); runs in any process (a local
    job, a Dask worker, a Slurm job). A failure is returned, not raised, so the other units
    go on; Ctrl-C is raised."""
    import warnings

    unit, run_dir = spec["unit"], Path(spec["run_dir"])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    out = UnitResult(unit.run, "ok")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "continuing it": the study says so itself
            out.trained = train_unit(unit, run_dir, spec["steps"])
        out.evaluated = eval_unit(unit, run_dir, spec["eval"])
    except KeyboardInterrupt:
        raise
    except Exception as err:  # reported with the unit's name after the others finish
        from dynlab.errors import EXIT_BAD_INPUT, DynlabError

        bad = isinstance(err, InputError) or (
            not isinstance(err, DynlabError)
            and isinstance(err, ValueError | FileNotFoundError | FileExistsError | KeyError))
        out.status, out.error = "failed", f"{type(err).__name__}: {err}"
        out.bad_input = bad or getattr(err, "exit_code", None) == EXIT_BAD_INPUT
    out.seconds = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------- the study (this process)


def unit_specs(study: Study, out: Path, threads: int | None = None) -> list[dict[str, Any]]:
    """One picklable spec per unit: the unit, its run directory, its number of steps, its
    CPU threads (None: its own) and the study's evaluation options."""
    specs = []
    for unit in study.units():
        share = None if threads is None else thread_share(unit.options, unit.kind,
                                                          unit.config, threads)
        if share is not None:
            unit = Unit(unit.condition, unit.seed, unit.kind, unit.run,
                        {**unit.options, "threads": share}, unit.config)
        specs.append({"unit": unit, "run_dir": str(out / "runs" / unit.run),
                      "steps": unit_steps(unit), "threads": share, "eval": study.eval})
    return specs


def write_design(study: Study, out: Path) -> Path:
    """OUT/study.json: the grid (conditions, seeds, run names), replaced atomically."""
    from dynlab.runs.files import write_json

    out.mkdir(parents=True, exist_ok=True)
    path = out / DESIGN_NAME
    write_json(path, study.design())
    return path


def read_design(out: str | Path) -> dict:
    """OUT/study.json as written by `dynlab study run` (InputError when missing or bad)."""
    import json

    path = Path(out) / DESIGN_NAME
    if not path.is_file():
        raise InputError(f"{out}: no {DESIGN_NAME} (expected the --out folder of "
                         "`dynlab study run`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise InputError(f"{path}: expected an object with 'runs' (written by dynlab study run)")
    return data


def run_sequential(specs: Sequence[dict], done: Callable[[UnitResult], None]) -> None:
    for spec in specs:
        done(run_unit(spec))


def run_jobs(specs: Sequence[dict], jobs: int, done: Callable[[UnitResult], None]) -> None:
    """`jobs` local processes (spawned: a fresh interpreter each, one unit per process).
    Ctrl-C terminates them; their runs continue on the next `dynlab study run`."""
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1)
    try:
        for result in pool.imap_unordered(run_unit, specs):
            done(result)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def dask_client(scheduler: str, threads: int):
    """A distributed.Client for 'local:N' (a LocalCluster of N single-threaded worker
    processes) or a scheduler address (dynlab.analysis.dask.parse_scheduler)."""
    from distributed import Client, LocalCluster

    from dynlab.analysis.dask import parse_scheduler

    how, arg = parse_scheduler(scheduler)
    if how == "local":
        cluster = LocalCluster(n_workers=int(arg), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    return Client(arg), None


def run_dask(specs: Sequence[dict], scheduler: str, done: Callable[[UnitResult], None]) -> None:
    """One Dask task per unit (pure=False: a rerun submits again; the unit skips work done)."""
    from distributed import as_completed

    client, cluster = dask_client(scheduler, 1)
    try:
        futures = client.map(run_unit, list(specs), pure=False)
        for future in as_completed(futures):
            done(future.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_slurm(specs: Sequence[dict], params: dict[str, Any], folder: Path,
              done: Callable[[UnitResult], None]) -> None:
    """One submitit job per unit (submitit.AutoExecutor; `cluster: local` runs the jobs as
    local processes through submitit's LocalExecutor, `debug` in this process). Waits for
    every job; submitit's logs are in OUT/slurm."""
    try:
        import submitit
    except ImportError as err:
        raise DynlabFailure("--slurm needs submitit: pip install 'dynlab[slurm]'") from err
    params = dict(params)
    cluster = params.pop("cluster", "slurm")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    if params:
        executor.update_parameters(**params)
    jobs = [executor.submit(run_unit, spec) for spec in specs]
    try:
        for job in jobs:
            done(job.result())
    except BaseException:
        for job in jobs:
            if not job.done():
                job.cancel(check=False)
        raise


def run_study(study: Study, out: str | Path, *, jobs: int = 1, scheduler: str | None = None,
              slurm: bool = False, progress: bool = True, device: str | None = None,
              say: Callable[[str], None] = print) -> StudyResult:
    """Train, evaluate and analyse every (condition, seed) of `study` under `out` (module
    docstring). Returns the units' results and the store; raises DynlabFailure (InputError
    when every failure is bad input) naming the failed runs after the others were analysed."""
    out = Path(out).expanduser()
    if sum([jobs > 1, scheduler is not None, slurm]) > 1:
        raise InputError("--jobs, --scheduler and --slurm exclude each other: pick one place "
                         "to run the study")
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: expected a positive number of processes")
    if slurm and study.slurm is None:
        raise InputError(f"--slurm: {study.path} has no `slurm:` section (submitit "
                         "parameters, e.g. partition, timeout_min, gpus_per_node)")
    write_design(study, out)
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    share = None
    if jobs > 1:
        share = max(1, cores // jobs)
    elif scheduler is not None and scheduler.startswith("local:"):
        share = max(1, cores // max(1, int(scheduler.split(":", 1)[1] or 1)))
    specs = unit_specs(study, out, share)
    result = StudyResult(out, None)
    where = (f"{jobs} local processes ({share} threads each)" if jobs > 1
             else f"Dask {scheduler}" if scheduler else "Slurm (submitit)" if slurm
             else "this process")
    say(f"study {study.name}: {len(study.conditions)} conditions × {len(study.seeds)} seeds = "
        f"{len(specs)} runs in {out}, on {where}")

    def done(r: UnitResult) -> None:
        result.units.append(r)
        what = (f"failed: {r.error}" if r.status != "ok" else
                f"train {r.trained}, eval {r.evaluated} checkpoints, {r.seconds:.0f} s")
        say(f"[{len(result.units)}/{len(specs)}] {r.run}: {what}")

    if jobs > 1:
        run_jobs(specs, jobs, done)
    elif scheduler is not None:
        run_dask(specs, scheduler, done)
    elif slurm:
        run_slurm(specs, study.slurm or {}, out / "slurm", done)
    else:
        run_sequential(specs, done)
    ok = [s for s in specs if finished(Path(s["run_dir"]), s["steps"])]
    if ok:
        import dynlab

        opts = dict(study.analyze)
        say(f"analyze: {len(ok)} runs -> {out / STORE_NAME}")
        result.store = dynlab.analyze(
            [s["run_dir"] for s in ok], out / STORE_NAME, metrics=opts.get("metrics"),
            kinds=opts.get("kinds"), device=device or opts.get("device", "auto"),
            precision=opts.get("precision", "float64"), scheduler=scheduler,
            activations=opts.get("activations"), target=opts.get("target"),
            progress=progress)
    failed = result.failed
    if failed:
        lines = "; ".join(f"{r.run}: {r.error}" for r in failed)
        kept = (f"the {len(ok)} completed runs are analysed in {result.store}" if ok
                else "no run completed")
        text = (f"{len(failed)} of {len(specs)} runs failed ({lines}); {kept}; fix the "
                "study file and rerun the same command to finish")
        raise (InputError if all(r.bad_input for r in failed) else DynlabFailure)(text)
    return result
