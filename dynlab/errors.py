"""The errors dynlab raises for a user to read, and the exit code each one maps to.

Every command line of dynlab follows one policy (see `dynlab_cli.console`):

    0    success
    1    failure: the input was fine but the work could not be done (a diverged run, a store
         held by another process, a disk that refuses a write)
    2    bad input: a file or an argument is not what dynlab expects; the message names it
    130  interrupted (Ctrl-C / SIGINT); rerunning the same command resumes

Library code raises `InputError` (or a subclass) for bad input and `DynlabFailure` for a
failure; both carry a message that names the file or argument and what was expected.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class DynlabError(Exception):
    """Base of dynlab's user-facing errors; `exit_code` is the command line's exit status."""

    exit_code = EXIT_FAILURE


class InputError(DynlabError, ValueError):
    """A file or argument is not what dynlab expects (exit 2). The message names it."""

    exit_code = EXIT_BAD_INPUT


class DynlabFailure(DynlabError, RuntimeError):
    """The input is valid but the work could not be done (exit 1)."""

    exit_code = EXIT_FAILURE


# ---------------------------------------------------------------- quoting untrusted text

#: characters a terminal acts on: C0 controls but newline and tab, DEL, C1 controls (0x9b is
#: a one-byte CSI), and the bidirectional overrides that reorder what is shown
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]
            if c not in (0x09, 0x0A)}
_CONTROL |= {c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def printable(text: object) -> str:
    """`str(text)` with every character a terminal would act on written as an escape
    (`\\x1b`, `\\x07`, `\\u202e`, ...): ESC can retitle a window (OSC) or clear the screen
    (CSI), carriage return can overwrite what was printed. Newline and tab are kept. Every
    message dynlab prints passes through it (dynlab_cli.console)."""
    return str(text).translate(_CONTROL)


def quoted(value: object, limit: int = 200) -> str:
    """A value read from an untrusted file, for an error message: `repr(value)` (quotes, and
    control characters escaped), cut to `limit` characters with '...'."""
    text = printable(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
