"""Analysis on a Dask cluster: one task per checkpoint, each writing its own store chunks.

The store's template (every variable's metadata, all data reading as NaN) is written by the
client before any task runs; a task reads its checkpoint (and the previous analysed one of its
run, for updates), computes every kind, writes its (run, step) chunks through zarr and sets its
`analyzed` flag last. Chunks are one (run, step) each, so writers never share a chunk and the
result is identical to a serial run's; a rerun skips flagged checkpoints as in serial. The
client holds the store's writer lock (`analysis.storelock`) while the tasks run; the workers take
no lock: writing disjoint chunks, they are the one legitimate set of concurrent writers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from dynlab.analysis.store import Layout


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


def analyze_one(task, path: str, layout: Layout, options, threads: int | None = None) -> list:
    """Run on a worker: analyse one checkpoint into the store at `path`."""
    import torch

    from dynlab.analysis.run import analyze_task, load_task
    from dynlab.analysis.store import RegionWriter

    if threads:
        torch.set_num_threads(threads)
    loaded, prev = load_task(task, options)
    writer = RegionWriter(Path(path))
    return analyze_task(task, loaded, prev, writer, layout, options)


def run_tasks_on_dask(
    tasks: Sequence,
    path: Path,
    layout: Layout,
    options,
    scheduler: str,
    *,
    progress: bool = True,
) -> None:
    """Submit one task per checkpoint to a Dask cluster and wait for all of them."""
    from dask.distributed import Client, LocalCluster, as_completed

    from dynlab.analysis.run import _progress, _warn_nonfinite

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
        with _progress(progress, len(futures)) as advance:
            for fut in as_completed(futures):
                task = futures[fut]
                bad = fut.result()
                if bad:
                    with warnings.catch_warnings():
                        warnings.simplefilter("always")
                        _warn_nonfinite(task, bad)
                advance(f"{task.run.name} step {task.checkpoint.step}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
