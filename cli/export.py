"""`dynlab export`: a store's results in another tool's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynlab_cli.options import ExportFormat, Store


def export(
    store: Store,
    out: Annotated[Path, typer.Option("--out", "-o", show_default=False,
                                      help="Output folder (required).")],
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="pico-analyze: per-step JSON files; tensorboard: event files, "
        "OUT/RUN/; wandb: an offline W&B run, OUT/RUN/wandb/ (extras tensorboard, wandb).",
    )] = ExportFormat.pico_analyze,
    run: Annotated[str | None, typer.Option(
        "--run", show_default=False,
        help="Only this run (default: every run; with several, one sub-folder each).")] = None,
    split: Annotated[str, typer.Option(
        "--split", help="The data-split suffix of the file names (pico-analyze's "
        "{metric}_{split}.json); 'train' also writes the kind train_grads as gradients.",
    )] = "val",
    prefix: Annotated[str, typer.Option(
        "--prefix", help="What each layer key starts with: pico-analyze's own files for a "
        "pico-train run use '_forward_module.layers.'.")] = "layers.",
) -> None:
    """Write STORE's metrics in another tool's layout: pico-analyze's
    OUT/step_N/{metric}_{split}.json files, TensorBoard event files or offline W&B runs."""
    from dynlab_cli.console import guarded
    with guarded("export"):
        from dynlab.analysis.export import export as run_export

        files = run_export(store, out, fmt=fmt.value, run=run, split=split, prefix=prefix)
    what = "runs" if fmt.value in ("tensorboard", "wandb") else "files"
    print(f"{out}: {len(files)} {what}")
