"""`dynlab analyze`: spectral metrics of checkpoints into a Zarr store."""

from __future__ import annotations

from pathlib import Path

import typer


def analyze(
    runs: list[Path] = typer.Argument(
        ..., help="RUN dirs, RUN/checkpoints dirs, or folders of runs.", show_default=False
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o",
        help="Zarr store to write (default: analysis.zarr beside the first run).",
    ),
    metrics: str | None = typer.Option(
        None, "--metrics", "-m",
        help="Comma list of er, per, cn, stable_rank, spectral_norm, frobenius_norm, "
        "nuclear_norm, numerical_rank, hoyer, gini; or 'all'. Default: all (or, for an "
        "existing store, the store's).",
    ),
    kinds: str | None = typer.Option(
        None, "--kinds", "-k",
        help="Comma list of weights, grads, updates, lora; or 'all'. Default: all available "
        "(or, for an existing store, the store's).",
    ),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu or cuda[:N]."),
    precision: str = typer.Option("float64", help="float64 (default) or float32 spectra."),
    scheduler: str | None = typer.Option(
        None, help="Dask: 'local:N' (N worker processes here) or 'tcp://HOST:PORT'."
    ),
    threads: int | None = typer.Option(
        None, min=1, help="CPU threads for torch (default: torch's, one per core)."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    wait: bool = typer.Option(
        False, "--wait", help="If another dynlab analyze is writing the store, wait for it to "
        "finish instead of exiting with an error."
    ),
) -> None:
    """Spectral metrics (effective rank, PER, condition number, ...) of every weight matrix,
    gradient, update and LoRA product of each checkpoint, into a Zarr store. Rerunning skips
    what the store already holds, so an interrupted analysis resumes."""
    from dynlab_cli.console import guarded

    with guarded("analyze"):
        from dynlab.analysis import analyze as run_analysis

        if threads:
            import torch

            torch.set_num_threads(threads)
        path = run_analysis(
            runs, out, metrics=metrics, kinds=kinds, device=device, precision=precision,
            scheduler=scheduler, progress=progress, wait=wait,
        )
    print(path)
