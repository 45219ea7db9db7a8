"""The single-writer lock of a dynlab output (an analysis store, a training run directory).

    with WriterLock(Path("runs/r"), what="dynlab train is writing this run directory"):
        ...  # the only writer of runs/r

The lock is the file `<target>.lock` beside the target (not inside it, so it stays valid
while the target is replaced by a rebuilt copy). The writer holds an exclusive `flock` on it
for its whole run and writes its pid, host, start time and command into it. The kernel
releases a `flock` when its holder dies, however it dies (SIGKILL included), so a lock left
by a killed process is stale by construction: the next writer takes it over at once and
`took_over` holds what the dead writer had recorded. On NFS, Linux maps `flock` to POSIX
locks that the server releases with the dead client's lease.

A second writer is refused at once (`Busy`, exit 1, naming the holder), or with `wait`
(seconds, or True for ever) waits for the holder to finish. Subclasses choose the error and
the words (`busy_error`, `busy_message`, `waiting_message`) and how the lock file is opened
(`open_lock`, which may return None for "cannot lock": the target is then read-only).
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

#: errors that mean "this file system or these permissions refuse a write"
READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


class Busy(DynlabFailure):
    """Another process holds the writer lock (exit 1)."""


def lock_path(target: Path) -> Path:
    """`<target>.lock`, beside the target."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


def holder_text(info: dict | None) -> str:
    """'pid 123 on host, since 2026-01-01T10:00:00Z (dynlab analyze ...)' from a lock's info."""
    if not info:
        return "a process that is just starting"
    text = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


def read_info(fd: int) -> dict:
    """The holder's record in an open lock file ({} when empty or unreadable)."""
    try:
        data = os.pread(fd, 65536, 0)
        info = json.loads(data.decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def holder_record() -> dict:
    """What this process writes into a lock it holds: pid, host, start time, command."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join(["dynlab", *sys.argv[1:]])[:500]}


class WriterLock:
    """An exclusive, stale-proof lock on `<target>.lock` (module docstring); a context
    manager. `what` completes "another ..." in the refusal ("dynlab train is writing this
    run directory"); `hint` says what to do about it."""

    busy_error: type[DynlabFailure] = Busy

    def __init__(self, target: Path, *, wait: bool | float = False, poll: float = 0.2,
                 what: str = "dynlab command is writing this output",
                 hint: str = "rerun when it has finished") -> None:
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.wait = wait
        self.poll = poll
        self.what, self.hint = what, hint
        self.writable = False
        self.took_over: dict | None = None  # info of a stale lock taken over
        self._fd: int | None = None
        self._made: list[Path] = []  # folders made for the lock file

    # -- words (subclasses may change them)
    def busy_message(self, info: dict) -> str:
        return (f"{self.target}: another {self.what} ({holder_text(info)}); {self.hint} "
                f"(lock file {self.path})")

    def waiting_message(self, info: dict) -> str:
        return f"{self.target}: waiting for the {self.what.split(' is ')[0]} that holds it " \
               f"({holder_text(info)})"

    def open_lock(self) -> int | None:
        """The lock file's descriptor (created when missing, with the folders above it: those
        are removed on release when the target never came); None when it cannot be made."""
        parent = self.target.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        self._made = missing + [d for d in self._made if d not in missing]
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    # -- acquiring
    def acquire(self) -> bool:
        """Take the lock (waiting or refusing as configured); False when `open_lock` gave
        no file (nothing is held then)."""
        deadline = None if self.wait is True or not self.wait else time.monotonic() + self.wait
        waited = False
        while True:
            fd = self.open_lock()
            if fd is None:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = read_info(fd)
                os.close(fd)
                if self.wait and not waited:
                    waited = True
                    warnings.warn(self.waiting_message(info), stacklevel=4)
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    raise self.busy_error(self.busy_message(info)) from None
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
            previous = read_info(fd)
            if previous:
                self.took_over = previous
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
            self._fd, self.writable = fd, True
            return True

    def release(self) -> None:
        """Give the lock up and remove its file (a no-op when not held)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd, self.writable = None, False
        if not self.target.exists():  # nothing was written: remove the folders made for it
            for d in self._made:
                with contextlib.suppress(OSError):
                    d.rmdir()

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
