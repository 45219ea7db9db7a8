"""The writer's lock of an analysis store: one `dynlab analyze` writes a store at a time.

The lock is `dynlab.locking.WriterLock` (shared with the trainer's run directory): the file
`<store>.lock` beside the store (not inside it, so it stays valid while the store directory
is replaced by a rebuilt copy), held with an exclusive `flock` for the whole run and naming
its holder; a lock left by a killed process is stale by construction and the next writer
takes it over at once, and says so. Dask workers write disjoint regions under their client's
lock and take none.

A store whose directory cannot hold the lock file (a read-only file system, no write
permission) is opened read-only: `StoreAccess.need` raises `StoreReadOnly` at the first write
the analysis would need, so a complete store still analyses to a no-op.
"""

from __future__ import annotations

from pathlib import Path

from dynlab.errors import DynlabFailure
from dynlab.locking import READ_ONLY_ERRORS, Busy, WriterLock, holder_text, lock_path

__all__ = ["READ_ONLY_ERRORS", "StoreAccess", "StoreBusy", "StoreReadOnly", "holder_text",
           "lock_path"]


class StoreBusy(Busy):
    """Another process holds the store's writer lock (exit 1)."""


class StoreReadOnly(DynlabFailure):
    """The store needs a write that this file system or these permissions refuse (exit 1)."""


class StoreAccess(WriterLock):
    """What a writer may do with a store: `writable` under the lock, or read-only (`reason`).

    Use as a context manager; `wait` (seconds, or True for ever) waits for another writer
    to finish instead of refusing at once. The lock itself is `dynlab.locking.WriterLock`.
    """

    busy_error = StoreBusy

    def __init__(self, store: Path, *, wait: bool | float = False, poll: float = 0.2):
        super().__init__(store, wait=wait, poll=poll,
                         what="dynlab analyze is writing this store",
                         hint="rerun when it has finished, or with --wait to wait for it")
        self.store = self.target
        self.reason = ""

    def waiting_message(self, info: dict) -> str:
        return (f"{self.store}: waiting for the analysis that is writing it "
                f"({holder_text(info)})")

    def open_lock(self) -> int | None:
        try:
            return super().open_lock()
        except OSError as e:
            if e.errno not in READ_ONLY_ERRORS:
                raise
            self.reason = f"cannot create the lock file {self.path} ({e.strerror})"
            return None

    def __enter__(self) -> StoreAccess:
        self.acquire()
        return self

    # -- asking
    def need(self, what: str) -> None:
        """Raise StoreReadOnly unless this process may write the store (`what` says why it
        must)."""
        if not self.writable:
            raise StoreReadOnly(f"{self.store}: the analysis needs to {what}, but {self.reason}")
