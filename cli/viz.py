"""`dynlab plot` and `dynlab report`: figures and the offline HTML report of analysis stores."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class FigureKind(str, Enum):
    """Which figure `dynlab plot` draws."""

    trajectory = "trajectory"
    heatmap = "heatmap"
    spectrum = "spectrum"
    training = "training"
    relora = "relora"


SHORT = {"final step": "step", "final loss": "loss", "perplexity": "ppl", "PER weights": "PER w",
         "PER updates": "PER u", "CN weights": "CN w", "CN updates": "CN u"}


def _check_choice(what: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise typer.BadParameter(f"{what} '{value}' is not in the store; expected one of: "
                                 f"{', '.join(allowed)}", param_hint=f"--{what}")


def plot(
    store: Path = typer.Argument(..., help="Analysis store (Zarr directory)."),
    figure: FigureKind = typer.Option(FigureKind.trajectory, "--figure", "-f",
                                      help="Which figure to draw."),
    metric: str = typer.Option("per", "--metric", "-m", help="Metric variable, e.g. per, cn."),
    kind: str = typer.Option("weights", "--kind", "-k",
                             help="weights, grads, updates or lora."),
    matrix: str = typer.Option("ov_circuit", "--matrix",
                               help="Matrix, e.g. ov_circuit, attention.o_proj, swiglu.w_2."),
    layer: int = typer.Option(0, "--layer", help="Layer (spectrum figure)."),
    run: list[str] | None = typer.Option(None, "--run", "-r",
                                         help="Run to include (repeatable; default: all)."),
    output: Path = typer.Option(Path("fig.html"), "--output", "-o",
                                help="Output .html (offline, plotly.js inlined) or .png."),
) -> None:
    """Draw one figure of a store to an HTML (or PNG) file."""
    from dynlab_cli.console import guarded

    with guarded("plot"):
        _plot(store, figure, metric, kind, matrix, layer, run, output)


def _plot(store: Path, figure: FigureKind, metric: str, kind: str, matrix: str, layer: int,
          run: list[str] | None, output: Path) -> None:
    from dynlab.viz import figures as F
    from dynlab.viz.report import open_store, save_figure

    if output.suffix.lower() not in (".html", ".htm", ".png"):
        raise typer.BadParameter(f"{output}: expected a .html or .png file name",
                                 param_hint="--output")
    from dynlab.errors import InputError

    try:
        ds = open_store(store)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="STORE") from e
    except (ValueError, KeyError, TypeError, OSError) as e:  # a corrupt or foreign store
        raise InputError(f"store {store}: not a readable dynlab store ({e})") from e
    runs = list(run) if run else None
    for r in runs or []:
        _check_choice("run", r, [str(v) for v in ds["run"].values])
    if figure in (FigureKind.trajectory, FigureKind.heatmap, FigureKind.relora):
        _check_choice("metric", metric,
                      [str(v) for v in ds.data_vars if ds[v].dims[-2:] == ("layer", "matrix")])
    if figure not in (FigureKind.training,):
        _check_choice("kind", kind, [str(v) for v in ds["kind"].values])
        _check_choice("matrix", matrix, [str(v) for v in ds["matrix"].values])
    if figure is FigureKind.trajectory:
        fig = F.trajectory(ds, metric, kind, matrix, runs)
    elif figure is FigureKind.heatmap:
        fig = F.heatmap(ds, metric, kind, matrix, runs)
    elif figure is FigureKind.spectrum:
        fig = F.spectrum(ds, kind, matrix, layer, runs)
    elif figure is FigureKind.training:
        fig = F.training_curves(ds, runs)
    else:
        fig = F.relora_comparison(ds, (metric,), kind, matrix, runs)
    try:
        path = save_figure(fig, output)
    except (RuntimeError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--output") from e
    for note in (fig.layout.meta or {}).get("notes", []):
        print(f"note: {note}")
    print(f"wrote {path}")


def report(
    stores: list[Path] = typer.Argument(..., help="One or more analysis stores (Zarr)."),
    output: Path = typer.Option(Path("report.html"), "--output", "-o",
                                help="Output HTML file (self-contained, opens offline)."),
    title: str = typer.Option("dynlab report", "--title", help="Report title."),
    screenshot: Path | None = typer.Option(None, "--screenshot",
                                    help="Also save a PNG of the report's top (needs Chromium)."),
) -> None:
    """Write the study's figures and a per-run summary table into one offline HTML file."""
    from rich.console import Console
    from rich.table import Table

    from dynlab.viz import report as R
    from dynlab.viz.figures import summary_table
    from dynlab_cli.console import guarded

    with guarded("report"):
        try:
            path, ds, sections = R.write_report(stores, output, title)
        except RuntimeError as e:  # zarr's codecs on a damaged chunk file
            from dynlab.errors import DynlabFailure

            raise DynlabFailure(f"reading {', '.join(map(str, stores))}: {e} (a damaged data "
                                "file in the store?)") from None
    console = Console()
    for sec in sections:
        for note in sec.notes:
            console.print(f"note ({sec.title}): {note}")
    # CN_nz is in the HTML report's table; the terminal keeps to 80 columns
    tab = summary_table(ds).drop(columns=["CN_nz updates"]).rename(columns=SHORT)
    table = Table(title="summary (PER: mean, CN: geometric mean of the finite values, over "
                        "layers and matrices at the last step)")
    for col in ["run", *tab.columns]:
        table.add_column(col)
    for run, row in zip(tab.index, tab.itertuples(index=False), strict=True):
        table.add_row(str(run), *(R._fmt(v) for v in row))
    console.print(table)
    console.print(f"wrote {path} ({R.n_figures(sections)} figures)")
    if screenshot is not None:
        try:
            console.print(f"wrote {R.screenshot(path, screenshot)}")
        except RuntimeError as e:
            console.print(f"[yellow]no screenshot: {e}[/yellow]")
