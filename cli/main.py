"""The `dynlab` command line: parse, call dynlab, print.

Each command lives in its own module and imports torch/xarray lazily inside the
command body, so `dynlab --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dynlab_cli import analyze as _analyze
from dynlab_cli import evaluate as _evaluate
from dynlab_cli import export as _export
from dynlab_cli import recompute as _recompute
from dynlab_cli import study as _study
from dynlab_cli import train as _train
from dynlab_cli import viz as _viz

app = typer.Typer(
    help="dynlab: learning dynamics of small language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def print_version(value: bool) -> None:
    """`dynlab --version`: print dynlab's version (dynlab.version) and exit."""
    if value:
        from dynlab.version import __version__

        print(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=print_version, is_eager=True,
        help="Print dynlab's version and exit.")] = False,
) -> None:
    pass


app.command("analyze")(_analyze.analyze)
app.add_typer(_train.app, name="train")
app.command("eval")(_evaluate.evaluate)
app.command("plot")(_viz.plot)
app.command("report")(_viz.report)
app.command("recompute")(_recompute.recompute)
app.command("export")(_export.export)
app.add_typer(_study.app, name="study")


@app.command()
def version() -> None:
    """Print dynlab's version."""
    import dynlab

    print(dynlab.__version__)


def run() -> None:
    """The `dynlab` program (the console script and `python -m dynlab`): `app`, then every
    object still alive moved out of the garbage collector's sight (`gc.freeze`) before the
    interpreter shuts down, so that its final collection does not walk torch's million
    objects (≈ 0.4 s of every command's exit); nothing is skipped of the shutdown itself."""
    import gc

    try:
        app(prog_name="dynlab")
    finally:
        gc.freeze()


if __name__ == "__main__":
    run()
