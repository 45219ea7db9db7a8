"""`dynlab recompute`: metrics that need only σ, from a store's stored spectra."""

from __future__ import annotations

from pathlib import Path

import typer


def recompute(
    store: Path = typer.Argument(..., help="A Zarr store written by `dynlab analyze`.",
                                 show_default=False),
    metrics: str = typer.Option(
        ..., "--metrics", "-m",
        help="Comma list of metrics computable from the singular values (e.g. alpha, "
        "alpha_ks, alpha_n_tail, per, cn), or 'all' for every such metric.",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Compute metrics from the singular values already in STORE, without the checkpoints.
    New metrics are added to the store, existing ones are overwritten."""
    from dynlab_cli.console import guarded

    with guarded("recompute"):
        from dynlab.analysis.recompute import recompute as run_recompute

        written = run_recompute(store, metrics, progress=progress)
        print(f"{store}: wrote {', '.join(written)}")
