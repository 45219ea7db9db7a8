"""The writer's lock of an analysis store: one `dynlab analyze` writes a store at a time.

The lock is the file `<store>.lock` beside the store (not inside it, so it stays valid while
the store directory is replaced by a rebuilt copy). The writer holds an exclusive `flock` on
it for its whole run and writes its pid, host, start time and command into it. The kernel
releases a `flock` when its holder dies, however it dies (SIGKILL included), so a lock left
by a killed process is stale by construction: the next writer takes it over at once, and
says so. On NFS, Linux maps `flock` to POSIX locks that the server releases with the dead
client's lease. Dask workers write disjoint regions under their client's lock and take none.

A store whose directory cannot hold the lock file (a read-only file system, no write
permission) is opened read-only: `StoreAccess.need` raises `StoreReadOnly` at the first write
the analysis would need, so a complete store still analyses to a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from dynlab.errors import DynlabFailure

READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


class StoreBusy(DynlabFailure):
    """Another process holds the store's writer lock (exit 1)."""


class StoreReadOnly(DynlabFailure):
    """The store needs a write that this file system or these permissions refuse (exit 1)."""


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


def holder_text(info: dict) -> str:
    """'pid 123 on host, since 2026-01-01T10:00:00Z (dynlab analyze ...)' from a lock's info."""
    if not info:
        return "a process that is just starting"
    text = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


def _read_info(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        info = json.loads(data.decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class StoreAccess:
    """What a writer may do with a store: `writable` under the lock, or read-only (`reason`).

    Use as a context manager; `wait` (seconds, or True for ever) waits for another writer
    to finish instead of refusing at once.
    """

    def __init__(self, store: Path, *, wait: bool | float = False, poll: float = 0.2):
        self.store = Path(store)
        self.path = lock_path(self.store)
        self.wait = wait
        self.poll = poll
        self.writable = False
        self.reason = ""
        self.took_over: dict | None = None  # info of a stale lock taken over
        self._fd: int | None = None
        self._made: list[Path] = []  # folders made for the store (removed if it never came)

    # -- acquiring
    def __enter__(self) -> StoreAccess:
        deadline = None if self.wait is True or not self.wait else time.monotonic() + self.wait
        waited = False
        while True:
            fd = self._open()
            if fd is None:
                return self
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                if self.wait and not waited:
                    waited = True
                    warnings.warn(f"{self.store}: waiting for the analysis that is writing it "
                                  f"({holder_text(info)})", stacklevel=3)
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    raise StoreBusy(
                        f"{self.store}: another dynlab analyze is writing this store "
                        f"({holder_text(info)}); rerun when it has finished, or with --wait "
                        f"to wait for it (lock file {self.path})"
                    ) from None
                time.sleep(self.poll)
                continue
            except OSError as e:
                os.close(fd)
                raise DynlabFailure(f"{self.path}: cannot lock ({e.strerror}); this file "
                                    "system does not support file locks") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it: retry
                os.close(fd)
                continue
            previous = _read_info(fd)
            if previous:
                self.took_over = previous
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "command": " ".join(["dynlab", *sys.argv[1:]])[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            self._fd, self.writable = fd, True
            return self

    def _open(self) -> int | None:
        try:
            missing = [p for p in [self.store.parent, *self.store.parent.parents]
                       if not p.exists()]
            self.store.parent.mkdir(parents=True, exist_ok=True)
            self._made = missing + [d for d in self._made if d not in missing]
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno not in READ_ONLY_ERRORS:
                raise
            self.reason = f"cannot create the lock file {self.path} ({e.strerror})"
            return None

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd, self.writable = None, False
        if not self.store.exists():  # nothing was written: remove the folders made for it
            for d in self._made:
                with contextlib.suppress(OSError):
                    d.rmdir()

    # -- asking
    def need(self, what: str) -> None:
        """Raise StoreReadOnly unless this process may write the store (`what` says why it
        must)."""
        if not self.writable:
            raise StoreReadOnly(f"{self.store}: the analysis needs to {what}, but {self.reason}")
