"""Planning an analysis: runs -> the store's layout and the checkpoints to analyse (tasks).

Nothing here reads tensors or writes a store: `plan_layout` and `plan_tasks` are functions of
the runs found on disk (and of the store's `analyzed` / `prev_step` flags for a rerun).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynlab.analysis import components as C
from dynlab.analysis.conventions import head_sv_size
from dynlab.analysis.selection import Cells, stored_cells
from dynlab.analysis.store import Layout
from dynlab.runs.checkpoints import Checkpoint, Run
from dynlab.sources import run_grad_kinds

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

    @property
    def wants_grads(self) -> bool:
        """Whether checkpoints are read with their gradients."""
        return "grads" in self.kinds or "train_grads" in self.kinds

    @property
    def wants_updates(self) -> bool:
        """Whether each task also needs its predecessor's weights."""
        return "updates" in self.kinds


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
    #: the cells to compute (dynlab.analysis.selection; None: every cell), the cells the store
    #: holds already and keeps (None: none), and whether the checkpoint is then complete
    cells: Cells | None = None
    keep: Cells | None = None
    completes: bool = True

    @property
    def region(self) -> dict[str, int]:
        """The task's cell of the store, by dimension name."""
        return {"run": self.run_index, "step": self.step_index}

    @property
    def label(self) -> str:
        return f"{self.run.name} step {self.checkpoint.step}"


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
    """The kinds to analyse, in `components.KINDS` order, from a comma list or names
    (None or "all": every available kind). ValueError for an unknown or unavailable kind."""
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
                convention: str = "dynlab",
                steps: Mapping[str, Sequence[int]] | None = None) -> Layout:
    """The store layout that holds every checkpoint of `runs` (of `steps`: run -> its
    selected steps, when given)."""
    specs = [r.spec for r in runs]
    if steps is None:
        steps = {r.name: [c.step for c in r.checkpoints] for r in runs}
    steps = sorted({s for r in runs for s in steps.get(r.name, ())})
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


def plan_tasks(
    runs: Sequence[Run], layout: Layout, analyzed: np.ndarray,
    prev_steps: np.ndarray | None = None, *,
    steps: Mapping[str, Sequence[int]] | None = None,
    select: Cells | None = None,
    flags: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[Task]:
    """Every selected checkpoint whose selected cells the store lacks, and (when the store has
    the updates kind) every analysed one whose recorded predecessor (`prev_step`) is older
    than its predecessor on disk. A recorded predecessor newer than the one on disk (a
    checkpoint deleted since) keeps its result.

    steps: run -> the selected steps (default: every checkpoint); select: the selected cells
    (`selection.Cells` over the store's layers; default every cell); flags: the store's
    (done, qk_done, emb_done) arrays, dims (run, step, ...). A checkpoint partly in the
    store gets a task for the missing cells only, keeping the others (`Task.keep`); a
    recomputed one recomputes every cell it holds and every selected one. The predecessor
    of a checkpoint is always the previous complete checkpoint on disk, selected or not, so
    a selected store holds the same `updates` as a full analysis."""
    r_index = {r: i for i, r in enumerate(layout.runs)}
    s_index = {s: j for j, s in enumerate(layout.steps)}
    check_prev = prev_steps is not None and "updates" in layout.kinds
    n = layout.n_layers
    tasks = []
    for run in runs:
        prev = None
        chosen = None if steps is None else set(steps.get(run.name, ()))
        every = Cells.every(run.spec.n_layers, n)
        want = every if select is None else select & every
        for ckpt in run.checkpoints:
            if chosen is not None and ckpt.step not in chosen:
                prev = ckpt
                continue
            i, j = r_index[run.name], s_index[ckpt.step]
            held = Cells.none(n) if flags is None else Cells.from_flags(
                *(f[i, j] for f in flags))
            have = stored_cells(int(analyzed[i, j]), held, n)
            if not analyzed[i, j]:
                if want.any():
                    tasks.append(Task(run, ckpt, prev, i, j, cells=want,
                                      completes=want.covers(every)))
            elif check_prev and prev is not None and prev_steps[i, j] < prev.step:
                cells = have | want
                tasks.append(Task(run, ckpt, prev, i, j, recompute=True, cells=cells,
                                  completes=cells.covers(every)))
            elif (want - have).any():
                missing = want - have
                tasks.append(Task(run, ckpt, prev, i, j, cells=missing, keep=have,
                                  completes=(have | missing).covers(every)))
            prev = ckpt
    return tasks


def default_store_path(runs: Sequence[Run]) -> Path:
    """`analysis.zarr` beside the first run (in the working directory for a Hub source)."""
    if str(runs[0].path).startswith("hf:"):
        return Path("analysis.zarr")
    return runs[0].path.parent / "analysis.zarr"
