"""The analysis entry point: `analyze(runs, out=...)` plans the work (`analysis.plan`),
makes the store ready (`analysis.store`), runs one task per checkpoint (`analysis.task`) on the
serial executor (`analysis.serial`) or a Dask cluster (`analysis.dask`), then the activation
analysis (`analysis.activations`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from dynlab.analysis import metrics as metrics_mod
from dynlab.analysis.conventions import check_convention
from dynlab.analysis.plan import (
    PRECISIONS,
    Options,
    Task,
    default_store_path,
    parse_kinds,
    plan_layout,
    plan_tasks,
)
from dynlab.analysis.selection import (
    CELL_VARIABLES,
    Cells,
    select_layers,
    select_matrices,
    select_steps,
    tensor_keep,
)
from dynlab.analysis.serial import run_tasks_serial
from dynlab.analysis.store import (
    Layout,
    RegionWriter,
    ensure_store,
    meta_labels,
    write_meta_regions,
)
from dynlab.analysis.storelock import StoreAccess, holder_text
from dynlab.devices import resolve_device
from dynlab.runs.checkpoints import Keep, Run
from dynlab.sources import load_source_checkpoint, open_sources, release


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
    dynamics: str | Sequence[str] | None = None,
    dynamics_options: Mapping | None = None,
    steps: str | Sequence[int] | int | None = None,
    layers: str | Sequence[int] | int | None = None,
    matrices: str | Sequence[str] | None = None,
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
    dynamics: function-space dynamics of every checkpoint (dynlab.analysis.dynamics: a comma
    list of sharpness, barrier, gns, attention, or all) with `dynamics_options` (the fields of
    DynamicsOptions: data, n_seq, seq_len, k, probes, alphas, seed, ...; and between:
    "RUN@STEP,RUN@STEP", the loss line between two runs' checkpoints). The update-to-weight
    ratio is written in every analysis whose store has frobenius_norm of weights and updates.
    steps, layers, matrices: analyse only these (dynlab.analysis.selection: `"0:1000:100,last"`,
    `"0,5:11"`, `"attention.v_proj,attention.o_proj,ov_circuit"`, names or globs; default
    everything). The store records which cells it holds; a rerun with a wider selection
    computes only what is missing, and the values equal those of a full analysis (updates
    are always taken against the previous checkpoint on disk).
    """
    targets = None  # the activation analysis' default
    if target is not None:  # checked before anything is read or written
        from dynlab.analysis.activations import parse_targets

        targets = parse_targets(target)
    check_convention(convention)
    metric_names = metrics_mod.parse_metrics(metrics)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if scheduler and any(str(r).startswith("hf://") for r in runs):
        raise ValueError("hf:// sources are streamed in this process; leave out --scheduler")
    dyn_options = dynamics_settings(dynamics, dynamics_options)
    found = open_sources(runs, fmt, revisions=revisions, keep_downloads=keep_downloads,
                         cache_dir=cache_dir)
    if target is not None:
        from dynlab.analysis.activations import check_targets

        check_targets(targets, found)
    if grads_data is not None:
        from dynlab.sources.grads import GradsData, with_recomputed_grads

        data = GradsData(**grads_data)
        found = [with_recomputed_grads(r, data) for r in found]
    kind_names = parse_kinds(kinds, found)
    dyn_batches = None
    if dyn_options is not None and (dyn_options.items or dyn_options.extra.get("between")):
        from dynlab.analysis.dynamics import prepare_dynamics

        dyn_batches = prepare_dynamics(found, dyn_options)  # refused before any write
    options = Options(metric_names, kind_names, str(resolve_device(device)), precision)
    path = Path(out) if out is not None else default_store_path(found)
    chosen = select_steps(steps, {r.name: [c.step for c in r.checkpoints] for r in found})
    n_layers = max(r.spec.n_layers for r in found)
    chosen_layers, chosen_matrices = select_layers(layers, n_layers), select_matrices(matrices)
    wanted = plan_layout(found, metric_names, kind_names, convention, chosen)
    metas = {(r.name, c.step): c.meta() for r in found for c in r.checkpoints
             if c.step in set(chosen[r.name])}
    wanted.labels = meta_labels(metas)
    with StoreAccess(path, wait=wait) as access:
        if access.took_over:
            warnings.warn(f"{path}: taking over from a writer that ended without releasing "
                          f"the store ({holder_text(access.took_over)}); finishing its work",
                          stacklevel=2)
        layout = ensure_store(path, wanted, metrics_given=metrics is not None,
                              kinds_given=kinds is not None, access=access,
                              validate=lambda names: validate_first(
                                  [r for r in found if r.name in names], kind_names, chosen,
                                  tensor_keep(Cells.of(chosen_layers, chosen_matrices,
                                                       n_layers))))
        options = Options(tuple(layout.metrics), tuple(layout.kinds), options.device, precision,
                          convention)
        writer = RegionWriter(path)
        write_meta_regions(path, layout, metas, access, writer)
        stored = writer.read_many([*CELL_VARIABLES, "analyzed", "prev_step"])
        flags = tuple(stored[name] for name in CELL_VARIABLES)
        tasks = plan_tasks(found, layout, stored["analyzed"], stored["prev_step"],
                           steps=chosen, flags=flags,
                           select=Cells.of(chosen_layers, chosen_matrices, layout.n_layers))
        if tasks:
            access.need(f"write {len(tasks)} checkpoints")
        if scheduler:
            from dynlab.analysis.dask import run_tasks_on_dask

            run_tasks_on_dask(tasks, path, layout, options, scheduler, progress=progress)
        else:
            run_tasks_serial(tasks, writer, layout, options, progress=progress,
                             on_checkpoint=releasing(on_checkpoint))
        if activations is not False:
            analyze_activation_hook(found, path, layout, targets, required=bool(activations),
                                    data=activations_data, positions=activation_positions,
                                    n_seq=activations_batch,
                                    steps=None if steps is None else chosen)
        analyze_dynamics_hook(found, path, access, layout, dyn_options, device=options.device,
                              progress=progress, batches=dyn_batches,
                              steps=None if steps is None else chosen)
    return path


def dynamics_settings(dynamics: str | Sequence[str] | None, options: Mapping | None):
    """The DynamicsOptions of `analyze(dynamics=..., dynamics_options=...)`, checked before
    anything is read or written; None when neither is given (and the dynamics module is not
    imported)."""
    if dynamics is None and not options:
        return None
    from dynlab.analysis.dynamics import DynamicsOptions, parse_dynamics
    from dynlab.errors import InputError

    options = dict(options or {})
    between = options.pop("between", None)
    try:
        opt = DynamicsOptions(items=parse_dynamics(dynamics), **options)
    except TypeError as err:
        raise InputError(f"dynamics_options: {err}") from None
    if between:
        from dynlab.analysis.dynamics import parse_between

        parse_between(between)
        opt.extra["between"] = between
    return opt.check() if opt.items or between else opt


def analyze_dynamics_hook(runs: Sequence[Run], path: Path, access: StoreAccess,
                          layout: Layout, opt, *, device: str, progress: bool,
                          batches: Mapping | None = None,
                          steps: Mapping[str, Sequence[int]] | None = None) -> None:
    """After the other analyses: the update-to-weight ratio from the store (when it can be
    written: the store's `layout` holds frobenius_norm of weights and updates) and the
    requested function-space dynamics (dynlab.analysis.dynamics; `opt` None: none)."""
    ratio = "frobenius_norm" in layout.metrics and {"weights", "updates"} <= set(layout.kinds)
    if access.writable and ratio:
        from dynlab.analysis.dynamics import write_update_ratio

        write_update_ratio(path, [r.name for r in runs])
    if opt is None:
        return
    from dynlab.analysis.dynamics import analyze_dynamics

    if opt.items:
        analyze_dynamics(runs, path, opt, device=device, progress=progress, need=access.need,
                         batches=batches, steps=steps)
    if opt.extra.get("between"):
        from dynlab.analysis.dynamics import analyze_between

        analyze_between(runs, path, opt.extra["between"], opt, device=device,
                        need=access.need)


def releasing(on_checkpoint: Callable[[Task], None] | None) -> Callable[[Task], None]:
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
                            targets: Sequence[str] | None, *, required: bool,
                            data: str | None = None,
                            positions: str = "sample:16", n_seq: int = 16,
                            steps: Mapping[str, Sequence[int]] | None = None) -> None:
    """The activation analysis (dynlab.analysis.activations) after the parameter analysis
    (of the selected `steps` only, when given: run -> steps)."""
    from dynlab.analysis.activations import activation_steps, analyze_activations, parse_targets
    from dynlab.errors import InputError

    if data is not None or activation_steps(runs):
        analyze_activations(runs, path, layout.metrics,
                            parse_targets(None) if targets is None else targets, data=data,
                            positions=positions, n_seq=n_seq, steps=steps)
    elif required:
        raise InputError("--activations: no checkpoint of these runs has "
                         "activations.safetensors (train with --save-activations)")


def validate_first(runs: Sequence[Run], kinds: Sequence[str],
                   steps: Mapping[str, Sequence[int]] | None = None, keep: Keep = None) -> None:
    """Read the first (selected) checkpoint of each run (shapes against run.json; of the
    tensors `keep` keeps, those of the selected matrices), so that a store is created, or a
    run added to it, only for runs that can be analysed."""
    for run in runs:
        chosen = set(steps.get(run.name, ())) if steps is not None else None
        first = next((c for c in run.checkpoints if chosen is None or c.step in chosen),
                     run.checkpoints[0])
        load_source_checkpoint(run, first, grads="grads" in kinds, kinds=kinds, keep=keep)
