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
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str, tmp_name: str | None = None) -> Path:
    """`path` holds `text` (UTF-8), replaced atomically (see `replace_atomically`)."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"),
                              tmp_name)
