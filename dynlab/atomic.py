"""Atomic file replacement: the one primitive every dynlab writer of a small file uses (run
files, checkpoint metadata, the store's metadata and journal, exported JSON, cached
tokenizers, the HTML report and figures). Readers see the old file or the new one, never a
partial one."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: str | Path, write: Callable[[Path], object],
                       tmp_name: str | None = None) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path` (default `.<name>.tmp-<pid>`, or
    `tmp_name`), then rename it over `path` (`os.replace`, atomic on POSIX). The temporary
    file is removed if anything fails, and `path` is left as it was. A full disk raises
    OSError(ENOSPC) naming `path`. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(tmp_name or f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp, path, e)
        raise
    return path


def write_bytes_atomically(path: str | Path, data: bytes) -> None:
    """`path` holds `data`, replaced atomically as `replace_atomically` does (the same
    temporary name), in plain os calls: for the many small chunk files of a store."""
    path = os.fspath(path)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp, path, e)
        raise


def _discard(tmp: str | Path, path: str | Path, error: BaseException) -> None:
    """Remove the temporary file of a failed replacement; a full disk raises OSError(ENOSPC)
    naming `path`."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) \
            and error.filename in (None, str(tmp)):
        raise OSError(error.errno, error.strerror, str(path)) from None


def write_text_atomically(path: str | Path, text: str, tmp_name: str | None = None) -> Path:
    """`path` holds `text` (UTF-8), replaced atomically (see `replace_atomically`)."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"),
                              tmp_name)
