"""The Dask executor: one task per checkpoint, each writing its own store chunks.

The store's template (every variable's metadata, all data reading as NaN) is written by the
client before any task runs; a task reads its checkpoint (and the previous analysed one of its
run, for updates), computes every kind, writes its (run, step) region through zarr and sets its
`analyzed` flag last (`dynlab.analysis.task`, the same code as the serial executor). Chunks are
one (run, step) each, so writers never share a chunk and the result is identical to a serial
run's; a rerun skips flagged checkpoints as in serial. The client holds the store's writer lock
(`analysis.storelock`) while the tasks run; the workers take no lock: writing disjoint chunks,
they are the one legitimate set of concurrent writers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from dynlab.analysis.plan import Options, Task
from dynlab.analysis.progress import Progress, warn_nonfinite
from dynlab.analysis.store import Layout, RegionWriter
from dynlab.analysis.task import load_task, run_task


def parse_scheduler(scheduler: str) -> tuple[str, int | str]:
    """'local:N' -> ('local', N); 'tcp://HOST:PORT' -> ('address', 'tcp://HOST:PORT')."""
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--scheduler {scheduler!r}: expected local:N with N >= 1 workers")
        return "local", n
    if scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        return "address", scheduler
    raise ValueError(
        f"--scheduler {scheduler!r}: expected 'local:N' or a Dask scheduler address "
        "such as 'tcp://HOST:8786'"
    )


def analyze_one(task: Task, path: str, layout: Layout, options: Options,
                threads: int | None = None) -> list[str]:
    """Run on a worker: analyse one checkpoint into the store at `path`; returns the matrices
    that held NaN/Inf."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    loaded, prev = load_task(task, options)
    return run_task(task, loaded, prev, RegionWriter(Path(path)), layout, options)


def run_tasks_on_dask(
    tasks: Sequence[Task],
    path: Path,
    layout: Layout,
    options: Options,
    scheduler: str,
    *,
    progress: bool = True,
) -> None:
    """Submit one task per checkpoint to a Dask cluster and wait for all of them."""
    from dask.distributed import Client, LocalCluster, as_completed

    how, arg = parse_scheduler(scheduler)
    cluster = None
    threads = None
    if how == "local":
        threads = max(1, (os.cpu_count() or 1) // int(arg))
        cluster = LocalCluster(n_workers=int(arg), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(arg, timeout="30s")
    try:
        futures = {
            client.submit(analyze_one, task, str(path), layout, options, threads, pure=False): task
            for task in tasks
        }
        with Progress(progress, len(futures)) as advance:
            for fut in as_completed(futures):
                task = futures[fut]
                bad = fut.result()
                if bad:
                    with warnings.catch_warnings():
                        warnings.simplefilter("always")
                        warn_nonfinite(task.checkpoint.path, bad)
                advance(task.label)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
