"""The `dynlab` command line: parse, call dynlab, print.

Each command lives in its own module and imports torch/xarray lazily inside the
command body, so `dynlab --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

#: every command: name -> (its module in dynlab_cli, the function or Typer app there, whether
#: it is a group of commands)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "analyze": ("analyze", "analyze", False),
    "train": ("train", "app", True),
    "eval": ("evaluate", "evaluate", False),
    "plot": ("viz", "plot", False),
    "report": ("viz", "report", False),
    "recompute": ("recompute", "recompute", False),
    "export": ("export", "export", False),
    "study": ("study", "app", True),
}


def print_version(value: bool) -> None:
    """`dynlab --version`: print dynlab's version (dynlab.version) and exit."""
    if value:
        from dynlab.version import __version__

        print(__version__)
        raise typer.Exit()


def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=print_version, is_eager=True,
        help="Print dynlab's version and exit.")] = False,
) -> None:
    pass


def version() -> None:
    """Print dynlab's version."""
    import dynlab

    print(dynlab.__version__)


def build(names: list[str] | None = None) -> typer.Typer:
    """The `dynlab` Typer app with the commands `names` (default every one, in the order of
    `COMMANDS`, then `version`), each command's module imported here."""
    app = typer.Typer(
        help="dynlab: learning dynamics of small language models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(main)
    for name in names if names is not None else [*COMMANDS, "version"]:
        if name == "version":
            app.command("version")(version)
            continue
        module, attr, group = COMMANDS[name]
        target = getattr(importlib.import_module(f"dynlab_cli.{module}"), attr)
        if group:
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def __getattr__(name: str) -> typer.Typer:
    """`app`, the whole command line (built when first asked for)."""
    if name == "app":
        globals()["app"] = build()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run() -> None:
    """The `dynlab` program (the console script and `python -m dynlab`): the app, with only
    the command named on the command line where there is one (so that the others' modules
    are neither imported nor turned into click commands: ≈ 0.1 s of each start), then every
    object still alive moved out of the garbage collector's sight (`gc.freeze`) before the
    interpreter shuts down, so that its final collection does not walk torch's million
    objects (≈ 0.4 s of every command's exit); nothing is skipped of the shutdown itself."""
    import gc

    asked = sys.argv[1] if len(sys.argv) > 1 else None
    names = [asked] if asked in COMMANDS or asked == "version" else None
    try:
        build(names)(prog_name="dynlab")
    finally:
        gc.freeze()


if __name__ == "__main__":
    run()
