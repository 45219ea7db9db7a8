"""`dynlab export`: a store's results in another tool's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynlab_cli.options import ExportFormat, Store


def export(
    store: Store,
    old_out: Annotated[Path | None, typer.Argument(
        hidden=True, show_default=False, metavar="OUT",
        help="Deprecated: the output folder as a second argument; use -o/--out.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                             help="Output folder (required).")] = None,
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="pico-analyze: per-step JSON files.")] = ExportFormat.pico_analyze,
    run: Annotated[str | None, typer.Option(
        "--run", show_default=False,
        help="Only this run (default: every run; with several, one sub-folder each).")] = None,
    split: Annotated[str, typer.Option(
        "--split", help="The data-split suffix of the file names (pico-analyze's "
        "{metric}_{split}.json).")] = "val",
) -> None:
    """Write STORE's metrics as pico-analyze's OUT/step_N/{metric}_{split}.json files."""
    from dynlab_cli.console import guarded, warn

    if old_out is not None:
        if out is not None:
            raise typer.BadParameter("give the output folder once, as -o/--out",
                                     param_hint="OUT")
        warn("the output folder as a second argument is deprecated; use -o/--out")
        out = old_out
    if out is None:
        raise typer.BadParameter("missing the output folder", param_hint="-o/--out")
    with guarded("export"):
        from dynlab.analysis.export import export as run_export

        files = run_export(store, out, fmt=fmt.value, run=run, split=split)
    print(f"{out}: {len(files)} files")
