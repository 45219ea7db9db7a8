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
