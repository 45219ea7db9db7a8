"""`dynlab analyze`: spectral metrics of checkpoints into a Zarr store."""

from __future__ import annotations

from pathlib import Path

import typer


def analyze(
    runs: list[str] = typer.Argument(
        ..., help="dynlab runs (RUN, RUN/checkpoints, folders of runs), pico-train / "
        "relora-pico runs, Hugging Face model directories or directories of stepN / "
        "checkpoint-N model directories, or hf://ORG/NAME.", show_default=False
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o",
        help="Zarr store to write (default: analysis.zarr beside the first run).",
    ),
    metrics: str | None = typer.Option(
        None, "--metrics", "-m",
        help="Comma list of er, per, cn, cn_nz, stable_rank, spectral_norm, frobenius_norm, "
        "nuclear_norm, numerical_rank, rank_deficit, hoyer, gini, alpha, alpha_ks, "
        "alpha_n_tail, inf_norm; or 'all'. Default: all (or, for an existing store, the "
        "store's).",
    ),
    kinds: str | None = typer.Option(
        None, "--kinds", "-k",
        help="Comma list of weights, grads, updates, lora, train_grads; or 'all'. Default: "
        "all available (or, for an existing store, the store's).",
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
    activations: bool | None = typer.Option(
        None, "--activations/--no-activations",
        help="Analyse the checkpoints' saved activations (default: when they have them).",
    ),
    activations_data: str | None = typer.Option(
        None, "--activations-data",
        help="Compute every checkpoint's activations now on a fixed batch of this data "
        "(.txt/.jsonl, or 'default': the embedded corpus), for runs saved without them.",
    ),
    activation_positions: str = typer.Option(
        "sample:16", "--activation-positions",
        help="With --activations-data: last, all or sample:N positions per sequence."),
    activations_batch: int = typer.Option(
        16, "--activations-batch", min=1, help="With --activations-data: sequences."),
    convention: str = typer.Option(
        "dynlab", "--convention",
        help="dynlab (default) or pico: pico-analyze's OV matrices (V_g·O_h, concatenated "
        "heads; dense gradient products) and condition number (no tolerance).",
    ),
    target: str | None = typer.Option(
        None, "--target",
        help="What activations are compared with (CKA, SVCCA, PWCCA): final (default), "
        "first, previous, STEP or RUN@STEP; a comma list for several.",
    ),
    # ---- sources (dynlab.sources)
    fmt: str | None = typer.Option(
        None, "--format", help="Force the source format: dynlab, pico-train, relora-pico, hf "
        "(default: detected per path)."),
    revisions: str | None = typer.Option(
        None, help="hf:// only: revisions, a comma list and/or ranges stepA:stepB:K "
        "(default: every step<N> branch)."),
    keep_downloads: bool = typer.Option(
        False, "--keep-downloads", help="hf:// only: keep each downloaded revision in the "
        "Hugging Face cache (default: delete it once analysed; at most two on disk)."),
    hub_cache: Path | None = typer.Option(
        None, "--hub-cache", help="hf:// only: the huggingface_hub cache directory (default "
        "HF_HUB_CACHE)."),
    follow: bool = typer.Option(
        False, "--follow", help="Analyse checkpoints as they complete, until the run's last "
        "step (or --until) is analysed, or Ctrl-C."),
    until: int | None = typer.Option(None, min=0, help="--follow: stop once this step is "
                                     "analysed."),
    poll: float = typer.Option(2.0, min=0.05, help="--follow: seconds between looks."),
    grads_data: Path | None = typer.Option(
        None, "--grads-data", help="Recompute, per checkpoint, the gradient of the mean loss "
        "on a fixed batch from this text (.txt/.jsonl) or token (.npy) file (kind grads)."),
    grads_batch_size: int = typer.Option(8, min=1, help="--grads-data: sequences in the batch."),
    grads_seq_len: int = typer.Option(64, min=2, help="--grads-data: tokens per sequence."),
    grads_tokenizer: Path | None = typer.Option(
        None, help="--grads-data: tokenizer.json for text (default: the run's or model's own)."),
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
        source_options = dict(fmt=fmt, revisions=revisions, keep_downloads=keep_downloads,
                              cache_dir=hub_cache)
        if grads_data is not None:
            source_options["grads_data"] = dict(path=grads_data, batch_size=grads_batch_size,
                                                seq_len=grads_seq_len, tokenizer=grads_tokenizer)
        if follow:
            from dynlab.sources.follow import follow as follow_runs

            source_options.pop("fmt")
            path = follow_runs(
                runs, out, until=until, poll=poll, fmt=fmt, metrics=metrics, kinds=kinds,
                device=device, precision=precision, scheduler=scheduler, progress=progress,
                wait=wait, **source_options,
            )
        else:
            path = run_analysis(
                runs, out, metrics=metrics, kinds=kinds, device=device, precision=precision,
                scheduler=scheduler, progress=progress, activations=activations,
                target=target, convention=convention, activations_data=activations_data,
                activation_positions=activation_positions, activations_batch=activations_batch,
                wait=wait, **source_options,
            )
    print(path)
