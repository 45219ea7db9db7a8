"""`dynlab train decoder|relora`: train pico-decoder or pico-relora with learning-dynamics
checkpoints. Thin: parse options, call dynlab.training.trainer.train, print the run directory.

The options both commands share are written once, as the fields of `TrainOptions`; `relora`
adds the fields of `ReLoRAOptions`. `command(kind, *blocks)` turns such dataclasses into a
typer command whose parameters are their fields (name, type and typer.Option from each
field's Annotated type), so a flag is declared in one place.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from dynlab_cli.options import DEVICE_HELP, Gpu, LiveLog, Preset, PruneMethod, choices

app = typer.Typer(
    help="Train pico-decoder or pico-relora with learning-dynamics checkpoints. With no "
    "options: the CPU-sized `micro` preset on the embedded grammar corpus, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def opt(*flags: str, **kw: Any) -> Any:
    """typer.Option without a shown default: every value here defaults to "not given", and
    the preset, a --config file or, on --resume, the stored run supplies it."""
    return typer.Option(*flags, show_default=False, **kw)


# Every option defaults to None ("not given"): the preset, a --config file or, on --resume,
# the stored run supply the value. A switch left off (False) is "not given" as well.
@dataclass
class TrainOptions:
    """The options of `dynlab train decoder` and `dynlab train relora`."""

    preset: Annotated[Preset | None, opt(
        "--preset", help="Model and training preset (default micro, CPU-sized).")] = None
    steps: Annotated[int | None, opt(
        "--steps", min=0, help="Optimizer updates (preset default).")] = None
    batch_size: Annotated[int | None, opt(
        "--batch-size", min=1, help="Sequences per micro-batch, all processes together: with "
        "--nproc N (or torchrun) each takes 1/N of it.")] = None
    seq_len: Annotated[int | None, opt(
        "--seq-len", min=1, help="Tokens per training sequence.")] = None
    lr: Annotated[float | None, opt(
        "--lr", help="Peak learning rate (default 3e-4; micro 3e-3).")] = None
    warmup_steps: Annotated[int | None, opt(
        "--warmup-steps", min=0, help="Linear warmup steps.")] = None
    data: Annotated[str | None, opt(
        "--data", help="'default' (embedded grammar corpus), a .txt/.jsonl/.npy/.bin file or "
        "directory, pre-tokenised rows (.parquet/.arrow file or directory with an input_ids "
        "column), or a Hugging Face dataset (needs `datasets`).")] = None
    tokenizer: Annotated[str | None, opt(
        "--tokenizer", help="A tokenizer.json, a directory holding one, or a Hugging Face "
        "model name (default: byte-level BPE trained on the data, cached).")] = None
    vocab_size: Annotated[int | None, opt(
        "--vocab-size", min=1, help="BPE target vocabulary size.")] = None
    out: Annotated[str | None, opt(
        "--out", "-o", help="Run directory (default runs/<kind>-<preset>).")] = None
    checkpoint_every: Annotated[int | None, opt(
        "--checkpoint-every", min=1, help="Steps between checkpoints.")] = None
    ld_batch_size: Annotated[int | None, opt(
        "--ld-batch-size", min=1, help="Sequences in the fixed learning-dynamics batch.")] = None
    device: Annotated[str | None, opt(
        "--device", help=f"{DEVICE_HELP} Default auto (or the --config file's, or the resumed "
        "run's).")] = None
    threads: Annotated[int | None, opt(
        "--threads", min=1, help="CPU threads (default: 1 for micro, else torch's "
        "default).")] = None
    seed: Annotated[int | None, opt(
        "--seed", help="Seed of initialisation, data order and dropout.")] = None
    config: Annotated[Path | None, opt(
        "--config", help="YAML file holding any of these options (explicit options "
        "win).")] = None
    resume: Annotated[bool, opt(
        "--resume", help="Continue from the latest complete checkpoint.")] = False
    overwrite: Annotated[bool, opt(
        "--overwrite", help="Replace an existing run in --out.")] = False
    save_activations: Annotated[bool, opt(
        "--save-activations", help="Also save each linear module's and each block's outputs "
        "(at --activation-positions) on the learning-dynamics batch.")] = False
    activation_positions: Annotated[str | None, opt(
        "--activation-positions", help="Token positions kept by --save-activations: last "
        "(default), all, or sample:N (N seeded positions per sequence).")] = None
    eval_every: Annotated[int | None, opt(
        "--eval-every", min=0, help="Steps between evaluations (default: checkpoint interval; "
        "0: off).")] = None
    eval_ppl: Annotated[str | None, opt(
        "--eval-ppl", help="Held-out text for perplexity (as dynlab eval --ppl).")] = None
    eval_blimp: Annotated[str | None, opt(
        "--eval-blimp", help="BLiMP jsonl for accuracy (as dynlab eval --blimp).")] = None
    grad_accum: Annotated[int | None, opt(
        "--grad-accum", min=1, help="Micro-batches per update.")] = None
    compile: Annotated[bool, opt("--compile", help="torch.compile the model.")] = False
    log_every: Annotated[int | None, opt(
        "--log-every", min=1, help="Steps between metrics.jsonl lines.")] = None
    stop_at: Annotated[int | None, opt(
        "--stop-at", min=1, help="Stop after this step without a final checkpoint (as an "
        "interruption; continue with --resume).")] = None
    progress: Annotated[bool, opt(
        "--progress/--no-progress", help="Show a progress bar (default on).")] = True
    log: Annotated[LiveLog | None, opt(
        "--log", help="Also log loss, lr, tokens/s and evaluation live to TensorBoard "
        "(RUN/tensorboard/) or an offline W&B run (RUN/wandb/); needs the extra of the same "
        "name.")] = None
    n_documents: Annotated[int | None, opt(
        "--n-documents", min=1, help="Documents generated (default corpus) or streamed (HF "
        "dataset).")] = None
    d_model: Annotated[int | None, opt(
        "--d-model", min=1, help="Override the preset's d_model.")] = None
    n_layers: Annotated[int | None, opt(
        "--n-layers", min=1, help="Override the preset's layers.")] = None
    n_heads: Annotated[int | None, opt(
        "--n-heads", min=1, help="Override the preset's heads.")] = None
    n_kv_heads: Annotated[int | None, opt(
        "--n-kv-heads", min=1, help="Override the preset's kv heads.")] = None
    hidden_dim: Annotated[int | None, opt(
        "--hidden-dim", min=1, help="Override activation_hidden_dim.")] = None
    max_seq_len: Annotated[int | None, opt(
        "--max-seq-len", min=1, help="Override the preset's max_seq_len.")] = None
    nproc: Annotated[int | None, opt(
        "--nproc", min=1, help="Train with N processes on this machine "
        "(DistributedDataParallel; gloo on CPU, one GPU each with nccl), launched via "
        "torchrun. Same training as one process: --batch-size is global.")] = None
    global_batch_size: Annotated[int | None, opt(
        "--global-batch-size", min=1, help="Sequences per optimizer update, all processes and "
        "micro-batches together (the study: 1024); gradient accumulation is derived from it, "
        "--micro-batch-size and the number of processes. Excludes --batch-size/"
        "--grad-accum.")] = None
    micro_batch_size: Annotated[int | None, opt(
        "--micro-batch-size", min=1, help="With --global-batch-size: sequences per process per "
        "forward/backward (default: the largest that fits, by a memory probe on CUDA; the "
        "whole per-process share on CPU).")] = None
    model_vocab_size: Annotated[int | None, opt(
        "--model-vocab-size", min=1, help="Embedding rows when larger than the tokenizer "
        "(pico-train: 50304 for the OLMo tokenizer).")] = None
    schedule_horizon: Annotated[int | None, opt(
        "--schedule-horizon", min=1, help="Steps over which the learning rate decays "
        "(default --steps; pico-train's decoder: its max_steps 200000).")] = None
    dry_run: Annotated[bool, opt(
        "--dry-run", help="Print parameters, tokens, FLOPs, memory per device, wall-clock and "
        "GPU-hours, and exit without training (with --nproc N: on N devices).")] = False
    gpu: Annotated[str | None, opt(
        "--gpu", metavar=choices(Gpu), help="GPU of the --dry-run estimate (default h100; "
        "checked by dynlab.training.costs).")] = None
    mfu: Annotated[float | None, opt(
        "--mfu", help="Model FLOPs utilisation assumed by --dry-run (default 0.3).")] = None


@dataclass
class ReLoRAOptions:
    """The options `dynlab train relora` adds to TrainOptions."""

    lora_rank: Annotated[int | None, opt(
        "--lora-rank", min=1, help="LoRA rank r (default 16).")] = None
    lora_alpha: Annotated[float | None, opt(
        "--lora-alpha", help="LoRA alpha; the branch is scaled by alpha / r (default 32).",
    )] = None
    lora_dropout: Annotated[float | None, opt(
        "--lora-dropout", help="Dropout on the LoRA branch (default 0.1).")] = None
    reset_every: Annotated[int | None, opt(
        "--reset-every", min=1, help="Steps between merge-and-reset (preset default).")] = None
    restart_warmup_steps: Annotated[int | None, opt(
        "--restart-warmup-steps", min=0, help="Linear re-warmup after each reset.")] = None
    min_lr_ratio: Annotated[float | None, opt(
        "--min-lr-ratio", help="Floor of the cosine (default 0.1).")] = None
    prune_ratio: Annotated[float | None, opt(
        "--prune-ratio", help="Fraction of the LoRA Adam moments zeroed at a reset (default "
        "0.999).")] = None
    prune_method: Annotated[PruneMethod | None, opt(
        "--prune-method", help="How the moments are pruned (default random).")] = None
    paper_compat: Annotated[bool | None, opt(
        "--paper-compat/--no-paper-compat", help="Reproduce relora-pico exactly, defects "
        "included (unscaled merge, A = 0 at wrap, resets at step % reset_every == 1, 200k "
        "cosine); --no-paper-compat overrides a config file's `paper-compat: true`.")] = None
    warm_start: Annotated[str | None, opt(
        "--warm-start", help="Start from a decoder checkpoint (or run's latest).")] = None


def command(kind: str, doc: str, *blocks: type) -> Callable[..., None]:
    """A typer command whose parameters are the fields of the dataclasses `blocks` (each
    field's Annotated type carries its typer.Option); it trains `kind` with them."""
    params, hints = [], {}
    for block in blocks:
        types = typing.get_type_hints(block, include_extras=True)
        for f in dataclasses.fields(block):
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=f.default, annotation=types[f.name]))
            hints[f.name] = types[f.name]

    def run(**options: Any) -> None:
        _run(kind, options)

    run.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    run.__annotations__ = hints
    run.__doc__ = doc
    run.__name__ = kind
    return run


#: flag names whose config key differs (TrainConfig field: activation_hidden_dim)
CONFIG_KEYS = {"hidden_dim": "activation_hidden_dim"}


def config_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options as TrainConfig keys and values: enums as their strings, a switch left
    off (False) and --progress left on as "not given" (None)."""
    out = {}
    for name, value in options.items():
        if isinstance(value, Preset | PruneMethod | LiveLog):
            value = value.value
        if name in ("resume", "overwrite", "save_activations", "compile") and value is False:
            value = None
        if name == "progress" and value is True:
            value = None
        out[CONFIG_KEYS.get(name, name)] = value
    return out


def argv(kind: str, config: Path | None, options: dict[str, Any]) -> list[str]:
    """The command line that reproduces these options (for the torchrun workers)."""
    flags = {v: k for k, v in CONFIG_KEYS.items()}
    args = [kind] + ([f"--config={config}"] if config is not None else [])
    for name, value in options.items():
        flag = "--" + flags.get(name, name).replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + flags.get(name, name).replace("_", "-"))
        elif value is not None:
            args.append(f"{flag}={value}")
    return args


def _run(kind: str, options: dict[str, Any]) -> None:
    """Train under the exit-code policy of dynlab_cli.console.guarded: 2 bad input, 1
    failure (a diverged run), 130 on Ctrl-C, which leaves a run that the same command (or
    --resume) continues."""
    from dynlab.errors import InputError
    from dynlab_cli.console import guarded

    opts = config_options(options)
    config = opts.pop("config")
    nproc, dry_run = opts.pop("nproc"), opts.pop("dry_run")
    gpu, mfu = opts.pop("gpu"), opts.pop("mfu")
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun in each worker
    rank = int(os.environ.get("RANK", 0))
    where = f"train (rank {rank})" if world > 1 else "train"
    with guarded(where):
        if dry_run:
            preview(kind, config, opts, nproc or world, gpu, mfu)
            return
        if nproc is not None and world > 1 and nproc != world:
            raise InputError(f"--nproc {nproc} inside torchrun's {world} processes")
        if opts.get("device") is not None:
            from dynlab_cli.options import resolve

            resolve(opts["device"])  # a clear message for a device this machine lacks
        if nproc is not None and nproc > 1 and world == 1:
            launch(kind, config, opts, nproc)
            return
        from dynlab.training.trainer import train

        run_dir = train(kind, config=config, **opts)
    if rank == 0:
        print(run_dir)


def launch(kind: str, config: Path | None, options: dict[str, Any], nproc: int) -> None:
    """Check the options here, then run `torchrun --nproc-per-node N -m dynlab train ...`."""
    from dynlab.training.ddp import launch as torchrun
    from dynlab.training.trainer import check_launch

    cfg = check_launch(kind, nproc, config=config, **options)
    code = torchrun(nproc, ["-m", "dynlab", "train", *argv(kind, config, options)],
                    threads=cfg.threads)
    if code:
        raise typer.Exit(code)


def preview(kind: str, config: Path | None, options: dict[str, Any], devices: int,
            gpu: str | None, mfu: float | None) -> None:
    """--dry-run: the cost of these options (dynlab.training.costs), nothing trained."""
    from dynlab.training import costs
    from dynlab.training.config import make_config

    cfg = make_config(kind, options, config).resolved()
    est = costs.estimate(cfg, devices, gpu or costs.DEFAULT_GPU,
                         costs.DEFAULT_MFU if mfu is None else mfu)
    for line in costs.format_estimate(est):
        print(line)


app.command("decoder")(command(
    "decoder", "Train a pico-decoder (AdamW, linear warmup then linear decay to 0).",
    TrainOptions))
app.command("relora")(command(
    "relora", "Train a pico-relora (LoRA on q, k, v, o, w_0, w_1, w_2; merge-and-reset; jagged "
    "cosine).", TrainOptions, ReLoRAOptions))
