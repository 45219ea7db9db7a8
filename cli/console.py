"""One console and one exit-code policy for every `dynlab` command.

    with guarded("analyze"):
        ...  # the command's work

maps what escapes the block to a one-line message on stderr and an exit code
(`dynlab.errors`): 2 for bad input (InputError, ValueError, missing files), 1 for a failure
(DynlabFailure, RuntimeError, OSError such as a read-only disk), 130 for Ctrl-C with
"interrupted; rerun the same command to resume". Anything else is a bug and keeps its
traceback. Warnings are printed as one yellow line each.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import typer

from dynlab.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    DynlabError,
    DynlabFailure,
    InputError,
    printable,
)

if TYPE_CHECKING:
    from rich.console import Console


def __getattr__(name: str) -> Console:
    """`console` (progress, warnings, notes and errors: stderr) and `stdout` (results: tables
    and the paths written), rich consoles made when first asked for: a command that prints
    nothing does not import rich (≈ 0.04 s of its start)."""
    if name in ("console", "stdout"):
        from rich.console import Console

        globals().setdefault("console", Console(stderr=True, soft_wrap=True, highlight=False))
        globals().setdefault("stdout", Console())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stderr_console() -> Console:
    """`console`, made if need be (for this module's own printing)."""
    return globals()["console"] if "console" in globals() else __getattr__("console")

#: exception types that mean "bad input" (exit 2) when they escape a command
BAD_INPUT: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
    KeyError, UnicodeDecodeError,
)
#: exception types that mean "failure" (exit 1)
FAILURE: tuple[type[BaseException], ...] = (RuntimeError, OSError, ImportError)

INTERRUPTED_MESSAGE = "interrupted; rerun the same command to resume"


def plain(text: object) -> str:
    """Text for a rich console that prints as it is: control characters escaped
    (dynlab.errors.printable) and rich markup escaped, so file content, run names and paths
    (`[/x]`, ESC sequences) can neither break nor drive the terminal."""
    from rich.markup import escape

    return escape(printable(text))


def error(message: object, where: str = "") -> None:
    """One red line on stderr: '<where>error: <message>'."""
    stderr_console().print(f"[red]{plain(where)}error:[/] {plain(message)}")


def warn(message: object) -> None:
    """One yellow line on stderr: 'warning: <message>'."""
    stderr_console().print(f"[yellow]warning:[/] {plain(message)}")


def note(message: object) -> None:
    """One line on stderr: 'note: <message>'."""
    stderr_console().print(f"note: {plain(message)}")


def show_warnings() -> None:
    """Print Python warnings as one console line each (no file/line noise)."""

    def show(message, category, filename, lineno, file=None, line=None):
        warn(message)

    warnings.showwarning = show


def exit_code(err: BaseException) -> int:
    """The exit status for an exception escaping a command (see the module docstring)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, DynlabError):
        return err.exit_code
    if isinstance(err, BAD_INPUT):
        return EXIT_BAD_INPUT
    if isinstance(err, FAILURE):
        return EXIT_FAILURE
    raise err


@contextlib.contextmanager
def guarded(where: str = "") -> Iterator[None]:
    """Run a command body under the exit-code policy (module docstring), with Python warnings
    shown as console lines (the previous warnings.showwarning is restored on exit)."""
    previous = warnings.showwarning
    show_warnings()
    try:
        yield
    except (typer.Exit, typer.Abort, typer.BadParameter, SystemExit):
        raise
    except KeyboardInterrupt:
        stderr_console().print(INTERRUPTED_MESSAGE)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (DynlabError, *BAD_INPUT, *FAILURE) as err:
        prefix = f"{where} " if where else ""
        error(message(err), prefix)
        raise typer.Exit(exit_code(err)) from None
    finally:
        warnings.showwarning = previous


def message(err: BaseException) -> str:
    """The one-line text of an exception for the user."""
    if isinstance(err, KeyError):
        return f"missing key {err}"
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {err.filename}" if err.filename else ""
        return f"disk full: no space left on the device{where}"
    return str(err) or type(err).__name__


def checkpoint_error(where: object, err: BaseException) -> DynlabError:
    """`err` (of BAD_INPUT or FAILURE) prefixed by `where`, with the same exit status."""
    text = f"{where}: {message(err)}"
    return InputError(text) if exit_code(err) == EXIT_BAD_INPUT else DynlabFailure(text)


# `console` and `stdout` are made when first imported (module `__getattr__`)
__all__ = ["error", "warn", "note", "plain", "guarded", "exit_code", "show_warnings",
           "message", "checkpoint_error", "stderr_console",
           "EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_INTERRUPTED", "INTERRUPTED_MESSAGE"]


@contextlib.contextmanager
def settled_imports() -> Iterator[None]:
    """Around a command's heavy imports (torch, zarr: about a million objects that live as
    long as the process): the garbage collector paused while they run, and what they created
    moved out of its sight afterwards (`gc.freeze`), so that the collections of the
    command's own work do not walk them again and again. Only the collector's bookkeeping
    changes: objects are freed as before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
