"""`dynlab export`: a store's results in another tool's layout."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    store: Path = typer.Argument(..., help="A Zarr store written by `dynlab analyze`.",
                                 show_default=False),
    out: Path = typer.Argument(..., help="Output folder.", show_default=False),
    fmt: str = typer.Option("pico-analyze", "--format", help="pico-analyze (per-step JSON)."),
    run: str | None = typer.Option(None, "--run", help="Only this run (default: every run; "
                                   "with several, one sub-folder each)."),
    split: str = typer.Option("val", "--split", help="The data-split suffix of the file "
                              "names (pico-analyze's {metric}_{split}.json)."),
) -> None:
    """Write STORE's metrics as pico-analyze's OUT/step_N/{metric}_{split}.json files."""
    from dynlab_cli.console import guarded

    with guarded("export"):
        from dynlab.analysis.export import export as run_export

        files = run_export(store, out, fmt=fmt, run=run, split=split)
        print(f"{out}: {len(files)} files")
