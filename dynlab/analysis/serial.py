"""The serial executor: tasks in order in this process, checkpoint t+1 read on a background
thread (`dynlab.runs.checkpoints.prefetch`) while t is computed, and t−1's region written on
another (one write at a time, in order) while t is computed. Each task runs the same code as
on a Dask worker (`dynlab.analysis.task`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from dynlab.analysis.plan import Options, Task
from dynlab.analysis.progress import Progress, warn_nonfinite
from dynlab.analysis.store import Layout, RegionWriter
from dynlab.analysis.task import compute_task, load_task, write_task
from dynlab.faults import fault_point
from dynlab.runs.checkpoints import LoadedCheckpoint, prefetch


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
    previous checkpoint's weights stay in memory for updates (read once): at most the
    current checkpoint, the next one and the previous weights are held."""
    pin = options.device.startswith("cuda")
    last: dict[tuple[str, int], dict] = {}  # touched by the loader thread only

    def load(task: Task) -> tuple[LoadedCheckpoint, Mapping[str, torch.Tensor] | None]:
        cached = None
        selection = None if task.cells is None else task.cells.key()  # what was read
        if task.previous is not None:  # usually the loader's last checkpoint: reuse it
            cached = last.get((task.run.name, task.previous.step, selection))
        ckpt, prev = load_task(task, options, cached)
        last.clear()
        if options.wants_updates:
            last[(task.run.name, task.checkpoint.step, selection)] = ckpt.weights
        if pin:
            ckpt, prev = pinned(ckpt), pinned_tensors(prev)
        return ckpt, prev

    with Progress(progress, len(tasks)) as advance, \
            ThreadPoolExecutor(1, thread_name_prefix="dynlab-write") as writes:
        pending: tuple[Task, Future] | None = None

        def written(task: Task, write: Future) -> None:
            write.result()  # the write's error, if any, is raised here
            fault_point("analyze.checkpoint")
            if on_checkpoint is not None:
                on_checkpoint(task)
            advance(task.label)

        for task, (ckpt, prev) in prefetch(tasks, load):
            values, bad = compute_task(task, ckpt, prev, layout, options)
            del ckpt, prev
            if bad:
                warn_nonfinite(task.checkpoint.path, bad)
            if pending is not None:
                written(*pending)
            # the store's region is written while the next checkpoint is computed; a kill
            # before its `analyzed` flag leaves the checkpoint to be analysed again
            pending = task, writes.submit(write_task, writer, task, values)
        if pending is not None:
            written(*pending)


def pinned_tensors(tensors: Mapping[str, torch.Tensor] | None) -> dict | None:
    """Page-locked copies, so the copy to the GPU can run asynchronously."""
    if tensors is None:
        return None
    return {k: v.pin_memory() for k, v in tensors.items()}


def pinned(ckpt: LoadedCheckpoint) -> LoadedCheckpoint:
    """The checkpoint with page-locked tensors."""
    return LoadedCheckpoint(ckpt.checkpoint, pinned_tensors(ckpt.weights),
                            pinned_tensors(ckpt.grads), ckpt.meta,
                            pinned_tensors(ckpt.train_grads))
