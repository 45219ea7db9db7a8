"""`dynlab analyze`: spectral metrics of checkpoints into a Zarr store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynlab_cli.options import (
    KIND_NAMES,
    Convention,
    Device,
    Precision,
    Progress,
    follow_option,
    hub_cache_option,
    keep_downloads_option,
    kinds_option,
    layers_option,
    matrices_option,
    metrics_option,
    poll_option,
    resolve,
    revisions_option,
    source_format_option,
    steps_option,
    until_option,
    value,
)

METRIC_NAMES = ("er, per, cn, cn_nz, stable_rank, spectral_norm, frobenius_norm, nuclear_norm, "
                "numerical_rank, rank_deficit, hoyer, gini, alpha, alpha_ks, alpha_n_tail, "
                "inf_norm")


def analyze(
    runs: Annotated[list[str], typer.Argument(
        help="dynlab runs (RUN, RUN/checkpoints, folders of runs), pico-train / relora-pico "
        "runs, Hugging Face model directories or directories of stepN / checkpoint-N model "
        "directories, or hf://ORG/NAME.", show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Zarr store to write (default: analysis.zarr beside the first run).")] = None,
    metrics: Annotated[str | None, metrics_option(
        help=f"Comma list of {METRIC_NAMES}; or 'all'. Default: all but the opt-in MP fit "
        "(mp_sigma, mp_sigma2, mp_bulk_max, num_spikes, mp_softrank) and correlation traps "
        "(rand_distance, max_rand_eval, num_rand_spikes) (or, for an existing store, the "
        "store's); also opt-in: alpha with WeightWatcher's xmin_peak rule (alpha_peak, "
        "alpha_peak_ks, alpha_peak_n_tail) and the truncated power law (tpl_alpha, tpl_lambda, "
        "tpl_llr, tpl_p).")] = None,
    kinds: Annotated[str | None, kinds_option(
        help=f"Comma list of {KIND_NAMES}; or 'all'. Default: all available (or, for an "
        "existing store, the store's).")] = None,
    device: Device = "auto",
    precision: Annotated[Precision, typer.Option(
        "--precision", help="Floating-point type of the spectra.")] = Precision.float64,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="Dask: 'local:N' (N worker processes here) or 'tcp://HOST:PORT'.",
        show_default=False)] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, show_default=False,
        help="CPU threads for torch (default: torch's, one per core).")] = None,
    progress: Progress = True,
    activations: Annotated[bool | None, typer.Option(
        "--activations/--no-activations", show_default=False,
        help="Analyse the checkpoints' saved activations (default: when they have them).",
    )] = None,
    activations_data: Annotated[str | None, typer.Option(
        "--activations-data", show_default=False,
        help="Compute every checkpoint's activations now on a fixed batch of this data "
        "(.txt/.jsonl, or 'default': the embedded corpus), for checkpoints saved without them: "
        "dynlab runs (dynlab's model) and Hugging Face checkpoints (transformers' model, the "
        "checkpoint's own tokenizer); pico-train runs use their saved activations.",
    )] = None,
    activation_positions: Annotated[str, typer.Option(
        "--activation-positions",
        help="With --activations-data: last, all or sample:N positions per sequence.",
    )] = "sample:16",
    activations_batch: Annotated[int, typer.Option(
        "--activations-batch", min=1, help="With --activations-data: sequences.")] = 16,
    convention: Annotated[Convention, typer.Option(
        "--convention",
        help="dynlab or pico: pico-analyze's OV matrices (V_g·O_h, concatenated heads; dense "
        "gradient products), condition number (no tolerance), and its CKA and PWCCA.",
    )] = Convention.dynlab,
    target: Annotated[str | None, typer.Option(
        "--target", show_default=False,
        help="What activations are compared with (CKA, SVCCA, PWCCA): final (default; "
        "also latest), "
        "first, previous, STEP or RUN@STEP; a comma list for several.")] = None,
    # ---- sources (dynlab.sources)
    fmt: Annotated[str | None, source_format_option()] = None,
    revisions: Annotated[str | None, revisions_option()] = None,
    keep_downloads: Annotated[bool, keep_downloads_option("analysed")] = False,
    hub_cache: Annotated[Path | None, hub_cache_option()] = None,
    follow: Annotated[bool, follow_option("Analyse", "analysed")] = False,
    until: Annotated[int | None, until_option("analysed")] = None,
    poll: Annotated[float, poll_option()] = 2.0,
    grads_data: Annotated[Path | None, typer.Option(
        "--grads-data", show_default=False,
        help="Recompute, per checkpoint, the gradient of the mean loss on a fixed batch from "
        "this text (.txt/.jsonl) or token (.npy) file (kind grads).")] = None,
    grads_batch_size: Annotated[int, typer.Option(
        "--grads-batch-size", min=1, help="--grads-data: sequences in the batch.")] = 8,
    grads_seq_len: Annotated[int, typer.Option(
        "--grads-seq-len", min=2, help="--grads-data: tokens per sequence.")] = 64,
    grads_tokenizer: Annotated[Path | None, typer.Option(
        "--grads-tokenizer", show_default=False,
        help="--grads-data: tokenizer.json for text (default: the run's or model's own).",
    )] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="If another dynlab analyze is writing the store, wait for it to finish "
        "instead of exiting with an error.")] = False,
    # ---- function-space dynamics (dynlab.analysis.dynamics)
    dynamics: Annotated[str | None, typer.Option(
        "--dynamics", show_default=False,
        help="Function-space dynamics of every checkpoint: a comma list of sharpness (Hessian "
        "top-k, trace, Adam-preconditioned sharpness vs the edge-of-stability threshold), "
        "barrier (loss along the line from the previous checkpoint), gns (gradient noise "
        "scale), attention (entropy, sinks, massive activations); or all. dynlab runs.",
    )] = None,
    dynamics_data: Annotated[str | None, typer.Option(
        "--dynamics-data", show_default=False,
        help="--dynamics: the batch from this data (.txt/.jsonl or 'default') in the run's "
        "tokenizer (default: the run's learning-dynamics batch).")] = None,
    dynamics_batch: Annotated[int, typer.Option(
        "--dynamics-batch", min=2, help="--dynamics: sequences in the batch.")] = 8,
    dynamics_seq_len: Annotated[int, typer.Option(
        "--dynamics-seq-len", min=1, help="--dynamics: tokens per sequence.")] = 64,
    dynamics_k: Annotated[int, typer.Option(
        "--dynamics-k", min=1, help="--dynamics sharpness: Hessian eigenvalues (Lanczos).")] = 4,
    dynamics_probes: Annotated[int, typer.Option(
        "--dynamics-probes", min=1, help="--dynamics sharpness: Hutchinson probes.")] = 8,
    dynamics_alphas: Annotated[int, typer.Option(
        "--dynamics-alphas", min=2, help="--dynamics barrier: points of the α grid.")] = 11,
    dynamics_seed: Annotated[int, typer.Option(
        "--dynamics-seed", help="--dynamics: seed of the probe vectors.")] = 0,
    dynamics_layers: Annotated[bool, typer.Option(
        "--dynamics-layers", help="--dynamics sharpness: also the top eigenvalue of each "
        "block's Hessian block (n_layers times the cost).")] = False,
    between: Annotated[str | None, typer.Option(
        "--between", show_default=False,
        help="The loss along the straight line between two runs' checkpoints, "
        "RUN@STEP,RUN@STEP, and its barrier (on the first run's batch).")] = None,
    steps: Annotated[str | None, steps_option()] = None,
    layers: Annotated[str | None, layers_option()] = None,
    matrices: Annotated[str | None, matrices_option()] = None,
) -> None:
    """Spectral metrics (effective rank, PER, condition number, ...) of every weight matrix,
    gradient, update and LoRA product of each checkpoint, into a Zarr store. Rerunning skips
    what the store already holds, so an interrupted analysis resumes."""
    from dynlab_cli.console import guarded, settled_imports

    with guarded("analyze"):
        with settled_imports():
            from dynlab.analysis import analyze as run_analysis

        dev = resolve(device)
        if threads:
            import torch

            torch.set_num_threads(threads)
        source_options = dict(fmt=fmt, revisions=revisions,
                              keep_downloads=keep_downloads, cache_dir=hub_cache)
        if grads_data is not None:
            source_options["grads_data"] = dict(path=grads_data, batch_size=grads_batch_size,
                                                seq_len=grads_seq_len, tokenizer=grads_tokenizer)
        # the same analysis either way; --follow repeats it as checkpoints complete
        analysis = dict(
            metrics=metrics, kinds=kinds, device=dev, precision=value(precision),
            scheduler=scheduler, progress=progress, activations=activations, target=target,
            convention=value(convention), activations_data=activations_data,
            activation_positions=activation_positions, activations_batch=activations_batch,
            wait=wait, steps=steps, layers=layers, matrices=matrices,
            **dynamics_arguments(dynamics, dynamics_data, dynamics_batch, dynamics_seq_len,
                                 dynamics_k, dynamics_probes, dynamics_alphas, dynamics_seed,
                                 between, dynamics_layers),
        )
        if follow:
            from dynlab.analysis.follow import follow as follow_runs

            source_options.pop("fmt")
            path = follow_runs(runs, out, until=until, poll=poll, fmt=fmt, **analysis,
                               **source_options)
        else:
            path = run_analysis(runs, out, **analysis, **source_options)
    print(path)


def dynamics_arguments(dynamics: str | None, data: str | None, n_seq: int, seq_len: int,
                       k: int, probes: int, alphas: int, seed: int,
                       between: str | None = None, layers: bool = False) -> dict:
    """The `dynamics` / `dynamics_options` arguments of dynlab.analyze (none without
    --dynamics or --between)."""
    if dynamics is None and between is None:
        return {}
    options = dict(data=data, n_seq=n_seq, seq_len=seq_len, k=k, probes=probes,
                   alphas=alphas, seed=seed, layer_sharpness=layers)
    if between is not None:
        options["between"] = between
    return {"dynamics": dynamics, "dynamics_options": options}
