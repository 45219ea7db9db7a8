"""`dynlab train decoder|relora`: train pico-decoder or pico-relora with learning-dynamics
checkpoints. Thin: parse options, call dynlab.training.trainer.train, print the run directory."""

from __future__ import annotations

import os
from pathlib import Path

import typer

app = typer.Typer(
    help="Train pico-decoder or pico-relora with learning-dynamics checkpoints. With no "
    "options: the CPU-sized `micro` preset on the embedded grammar corpus, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Every option defaults to None ("not given"): the preset, a --config file or, on --resume,
# the stored run supply the value.
PRESET = typer.Option(None, "--preset", help="micro (default, CPU), tiny, small, medium, large.")
STEPS = typer.Option(None, "--steps", min=0, help="Optimizer updates (preset default).")
BATCH = typer.Option(None, "--batch-size", min=1, help="Sequences per micro-batch, all "
                     "processes together: with --nproc N (or torchrun) each takes 1/N of it.")
SEQ = typer.Option(None, "--seq-len", min=1, help="Tokens per training sequence.")
LR = typer.Option(None, "--lr", help="Peak learning rate (default 3e-4; micro 3e-3).")
WARMUP = typer.Option(None, "--warmup-steps", min=0, help="Linear warmup steps.")
DATA = typer.Option(None, "--data", help="'default' (embedded grammar corpus), a .txt/.jsonl/"
                    ".npy/.bin file or directory, pre-tokenised rows (.parquet/.arrow file or "
                    "directory with an input_ids column), or a Hugging Face dataset (needs "
                    "`datasets`).")
TOKENIZER = typer.Option(None, "--tokenizer", help="A tokenizer.json, a directory holding one, "
                         "or a Hugging Face model name (default: byte-level BPE trained on the "
                         "data, cached).")
VOCAB = typer.Option(None, "--vocab-size", min=1, help="BPE target vocabulary size.")
OUT = typer.Option(None, "--out", "-o", help="Run directory (default runs/<kind>-<preset>).")
CKPT = typer.Option(None, "--checkpoint-every", min=1, help="Steps between checkpoints.")
LD = typer.Option(None, "--ld-batch-size", min=1,
                  help="Sequences in the fixed learning-dynamics batch.")
DEVICE = typer.Option(None, "--device", help="auto (CUDA when available), cpu, cuda[:N].")
THREADS = typer.Option(None, "--threads", min=1, help="CPU threads (default: 1 for micro, "
                       "else torch's default).")
SEED = typer.Option(None, "--seed", help="Seed of initialisation, data order and dropout.")
CONFIG = typer.Option(None, "--config", help="YAML file holding any of these options.")
RESUME = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing run in --out.")
ACTS = typer.Option(False, "--save-activations",
                    help="Also save each linear module's and each block's outputs "
                    "(at --activation-positions) on the learning-dynamics batch.")
POSITIONS = typer.Option(None, "--activation-positions",
                         help="Token positions kept by --save-activations: last (default), "
                         "all, or sample:N (N seeded positions per sequence).")
EVAL_EVERY = typer.Option(None, "--eval-every", min=0,
                          help="Steps between evaluations (default: checkpoint interval; 0: off).")
EVAL_PPL = typer.Option(None, "--eval-ppl", help="Held-out text for perplexity (dynlab eval).")
EVAL_BLIMP = typer.Option(None, "--eval-blimp", help="BLiMP jsonl for accuracy (dynlab eval).")
ACCUM = typer.Option(None, "--grad-accum", min=1, help="Micro-batches per update.")
COMPILE = typer.Option(False, "--compile", help="torch.compile the model.")
LOG_EVERY = typer.Option(None, "--log-every", min=1, help="Steps between metrics.jsonl lines.")
STOP_AT = typer.Option(None, "--stop-at", min=1, help="Stop after this step without a final "
                       "checkpoint (as an interruption; continue with --resume).")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")
NDOCS = typer.Option(None, "--n-documents", min=1,
                     help="Documents generated (default corpus) or streamed (HF dataset).")
D_MODEL = typer.Option(None, "--d-model", min=1, help="Override the preset's d_model.")
N_LAYERS = typer.Option(None, "--n-layers", min=1, help="Override the preset's layers.")
N_HEADS = typer.Option(None, "--n-heads", min=1, help="Override the preset's heads.")
N_KV = typer.Option(None, "--n-kv-heads", min=1, help="Override the preset's kv heads.")
HIDDEN = typer.Option(None, "--hidden-dim", min=1, help="Override activation_hidden_dim.")
MAX_SEQ = typer.Option(None, "--max-seq-len", min=1, help="Override the preset's max_seq_len.")
GLOBAL_BATCH = typer.Option(
    None, "--global-batch-size", min=1, help="Sequences per optimizer update, all processes "
    "and micro-batches together (the study: 1024); gradient accumulation is derived from it, "
    "--micro-batch-size and the number of processes. Excludes --batch-size/--grad-accum.")
MICRO_BATCH = typer.Option(
    None, "--micro-batch-size", min=1, help="With --global-batch-size: sequences per process "
    "per forward/backward (default: the largest that fits, by a memory probe on CUDA; the whole "
    "per-process share on CPU).")
MODEL_VOCAB = typer.Option(None, "--model-vocab-size", min=1, help="Embedding rows when larger "
                           "than the tokenizer (pico-train: 50304 for the OLMo tokenizer).")
HORIZON = typer.Option(None, "--schedule-horizon", min=1, help="Steps over which the learning "
                       "rate decays (default --steps; pico-train's decoder: its max_steps "
                       "200000).")
DRY_RUN = typer.Option(False, "--dry-run", help="Print parameters, tokens, FLOPs, memory per "
                       "device, wall-clock and GPU-hours, and exit without training (with "
                       "--nproc N: on N devices).")
GPU = typer.Option(None, "--gpu", help="GPU of the --dry-run estimate: h100 (default), "
                   "h100-pcie, h200, a100, a100-40gb, l40s, a10.")
MFU = typer.Option(None, "--mfu", help="Model FLOPs utilisation assumed by --dry-run "
                   "(default 0.3).")
NPROC = typer.Option(None, "--nproc", min=1, help="Train with N processes on this machine "
                     "(DistributedDataParallel; gloo on CPU, one GPU each with nccl), launched "
                     "via torchrun. Same training as one process: --batch-size is global.")


def _argv(kind: str, config: Path | None, options: dict) -> list[str]:
    """The command line that reproduces these options (for the torchrun workers)."""
    args = [kind] + ([f"--config={config}"] if config is not None else [])
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + name.replace("_", "-"))
        elif value is not None:
            args.append(f"{flag}={value}")
    return args


def _launch(kind: str, config: Path | None, options: dict, nproc: int, console) -> None:
    """Check the options here, then run `torchrun --nproc-per-node N -m dynlab train ...`."""
    from dynlab.training.ddp import launch
    from dynlab.training.trainer import check_launch

    argv = _argv(kind, config, options)
    opts = dict(options, activation_hidden_dim=options.get("hidden_dim"))
    opts.pop("hidden_dim", None)
    cfg = check_launch(kind, nproc, config=config, **opts)
    code = launch(nproc, ["-m", "dynlab", "train", *argv], threads=cfg.threads)
    if code:
        raise typer.Exit(code)


def _preview(kind: str, config: Path | None, options: dict, devices: int, gpu: str | None,
             mfu: float | None, console) -> None:
    """--dry-run: the cost of these options (dynlab.training.costs), nothing trained."""
    from dynlab.training import costs
    from dynlab.training.config import make_config

    opts = dict(options, activation_hidden_dim=options.get("hidden_dim"))
    opts.pop("hidden_dim", None)
    try:
        cfg = make_config(kind, opts, config).resolved()
        est = costs.estimate(cfg, devices, gpu or costs.DEFAULT_GPU,
                             costs.DEFAULT_MFU if mfu is None else mfu)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from None
    for line in costs.format_estimate(est):
        print(line)


def _run(kind: str, config: Path | None, options: dict) -> None:
    """Train under the exit-code policy of dynlab_cli.console.guarded: 2 bad input, 1
    failure (a diverged run), 130 on Ctrl-C, which leaves a run that the same command (or
    --resume) continues."""
    from rich.console import Console

    from dynlab_cli.console import guarded

    for flag in ("resume", "overwrite", "save_activations", "compile"):
        if options.get(flag) is False:
            options[flag] = None  # a switch left off is "not given"
    if options.get("progress") is True:
        options["progress"] = None
    nproc = options.pop("nproc", None)
    dry_run, gpu, mfu = options.pop("dry_run", False), options.pop("gpu", None), \
        options.pop("mfu", None)
    console = Console(stderr=True)
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun in each worker
    rank = int(os.environ.get("RANK", 0))
    if dry_run:
        _preview(kind, config, options, nproc or world, gpu, mfu, console)
        return
    if nproc is not None and world > 1 and nproc != world:
        console.print(f"[red]error:[/] --nproc {nproc} inside torchrun's {world} processes")
        raise typer.Exit(2)
    if nproc is not None and nproc > 1 and world == 1:
        with guarded("train"):
            _launch(kind, config, options, nproc, console)
        return
    options["activation_hidden_dim"] = options.pop("hidden_dim", None)
    where = f"train (rank {rank})" if world > 1 else "train"
    with guarded(where):
        from dynlab.training.trainer import train

        run_dir = train(kind, config=config, **options)
    if rank == 0:
        print(run_dir)


@app.command()
def decoder(
    preset: str | None = PRESET, steps: int | None = STEPS, batch_size: int | None = BATCH,
    seq_len: int | None = SEQ, lr: float | None = LR, warmup_steps: int | None = WARMUP,
    data: str | None = DATA, tokenizer: str | None = TOKENIZER, vocab_size: int | None = VOCAB,
    out: str | None = OUT, checkpoint_every: int | None = CKPT, ld_batch_size: int | None = LD,
    device: str | None = DEVICE, threads: int | None = THREADS, seed: int | None = SEED,
    config: Path | None = CONFIG,
    resume: bool = RESUME, overwrite: bool = OVERWRITE, save_activations: bool = ACTS,
    activation_positions: str | None = POSITIONS,
    eval_every: int | None = EVAL_EVERY, eval_ppl: str | None = EVAL_PPL,
    eval_blimp: str | None = EVAL_BLIMP, grad_accum: int | None = ACCUM,
    compile: bool = COMPILE, log_every: int | None = LOG_EVERY, stop_at: int | None = STOP_AT,
    progress: bool = PROGRESS, n_documents: int | None = NDOCS, d_model: int | None = D_MODEL,
    n_layers: int | None = N_LAYERS, n_heads: int | None = N_HEADS,
    n_kv_heads: int | None = N_KV, hidden_dim: int | None = HIDDEN,
    max_seq_len: int | None = MAX_SEQ, nproc: int | None = NPROC,
    global_batch_size: int | None = GLOBAL_BATCH, micro_batch_size: int | None = MICRO_BATCH,
    model_vocab_size: int | None = MODEL_VOCAB, schedule_horizon: int | None = HORIZON,
    dry_run: bool = DRY_RUN, gpu: str | None = GPU, mfu: float | None = MFU,
) -> None:
    """Train a pico-decoder (AdamW, linear warmup then linear decay to 0)."""
    options = dict(locals())
    options.pop("config")
    _run("decoder", config, options)


@app.command()
def relora(
    preset: str | None = PRESET, steps: int | None = STEPS, batch_size: int | None = BATCH,
    seq_len: int | None = SEQ, lr: float | None = LR, warmup_steps: int | None = WARMUP,
    data: str | None = DATA, tokenizer: str | None = TOKENIZER, vocab_size: int | None = VOCAB,
    out: str | None = OUT, checkpoint_every: int | None = CKPT, ld_batch_size: int | None = LD,
    device: str | None = DEVICE, threads: int | None = THREADS, seed: int | None = SEED,
    config: Path | None = CONFIG,
    resume: bool = RESUME, overwrite: bool = OVERWRITE, save_activations: bool = ACTS,
    activation_positions: str | None = POSITIONS,
    eval_every: int | None = EVAL_EVERY, eval_ppl: str | None = EVAL_PPL,
    eval_blimp: str | None = EVAL_BLIMP, grad_accum: int | None = ACCUM,
    compile: bool = COMPILE, log_every: int | None = LOG_EVERY, stop_at: int | None = STOP_AT,
    progress: bool = PROGRESS, n_documents: int | None = NDOCS, d_model: int | None = D_MODEL,
    n_layers: int | None = N_LAYERS, n_heads: int | None = N_HEADS,
    n_kv_heads: int | None = N_KV, hidden_dim: int | None = HIDDEN,
    max_seq_len: int | None = MAX_SEQ, nproc: int | None = NPROC,
    global_batch_size: int | None = GLOBAL_BATCH, micro_batch_size: int | None = MICRO_BATCH,
    model_vocab_size: int | None = MODEL_VOCAB, schedule_horizon: int | None = HORIZON,
    dry_run: bool = DRY_RUN, gpu: str | None = GPU, mfu: float | None = MFU,
    lora_rank: int | None = typer.Option(None, "--lora-rank", min=1,
                                         help="LoRA rank r (default 16)."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha; "
                                            "s = alpha / r (default 32)."),
    lora_dropout: float | None = typer.Option(None, "--lora-dropout",
                                              help="Dropout on the LoRA branch (default 0.1)."),
    reset_every: int | None = typer.Option(None, "--reset-every", min=1,
                                           help="Steps between merge-and-reset (preset default)."),
    restart_warmup_steps: int | None = typer.Option(
        None, "--restart-warmup-steps", min=0, help="Linear re-warmup after each reset."),
    min_lr_ratio: float | None = typer.Option(None, "--min-lr-ratio",
                                              help="Floor of the cosine (default 0.1)."),
    prune_ratio: float | None = typer.Option(
        None, "--prune-ratio", help="Fraction of the LoRA Adam moments zeroed at a reset "
        "(default 0.999)."),
    prune_method: str | None = typer.Option(None, "--prune-method",
                                            help="random (default) or magnitude."),
    paper_compat: bool | None = typer.Option(
        None, "--paper-compat/--no-paper-compat", help="Reproduce relora-pico exactly, defects "
        "included (unscaled merge, A = 0 at wrap, resets at step % reset_every == 1, 200k "
        "cosine); --no-paper-compat overrides a config file's `paper-compat: true`."),
    warm_start: str | None = typer.Option(
        None, "--warm-start", help="Start from a decoder checkpoint (or run's latest)."),
) -> None:
    """Train a pico-relora (LoRA on q, k, v, o, w_0, w_1, w_2; merge-and-reset; jagged cosine)."""
    options = dict(locals())
    options.pop("config")
    _run("relora", config, options)
