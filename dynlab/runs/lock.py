"""The writer's lock of a training run directory: one `dynlab train` writes a run at a time.

    with run_lock(Path("runs/r")):
        ...  # set up, train and checkpoint runs/r

The lock is `dynlab.locking.WriterLock` on `<run>.lock` beside the run directory (outside it,
so `--overwrite` and a fresh run's "empty --out" check never see it). A second `dynlab train`
on the same directory (a second terminal with --resume, a scheduler that starts a job twice)
is refused before it reads or writes anything, with exit 1 and the holder's pid, host, start
time and command. A lock left by a killed trainer is stale: the next run takes it over.
"""

from __future__ import annotations

from pathlib import Path

from dynlab.locking import Busy, WriterLock


class RunBusy(Busy):
    """Another `dynlab train` holds the run directory's lock (exit 1)."""


class RunLock(WriterLock):
    """The single-writer lock of one run directory (module docstring)."""

    busy_error = RunBusy


def run_lock(run_dir: str | Path, *, wait: bool | float = False) -> RunLock:
    """The (not yet taken) lock of `run_dir`; enter it to take it."""
    return RunLock(Path(run_dir).expanduser().resolve(), wait=wait,
                   what="dynlab train is writing this run directory",
                   hint="wait for it to finish (then continue with --resume), or train into "
                        "another --out")
