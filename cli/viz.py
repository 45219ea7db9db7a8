"""`dynlab plot` and `dynlab report`: figures and the offline HTML report of analysis stores."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from dynlab.errors import printable
from dynlab_cli.options import kinds_option, metrics_option, split


class FigureKind(str, Enum):
    """Which figure `dynlab plot` draws."""

    trajectory = "trajectory"
    heatmap = "heatmap"
    spectrum = "spectrum"
    training = "training"
    relora = "relora"


#: the figures that draw a metric, and those that draw a kind of matrix
USES_METRIC = (FigureKind.trajectory, FigureKind.heatmap, FigureKind.relora)
USES_KIND = (FigureKind.trajectory, FigureKind.heatmap, FigureKind.relora, FigureKind.spectrum)

SHORT = {"final step": "step", "final loss": "loss", "perplexity": "ppl", "PER weights": "PER w",
         "PER updates": "PER u", "CN weights": "CN w", "CN updates": "CN u"}

def _check_choice(what: str, value: str, allowed: list[str], flag: str = "") -> None:
    if value not in allowed:
        raise typer.BadParameter(printable(f"{what} '{value}' is not in the store; expected "
                                           f"one of: {', '.join(allowed)}"),
                                 param_hint=flag or f"--{what}")


def figure_files(out: Path, figure: FigureKind, metrics: list[str], kinds: list[str]
                 ) -> list[tuple[tuple[str, ...], str | None, Path]]:
    """(metrics, kind, file) of each figure `dynlab plot` draws: one per metric and kind
    (the relora figure: one per kind, every metric in it). One figure is written to `out`;
    several to `out` with _<metric>_<kind> before the suffix."""
    kinds_: list[str | None] = list(kinds) if figure in USES_KIND else [None]
    if figure is FigureKind.relora:
        groups = [tuple(metrics)]
    elif figure in USES_METRIC:
        groups = [(m,) for m in metrics]
    else:
        groups = [()]
    plan = [(g, k) for g in groups for k in kinds_]
    if len(plan) == 1:
        return [(plan[0][0], plan[0][1], out)]
    return [(g, k, out.with_name("_".join([out.stem, *g, *([k] if k else [])]) + out.suffix))
            for g, k in plan]


def plot(
    store: Annotated[Path, typer.Argument(help="Analysis store (Zarr directory).",
                                          show_default=False)],
    figure: Annotated[FigureKind, typer.Option(
        "--figure", "-f", help="Which figure to draw.")] = FigureKind.trajectory,
    metrics: Annotated[str | None, metrics_option(
        help="Comma list of metric variables, e.g. per,cn (default per): one figure each "
        "(the relora figure: all in one). trajectory, heatmap and relora only.")] = None,
    kinds: Annotated[str | None, kinds_option(
        help="Comma list of weights, grads, updates, lora, train_grads (default weights): "
        "one figure each. Every figure but training.")] = None,
    matrix: Annotated[str, typer.Option(
        "--matrix", help="Matrix, e.g. ov_circuit, attention.o_proj, swiglu.w_2.",
    )] = "ov_circuit",
    layer: Annotated[int, typer.Option("--layer", help="Layer (spectrum figure).")] = 0,
    run: Annotated[list[str] | None, typer.Option(
        "--run", "-r", show_default=False,
        help="Run to include (repeatable; default: all).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Output .html (offline, plotly.js inlined) or .png (default fig.html). With "
        "several figures: OUT's name with _<metric>_<kind> before the suffix.")] = None,
) -> None:
    """Draw figures of a store to HTML (or PNG) files: one per metric and kind given."""
    from dynlab_cli.console import guarded

    out = Path("fig.html") if out is None else out
    if metrics is not None and figure not in USES_METRIC:
        raise typer.BadParameter(f"--figure {figure.value} draws no metric",
                                 param_hint="--metrics")
    if kinds is not None and figure not in USES_KIND:
        raise typer.BadParameter(f"--figure {figure.value} draws no kind of matrix",
                                 param_hint="--kinds")
    if "all" in split(metrics) or "all" in split(kinds):
        raise typer.BadParameter("name the metrics and kinds to draw ('all' is for "
                                 "dynlab analyze)", param_hint="--metrics/--kinds")
    with guarded("plot"):
        _plot(store, figure, split(metrics) or ["per"], split(kinds) or ["weights"], matrix,
              layer, run, out)


def _plot(store: Path, figure: FigureKind, metrics: list[str], kinds: list[str], matrix: str,
          layer: int, run: list[str] | None, out: Path) -> None:
    from dynlab.errors import InputError
    from dynlab.viz import figures as F
    from dynlab.viz.report import open_store, save_figure
    from dynlab_cli.console import note

    if out.suffix.lower() not in (".html", ".htm", ".png"):
        raise typer.BadParameter(f"{out}: expected a .html or .png file name",
                                 param_hint="--out")
    try:
        ds = open_store(store)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="STORE") from e
    except (ValueError, KeyError, TypeError, OSError) as e:  # a corrupt or foreign store
        raise InputError(f"store {store}: not a readable dynlab store ({e})") from e
    runs = list(run) if run else None
    for r in runs or []:
        _check_choice("run", r, [str(v) for v in ds["run"].values])
    if figure in USES_METRIC:
        variables = [str(v) for v in ds.data_vars if ds[v].dims[-2:] == ("layer", "matrix")]
        for metric in metrics:
            _check_choice("metric", metric, variables, "--metrics")
    if figure in USES_KIND:
        for kind in kinds:
            _check_choice("kind", kind, [str(v) for v in ds["kind"].values], "--kinds")
        _check_choice("matrix", matrix, [str(v) for v in ds["matrix"].values])
    for group, kind, path in figure_files(out, figure, metrics, kinds):
        if figure is FigureKind.trajectory:
            fig = F.trajectory(ds, group[0], kind, matrix, runs)
        elif figure is FigureKind.heatmap:
            fig = F.heatmap(ds, group[0], kind, matrix, runs)
        elif figure is FigureKind.spectrum:
            fig = F.spectrum(ds, kind, matrix, layer, runs)
        elif figure is FigureKind.training:
            fig = F.training_curves(ds, runs)
        else:
            fig = F.relora_comparison(ds, group, kind, matrix, runs)
        try:
            written = save_figure(fig, path)
        except (RuntimeError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--out") from e
        for text in (fig.layout.meta or {}).get("notes", []):
            note(text)
        print(f"wrote {written}")


def report(
    stores: Annotated[list[Path], typer.Argument(
        help="One or more analysis stores (Zarr).", show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Output HTML file, self-contained, opens offline (default report.html).",
    )] = None,
    title: Annotated[str, typer.Option("--title", help="Report title.")] = "dynlab report",
    screenshot: Annotated[Path | None, typer.Option(
        "--screenshot", show_default=False,
        help="Also save a PNG of the report's top (needs Chromium).")] = None,
) -> None:
    """Write the study's figures and a per-run summary table into one offline HTML file."""
    from rich.table import Table

    from dynlab.viz import report as R
    from dynlab.viz.figures import summary_table
    from dynlab_cli.console import guarded, note, plain, stdout, warn

    out = Path("report.html") if out is None else out
    with guarded("report"):
        claims = study_claims(stores)
        try:
            path, ds, sections = R.write_report(stores, out, title,
                                                claims=[c.as_dict() for c in claims] or None)
        except RuntimeError as e:  # zarr's codecs on a damaged chunk file
            from dynlab.errors import DynlabFailure

            raise DynlabFailure(f"reading {', '.join(map(str, stores))}: {e} (a damaged data "
                                "file in the store?)") from None
    for sec in sections:
        for text in sec.notes:
            note(f"({sec.title}) {text}")
    # CN_nz is in the HTML report's table; the terminal keeps to 80 columns
    tab = summary_table(ds).drop(columns=["CN_nz updates"]).rename(columns=SHORT)
    table = Table(title="summary (PER: mean, CN: geometric mean of the finite values, over "
                        "layers and matrices at the last step)")
    for col in ["run", *tab.columns]:
        table.add_column(plain(col))
    for run, row in zip(tab.index, tab.itertuples(index=False), strict=True):
        table.add_row(plain(run), *(R.format_value(v) for v in row))
    stdout.print(table)
    stdout.print(f"wrote {plain(path)} ({R.n_figures(sections)} figures)")
    if screenshot is not None:
        with guarded("report"):
            try:
                stdout.print(f"wrote {plain(R.screenshot(path, screenshot))}")
            except RuntimeError as e:
                warn(f"no screenshot: {e}")


def study_claims(stores: list[Path]) -> list:
    """The claims of every store that holds a study (dynlab.experiment.design: OUT/study.json
    beside OUT/analysis.zarr, or sibling seeds of a decoder and a relora condition), printed
    as `dynlab study report` prints them; with several stores each scale is prefixed with its
    store's name. A store that cannot be read is left to the report to complain about."""
    from dataclasses import replace

    from dynlab.errors import InputError
    from dynlab.experiment.design import store_claims
    from dynlab.viz.report import open_store
    from dynlab_cli.console import note, warn
    from dynlab_cli.study import print_claims

    out = []
    for store in stores:
        try:
            ds = open_store(store)
        except Exception:  # noqa: BLE001 (write_report raises the clear message)
            continue
        try:
            found = store_claims(store, ds)
        except InputError as err:  # a damaged study.json: the report without claims
            warn(f"no Claims section: {err}")
            continue
        if found is None:
            continue
        design, results, source = found
        note(f"{store} holds study {design.get('name')} (from its {source}): the report "
             "starts with its claims")
        print_claims(results, design)
        if len(stores) > 1:
            results = [replace(r, scale=f"{Path(store).name}: {r.scale}") for r in results]
        out.extend(results)
    return out
