"""The analysis pipeline: stream checkpoints -> components -> batched spectra -> metrics -> store.

`analyze(runs, out=...)` is the whole thing. Per checkpoint, every matrix of every kind is
grouped by shape and each group goes through one batched singular-value call
(`dynlab.analysis.spectra`); metrics are then computed at once on the padded spectra.
Checkpoint t+1 is read on a background thread while t is computed (serial path), or each
checkpoint is one task on a Dask cluster (`scheduler=`), writing its own chunks of the same store.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynlab.analysis import components as C
from dynlab.analysis import metrics as metrics_mod
from dynlab.analysis import spectra
from dynlab.analysis.conventions import apply as apply_convention
from dynlab.analysis.conventions import check_convention, head_sv_size
from dynlab.analysis.recompute import spectrum_metric
from dynlab.analysis.store import (
    Layout,
    RegionWriter,
    ensure_store,
    meta_labels,
    spectral_variables,
    write_meta_regions,
)
from dynlab.analysis.storelock import StoreAccess, holder_text
from dynlab.faults import fault_point
from dynlab.runs.checkpoints import (
    Checkpoint,
    CheckpointError,
    LoadedCheckpoint,
    ModelSpec,
    Run,
    prefetch,
)
from dynlab.sources import (
    load_source_checkpoint,
    load_source_weights,
    open_sources,
    release,
    run_grad_kinds,
)

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class Options:
    """What to compute and where (small, picklable: it travels to Dask workers)."""

    metrics: tuple[str, ...]
    kinds: tuple[str, ...]
    device: str = "cpu"
    precision: str = "float64"
    convention: str = "dynlab"  # dynlab.analysis.conventions

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


# ----------------------------------------------------------------------------------------
# Spectra of many components, batched by shape


def component_spectra(
    comps: Mapping[C.Site, C.Component], *, device: str = "cpu", dtype: torch.dtype = torch.float64
) -> dict[C.Site, torch.Tensor]:
    """Singular values (length = rank bound) of every component, one batched call per shape."""
    groups: dict[tuple, list[tuple[C.Site, C.Component]]] = defaultdict(list)
    for site, comp in comps.items():
        if isinstance(comp, C.LowRank) and comp.left.shape[1] < min(comp.shape):
            key = ("lowrank", tuple(comp.left.shape), tuple(comp.right.shape))
        else:
            x = comp.entries() if isinstance(comp, C.LowRank) else comp.x
            comp = C.Dense(x, comp.shape) if isinstance(comp, C.LowRank) else comp
            key = ("dense", tuple(x.shape))  # as stored: no transposed copies
        groups[key].append((site, comp))
    out: dict[C.Site, torch.Tensor] = {}
    for key, items in groups.items():
        if key[0] == "lowrank":
            left = stack_as([c.left for _, c in items], dtype, device)
            right = stack_as([c.right for _, c in items], dtype, device)
            sig = spectra.lowrank_svdvals(left, right, dtype=dtype)
        else:
            sig = spectra.svdvals(stack_dense([c for _, c in items], dtype, device),
                                   dtype=dtype)
        sig = sig.cpu()
        for (site, comp), s in zip(items, sig, strict=True):
            k = comp.rank_bound
            if s.shape[0] < k:  # rows dropped because they were zero: σ = 0 there
                s = torch.cat([s, s.new_zeros(k - s.shape[0])])
            out[site] = s[:k]
    return out


def stack_dense(comps: Sequence[C.Dense], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Stack equal-shaped dense components into one batch of `dtype` on `device`, forming
    each difference in place (`Dense.copy_into`): one copy, no float64 temporaries."""
    out = torch.empty((len(comps), *comps[0].x.shape), dtype=dtype, device=device)
    for i, comp in enumerate(comps):
        comp.copy_into(out[i])
    return out


def stack_as(mats: Sequence[torch.Tensor], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Stack equal-shaped matrices into one contiguous batch of `dtype` on `device`, in a
    single copy (conversion and transposition included)."""
    out = torch.empty((len(mats), *mats[0].shape), dtype=dtype, device=device)
    for i, m in enumerate(mats):
        out[i].copy_(m)
    return out


# ----------------------------------------------------------------------------------------
# One checkpoint -> the arrays of its (run, step) region


def kind_components(
    kind: str,
    run: Run,
    ckpt: LoadedCheckpoint,
    prev_weights: Mapping[str, torch.Tensor] | None,
) -> dict[C.Site, C.Component]:
    """The components of one kind, or {} where that kind does not exist for this checkpoint.
    Each carries its storage precision (`stored`, which sets its zero tolerance)."""
    spec = run.spec
    if kind == "weights":
        return C.weight_components(ckpt.weights, spec)
    if kind == "grads":
        return C.grad_components(ckpt.grads, ckpt.weights, spec) if ckpt.grads else {}
    if kind == "train_grads":
        g = ckpt.train_grads
        return C.grad_components(g, ckpt.weights, spec) if g else {}
    if kind == "updates":  # relora: within-cycle updates from the factors (rank ≤ 2r)
        if not prev_weights:
            return {}
        return C.update_components(ckpt.weights, prev_weights, spec, run.lora_scale)
    if kind == "lora":
        scale = run.lora_scale
        return C.lora_components(ckpt.weights, spec, scale) if scale is not None else {}
    raise ValueError(f"unknown kind {kind!r}")


def region_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    dims = layout.dims()
    return {
        name: tuple(dims[d] for d in var_dims if d not in ("run", "step"))
        for name, var_dims in spectral_variables(layout.metrics).items()
    }


def checkpoint_region(
    run: Run,
    ckpt: LoadedCheckpoint,
    prev_weights: Mapping[str, torch.Tensor] | None,
    layout: Layout,
    options: Options,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """All spectral variables of one checkpoint (without run/step dims), and the names of the
    matrices that held NaN/Inf.

    Every matrix's numerical-zero tolerance (`metrics_mod.zero_tolerance`) is the larger of the
    rounding noise of its storage precision, c·eps·S·(1/√m + 1/√n) with the component's `eps`
    and `storage_norm` S, and the SVD's error max(m, n)·eps_c·σ_1 in the computation's
    precision (`options.precision`); it is written as `tol` (and `head_tol`, `emb_tol`)
    beside `max_rank`, the rank bound by construction."""
    if options.device != "cpu":  # one transfer; components are then built on the device
        ckpt = LoadedCheckpoint(ckpt.checkpoint, on_device(ckpt.weights, options.device),
                                on_device(ckpt.grads, options.device), ckpt.meta,
                                on_device(ckpt.train_grads, options.device))
        prev_weights = on_device(prev_weights, options.device)
    shapes = region_shapes(layout)
    tables = {t: sig for t, (sig, _, _, _) in C.TABLES.items()}
    sigma = {t: torch.full(shapes[v], math.nan, dtype=torch.float64) for t, v in tables.items()}
    max_dim = {t: torch.ones(shapes[v][:-1], dtype=torch.float64) for t, v in tables.items()}
    min_dim = {t: torch.ones(shapes[v][:-1], dtype=torch.float64) for t, v in tables.items()}
    norm = {t: torch.full(shapes[v][:-1], math.nan, dtype=torch.float64)
            for t, v in tables.items()}
    eps = {t: torch.full(shapes[v][:-1], math.nan, dtype=torch.float64)
           for t, v in tables.items()}
    max_rank = {t: torch.full(shapes[v][:-1], math.nan, dtype=torch.float64)
                for t, v in tables.items()}
    compute_eps = torch.finfo(options.dtype).eps
    entrywise = [m for m in options.metrics if metrics_mod.METRICS[m].entrywise]
    entry_values = {
        (t, m): torch.full(shapes[v][:-1], math.nan, dtype=torch.float64)
        for t, v in tables.items() for m in entrywise
    }
    bad: list[str] = []
    for k_index, kind in enumerate(layout.kinds):
        comps = kind_components(kind, run, ckpt, prev_weights)
        comps = apply_convention(options.convention, kind, comps, run.spec, ckpt.weights,
                                 ckpt.grads, prev_weights)
        if not comps:
            continue
        sigmas = component_spectra(comps, device=options.device, dtype=options.dtype)
        for site, s in sigmas.items():
            cell = (k_index, *site.index)
            sigma[site.table][cell][: s.shape[0]] = s.to(torch.float64)
            max_dim[site.table][cell] = comps[site].max_dim
            min_dim[site.table][cell] = comps[site].min_dim
            norm[site.table][cell] = comps[site].storage_norm
            eps[site.table][cell] = comps[site].eps
            max_rank[site.table][cell] = comps[site].max_rank
            if torch.isnan(s).all() and site.table not in ("qk", "qk_head"):  # q/k report it
                bad.append(f"{kind}:{_site_name(site)}")
        for m in entrywise:
            fn = metrics_mod.METRICS[m].from_entries
            for site, comp in comps.items():
                entry_values[(site.table, m)][(k_index, *site.index)] = fn(comp.entries()).cpu()
    out: dict[str, np.ndarray] = {}
    for table, var in tables.items():
        prefix = C.TABLES[table][1]
        s = sigma[table]
        out[var] = s.numpy()
        tol_args = dict(min_dim=min_dim[table], norm=norm[table], compute_eps=compute_eps)
        out[prefix + "tol"] = metrics_mod.zero_tolerance(s, max_dim[table], eps[table],
                                                      **tol_args).numpy()
        out[prefix + "max_rank"] = max_rank[table].numpy()
        for m in options.metrics:
            metric = metrics_mod.METRICS[m]
            if metric.entrywise:
                values = entry_values[(table, m)]
            else:
                values = spectrum_metric(m, s, max_dim[table], options.convention,
                                         eps[table], **tol_args)
            out[prefix + m] = values.numpy()
    return out, bad


def _site_name(site: C.Site) -> str:
    if site.table == "layer":
        return f"layers.{site.index[0]}.{C.MATRICES[site.index[1]]}"
    if site.table == "head":
        return f"layers.{site.index[0]}.ov_circuit.head{site.index[1]}"
    if site.table == "qk":
        return f"layers.{site.index[0]}.qk_circuit"
    if site.table == "qk_head":
        return f"layers.{site.index[0]}.qk_circuit.head{site.index[1]}"
    return C.EMBEDDINGS[site.index[0]]


# ----------------------------------------------------------------------------------------
# Planning


def available_kinds(runs: Sequence[Run]) -> list[str]:
    """weights always; grads if any checkpoint has grads.safetensors (or its source holds
    gradients); updates if any run has two checkpoints; lora if any run is a relora run;
    train_grads if a pico-train run holds training-batch gradients."""
    kinds = ["weights"]
    grad_kinds = {k for r in runs for k in run_grad_kinds(r)}
    if "grads" in grad_kinds:
        kinds.append("grads")
    if any(len(r.checkpoints) > 1 for r in runs):
        kinds.append("updates")
    if any(r.lora_scale is not None for r in runs):
        kinds.append("lora")
    if "train_grads" in grad_kinds:
        kinds.append("train_grads")
    return kinds


def parse_kinds(spec: str | Sequence[str] | None, runs: Sequence[Run]) -> tuple[str, ...]:
    avail = available_kinds(runs)
    if spec is None or spec == "all":
        return tuple(avail)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in C.KINDS]
    if unknown or not names:
        raise ValueError(f"unknown kind(s) {', '.join(unknown) or '(none)'}; valid: "
                         f"{', '.join(C.KINDS)}")
    missing = [n for n in names if n not in avail]
    if missing:
        raise ValueError(f"kind(s) {', '.join(missing)} not available in these runs "
                         f"(available: {', '.join(avail)})")
    return tuple(n for n in C.KINDS if n in names)


def plan_layout(runs: Sequence[Run], metrics: Sequence[str], kinds: Sequence[str],
                convention: str = "dynlab") -> Layout:
    specs = [r.spec for r in runs]
    steps = sorted({c.step for r in runs for c in r.checkpoints})
    return Layout(
        runs=[r.name for r in runs],
        steps=steps,
        kinds=list(kinds),
        metrics=list(metrics),
        n_layers=max(s.n_layers for s in specs),
        n_heads=max(s.n_heads for s in specs),
        n_sv=max(s.d_model for s in specs),
        n_head_sv=max(head_sv_size(convention, s) for s in specs),
        n_emb_sv=max(min(s.d_model, s.vocab_size) for s in specs),
        run_configs={r.name: r.config for r in runs},
        convention=convention,
    )


@dataclass(frozen=True)
class Task:
    """One checkpoint to analyse (and the previous complete one of its run, for updates).
    `recompute`: the store holds this checkpoint already, computed against an older
    predecessor (a checkpoint in between completed later)."""

    run: Run
    checkpoint: Checkpoint
    previous: Checkpoint | None
    run_index: int
    step_index: int
    recompute: bool = False


def plan_tasks(
    runs: Sequence[Run], layout: Layout, analyzed: np.ndarray,
    prev_steps: np.ndarray | None = None,
) -> list[Task]:
    """Every checkpoint the store lacks, and (when the store has the updates kind) every
    analysed one whose recorded predecessor (`prev_step`) is older than its predecessor on
    disk. A recorded predecessor newer than the one on disk (a checkpoint deleted since)
    keeps its result."""
    r_index = {r: i for i, r in enumerate(layout.runs)}
    s_index = {s: j for j, s in enumerate(layout.steps)}
    check_prev = prev_steps is not None and "updates" in layout.kinds
    tasks = []
    for run in runs:
        prev = None
        for ckpt in run.checkpoints:
            i, j = r_index[run.name], s_index[ckpt.step]
            if not analyzed[i, j]:
                tasks.append(Task(run, ckpt, prev, i, j))
            elif check_prev and prev is not None and prev_steps[i, j] < prev.step:
                tasks.append(Task(run, ckpt, prev, i, j, recompute=True))
            prev = ckpt
    return tasks


# ----------------------------------------------------------------------------------------
# Running


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], not {device!r}")
    return device


def default_store_path(runs: Sequence[Run]) -> Path:
    if str(runs[0].path).startswith("hf:"):  # a Hub repository: the working directory
        return Path("analysis.zarr")
    return runs[0].path.parent / "analysis.zarr"


def analyze(
    runs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    metrics: str | Sequence[str] | None = None,
    kinds: str | Sequence[str] | None = None,
    device: str = "auto",
    precision: str = "float64",
    scheduler: str | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[Task], None] | None = None,
    fmt: str | None = None,
    revisions: str | None = None,
    keep_downloads: bool = False,
    cache_dir: str | Path | None = None,
    grads_data: Mapping | None = None,
    activations: bool | None = None,
    target: str | Sequence[str] | None = None,
    convention: str = "dynlab",
    activations_data: str | None = None,
    activation_positions: str = "sample:16",
    activations_batch: int = 16,
    wait: bool | float = False,
) -> Path:
    """Analyse every complete checkpoint of `runs` into the Zarr store `out` and return its path.

    runs: RUN dirs, RUN/checkpoints dirs, folders of runs, pico-train / relora-pico runs,
    Hugging Face model directories or runs of them, or `hf://ORG/NAME` (see
    `dynlab.sources`; `fmt` overrides detection; `revisions`, `keep_downloads` and
    `cache_dir` apply to hf:// sources). out: default `analysis.zarr` beside the first run.
    metrics: comma list or names (default all). kinds: weights, grads, updates, lora,
    train_grads (default all available). A rerun skips the checkpoints the store already
    holds. scheduler: None (in process), "local:N" (a Dask LocalCluster of N worker
    processes) or a Dask scheduler address "tcp://HOST:PORT". grads_data: {path, batch_size,
    seq_len, tokenizer} to recompute every checkpoint's `grads` on that fixed batch
    (`dynlab.sources.grads`).
    activations: analyse the checkpoints' activations (dynlab.analysis.activations) — None: when
    they have them; target: what they are compared with (final, first, previous, STEP,
    RUN@STEP; default final). convention: "dynlab" or "pico" (pico-analyze's OV matrices
    and condition number, dynlab.analysis.conventions); a store holds one convention.
    activations_data: compute the activations of every checkpoint now, on `activations_batch`
    sequences of this data (.txt/.jsonl or "default") at `activation_positions`, for runs
    saved without them (dynlab.analysis.activations.analyze_activations).
    The store is locked for the whole analysis (`dynlab.analysis.storelock`): another writer raises
    StoreBusy, or waits `wait` seconds (True: for ever) for it.
    """
    from dynlab.analysis.activations import parse_targets

    targets = parse_targets(target)
    check_convention(convention)
    metric_names = metrics_mod.parse_metrics(metrics)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if scheduler and any(str(r).startswith("hf://") for r in runs):
        raise ValueError("hf:// sources are streamed in this process; leave out --scheduler")
    found = open_sources(runs, fmt, revisions=revisions, keep_downloads=keep_downloads,
                         cache_dir=cache_dir)
    if grads_data is not None:
        from dynlab.sources.grads import GradsData, with_recomputed_grads

        data = GradsData(**grads_data)
        found = [with_recomputed_grads(r, data) for r in found]
    kind_names = parse_kinds(kinds, found)
    options = Options(metric_names, kind_names, resolve_device(device), precision)
    path = Path(out) if out is not None else default_store_path(found)
    wanted = plan_layout(found, metric_names, kind_names, convention)
    metas = {(r.name, c.step): c.meta() for r in found for c in r.checkpoints}
    wanted.labels = meta_labels(metas)
    with StoreAccess(path, wait=wait) as access:
        if access.took_over:
            warnings.warn(f"{path}: taking over from a writer that ended without releasing "
                          f"the store ({holder_text(access.took_over)}); finishing its work",
                          stacklevel=2)
        layout = ensure_store(path, wanted, metrics_given=metrics is not None,
                              kinds_given=kinds is not None, access=access,
                              validate=lambda names: validate_first(
                                  [r for r in found if r.name in names], kind_names))
        options = Options(tuple(layout.metrics), tuple(layout.kinds), options.device, precision,
                          convention)
        write_meta_regions(path, layout, metas, access)
        writer = RegionWriter(path)
        tasks = plan_tasks(found, layout, writer.analyzed(), writer.prev_steps())
        if tasks:
            access.need(f"write {len(tasks)} checkpoints")
        if scheduler:
            from dynlab.analysis.dask import run_tasks_on_dask

            run_tasks_on_dask(tasks, path, layout, options, scheduler, progress=progress)
        else:
            run_tasks_serial(tasks, writer, layout, options, progress=progress,
                             on_checkpoint=_releasing(on_checkpoint))
        if activations is not False:
            analyze_activation_hook(found, path, layout, targets, required=bool(activations),
                                    data=activations_data, positions=activation_positions,
                                    n_seq=activations_batch)
    return path


def _releasing(on_checkpoint: Callable[[Task], None] | None) -> Callable[[Task], None]:
    """After each analysed checkpoint: the caller's callback, then let its source release it
    (a Hub source deletes the download; the previous one is no longer needed either)."""

    def done(task: Task) -> None:
        if on_checkpoint is not None:
            on_checkpoint(task)
        if task.previous is not None:
            release(task.run, task.previous)
        release(task.run, task.checkpoint)

    return done


def analyze_activation_hook(runs: Sequence[Run], path: Path, layout: Layout,
                            targets: Sequence[str], *, required: bool, data: str | None = None,
                            positions: str = "sample:16", n_seq: int = 16) -> None:
    """The activation analysis (dynlab.analysis.activations) after the parameter analysis."""
    from dynlab.analysis.activations import activation_steps, analyze_activations
    from dynlab.errors import InputError

    if data is not None or activation_steps(runs):
        analyze_activations(runs, path, layout.metrics, targets, data=data,
                            positions=positions, n_seq=n_seq)
    elif required:
        raise InputError("--activations: no checkpoint of these runs has "
                         "activations.safetensors (train with --save-activations)")


def validate_first(runs: Sequence[Run], kinds: Sequence[str]) -> None:
    """Read the first checkpoint of each run (shapes against run.json), so that a store is
    created, or a run added to it, only for runs that can be analysed."""
    for run in runs:
        load_source_checkpoint(run, run.checkpoints[0], grads="grads" in kinds, kinds=kinds)


def write_task(writer: RegionWriter, task: Task, values: Mapping[str, np.ndarray]) -> None:
    """Write one checkpoint's region, its predecessor and, last, its `analyzed` flag (a
    recomputed checkpoint is unflagged first, so a kill in between recomputes it again)."""
    i, j = task.run_index, task.step_index
    if task.recompute:
        writer.mark_analyzed(i, j, False)
    writer.write(i, j, values)
    writer.write_cell("prev_step", i, j, task.previous.step if task.previous else -1)
    fault_point("analyze.write")
    writer.mark_analyzed(i, j)


def load_task(task: Task, options: Options) -> tuple[LoadedCheckpoint, dict | None]:
    """Read a task's checkpoint (and its predecessor's weights when updates are wanted)."""
    ckpt = load_source_checkpoint(task.run, task.checkpoint, grads=_wants_grads(options),
                                  kinds=options.kinds)
    prev = None
    if "updates" in options.kinds and task.previous is not None:
        prev = load_source_weights(task.run, task.previous)
    return ckpt, prev


def analyze_task(
    task: Task,
    loaded: LoadedCheckpoint,
    prev_weights: Mapping[str, torch.Tensor] | None,
    writer: RegionWriter,
    layout: Layout,
    options: Options,
) -> list[str]:
    """Compute and write one checkpoint; returns the matrices that held NaN/Inf."""
    values, bad = checkpoint_region(task.run, loaded, prev_weights, layout, options)
    write_task(writer, task, values)
    return bad


def run_tasks_serial(
    tasks: Sequence[Task],
    writer: RegionWriter,
    layout: Layout,
    options: Options,
    *,
    progress: bool = True,
    on_checkpoint: Callable[[Task], None] | None = None,
) -> None:
    """Analyse tasks in order, reading the next checkpoint while this one is computed. The
    previous checkpoint's weights stay in memory for updates (read once)."""
    want_grads = _wants_grads(options)
    want_updates = "updates" in options.kinds
    pin = options.device.startswith("cuda")
    last: dict[tuple[str, int], dict] = {}  # touched by the loader thread only

    def load(task: Task):
        ckpt = load_source_checkpoint(task.run, task.checkpoint, grads=want_grads,
                                      kinds=options.kinds)
        prev = None
        if want_updates and task.previous is not None:
            # the previous checkpoint of the run was usually the loader's last one: reuse it
            prev = last.get((task.run.name, task.previous.step))
            if prev is None:
                prev = load_source_weights(task.run, task.previous)
        last.clear()
        last[(task.run.name, task.checkpoint.step)] = ckpt.weights
        if pin:
            ckpt = pinned(ckpt)
            prev = pinned_tensors(prev)
        return ckpt, prev

    with _progress(progress, len(tasks)) as advance:
        for task, (ckpt, prev) in prefetch(tasks, load):
            values, bad = checkpoint_region(task.run, ckpt, prev, layout, options)
            write_task(writer, task, values)
            fault_point("analyze.checkpoint")
            if bad:
                _warn_nonfinite(task, bad)
            if on_checkpoint is not None:
                on_checkpoint(task)
            advance(f"{task.run.name} step {task.checkpoint.step}")


def _wants_grads(options: Options) -> bool:
    return "grads" in options.kinds or "train_grads" in options.kinds


def pinned_tensors(tensors: Mapping[str, torch.Tensor] | None) -> dict | None:
    """Page-locked copies, so the copy to the GPU can run asynchronously."""
    if tensors is None:
        return None
    return {k: v.pin_memory() for k, v in tensors.items()}


def pinned(ckpt: LoadedCheckpoint) -> LoadedCheckpoint:
    return LoadedCheckpoint(ckpt.checkpoint, pinned_tensors(ckpt.weights),
                            pinned_tensors(ckpt.grads), ckpt.meta,
                            pinned_tensors(ckpt.train_grads))


def on_device(
    tensors: Mapping[str, torch.Tensor] | None, device: str
) -> dict[str, torch.Tensor] | None:
    if tensors is None:
        return None
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


def _warn_nonfinite(task: Task, bad: Sequence[str]) -> None:
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    warnings.warn(
        f"{task.checkpoint.path}: {len(bad)} matrices hold NaN/Inf ({shown}); their metrics "
        "are NaN",
        RuntimeWarning,
        stacklevel=3,
    )


class _progress:
    """A rich progress bar over checkpoints (silent when disabled or not a terminal)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled and total > 0
        self.total = total

    def __enter__(self):
        if not self.enabled:
            return lambda description: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]analyze[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
            transient=not os.environ.get("CI"),
        )
        self.bar.__enter__()
        self.task = self.bar.add_task("", total=self.total)
        return lambda description: self.bar.update(self.task, advance=1, description=description)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


__all__ = [
    "analyze", "Options", "Task", "checkpoint_region", "component_spectra", "CheckpointError",
    "ModelSpec",
]
