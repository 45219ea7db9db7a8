"""The bundled trainer: pico-decoder or pico-relora with learning-dynamics checkpoints.

    run_dir = train("relora", steps=600, out="runs/relora")

One optimizer update ("step") is `grad_accum` micro-batches of `batch_size` windows of
`seq_len + 1` tokens. At step 0, every `checkpoint_every` steps and at the last step the
trainer writes a checkpoint (weights, learning-dynamics gradients, optional activations,
resume state, meta.json last).

The loop (`_run_training`) composes small parts, each with its own module:

    options and --out      dynlab.training.config, dynlab.training.resume
    processes and devices  dynlab.training.ddp, dynlab.devices, dynlab.training.rng
    data and tokenizer     dynlab.training.data
    one update             dynlab.training.step
    checkpoints            dynlab.training.checkpointer (learning dynamics:
                           dynlab.training.dynamics), run files: dynlab.runs
    evaluation             dynlab.training.evalhook
    schedule and resets    dynlab.training.schedules, dynlab.runs.config

Under torchrun (WORLD_SIZE > 1) the same loop trains with DistributedDataParallel:
`batch_size` stays the global micro-batch, split across processes, and only rank 0 writes;
see `dynlab.training.ddp` for the rules (data sharding, loss averaging, ReLoRA resets kept in
step, resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from dynlab.data import pretokenized as P
from dynlab.devices import resolve_device
from dynlab.errors import DynlabFailure
from dynlab.faults import fault_point
from dynlab.locking import holder_text
from dynlab.model.pico_decoder import ModelConfig, PicoDecoder
from dynlab.model.relora import wrap_relora
from dynlab.runs.config import planned_reset_steps
from dynlab.runs.files import write_run_json
from dynlab.runs.layout import complete_checkpoints
from dynlab.runs.lock import run_lock
from dynlab.runs.metrics import MetricsLog, metrics_record
from dynlab.training import batching, ddp
from dynlab.training import data as D
from dynlab.training.checkpointer import Checkpointer, prepare_run_dir, run_record
from dynlab.training.config import (
    TrainConfig,
    load_yaml_options,
    make_config,
    model_config,
    option_name,
    relora_config,
)
from dynlab.training.dynamics import learning_dynamics
from dynlab.training.evalhook import EvalHook
from dynlab.training.livelog import LiveLog
from dynlab.training.resume import (
    TrainState,
    check_out_dir,
    continue_interrupted,
    resume_checkpoint,
    resume_config,
    tokenizer_source,
    warm_start_checkpoint,
)
from dynlab.training.schedules import learning_rate
from dynlab.training.step import batch_loss, train_step

__all__ = ["TrainingDiverged", "build_model", "check_launch", "learning_dynamics",
           "make_optimizer", "run_training", "train"]


class TrainingDiverged(DynlabFailure):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------- model and optimizer


def build_model(cfg: TrainConfig, mcfg: ModelConfig, warm_ckpt: Path | None) -> PicoDecoder:
    """PicoDecoder (seeded init or warm start), wrapped for relora runs."""
    torch.manual_seed(cfg.seed)
    model = PicoDecoder(mcfg)
    if warm_ckpt is not None:
        from dynlab.model import load_checkpoint_model, read_model_config

        src = read_model_config(warm_ckpt.parent.parent)
        if src != mcfg:
            raise ValueError(f"--warm-start {warm_ckpt}: model {dataclasses.asdict(src)} "
                             f"differs from this run's {dataclasses.asdict(mcfg)}")
        model.load_state_dict(load_checkpoint_model(warm_ckpt).state_dict())
    if cfg.kind == "relora":
        wrap_relora(model, relora_config(cfg))
    return model


def make_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device
                   ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (torch's betas and eps; fused kernels on CUDA)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=True if device.type == "cuda" else None)


# ---------------------------------------------------------------- setting up a run


@dataclass
class Session:
    """What one process trains with: resolved options, its place among the processes, the
    data, the model and the checkpoint it resumes from."""

    cfg: TrainConfig
    run_dir: Path
    resume_ckpt: Path | None
    device: torch.device
    rank: int
    world: int
    tokenizer: object
    data: D.TokenData
    mcfg: ModelConfig
    model: nn.Module


def resolve_options(cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, Path,
                                                                     Path | None]:
    """(options, run directory, checkpoint to resume from): the stored run's options on
    --resume, with the explicitly given mutable ones (dynlab.training.resume)."""
    cfg = continue_interrupted(cfg.resolved())
    run_dir = check_out_dir(cfg)
    if cfg.resume:
        cfg = resume_config(cfg, explicit, run_dir).resolved()
    return cfg, run_dir, resume_checkpoint(cfg, run_dir)


def prepare_data_and_model(cfg: TrainConfig, run_dir: Path, resume_ckpt: Path | None,
                           device: torch.device, rank: int, world: int):
    """(tokenizer, data, model config, model) of this process. Rank 0 goes first: it trains
    or loads the tokenizer and sets up --out (errors before that leave --out untouched); the
    other ranks then read its tokenizer.json, so all ranks see the same vocabulary."""
    warm_ckpt = (warm_start_checkpoint(cfg.warm_start)
                 if cfg.warm_start and resume_ckpt is None else None)
    tok_path = (tokenizer_source(cfg, run_dir, warm_ckpt) if rank == 0
                else run_dir / "tokenizer.json")
    ddp.barrier()  # every rank has inspected --out before rank 0 changes it
    if rank != 0:
        ddp.barrier()  # rank 0 has written tokenizer.json
    tokenizer, data = D.load_data(cfg, tok_path)
    mcfg = model_config(cfg, P.model_vocab(tokenizer, cfg.model_vocab_size))
    model = build_model(cfg, mcfg, warm_ckpt).to(device)
    if rank == 0:
        record = run_record(cfg, mcfg, model, data, world, ddp.backend(device))
        prepare_run_dir(run_dir, cfg, resume_ckpt, record, tokenizer, data.ld_batch)
        ddp.barrier()
    else:
        # rank 0 keeps the single-process RNG stream; the others draw their own dropout
        torch.manual_seed(ddp.rank_seed(cfg.seed, rank))
    return tokenizer, data, mcfg, model


def fit_micro_batch(s: Session, say) -> TrainConfig:
    """On CUDA with a global batch and no --micro-batch-size: the largest micro-batch that
    fits, agreed by all processes (AdamW state counted); run.json records it. Else s.cfg."""
    cfg = s.cfg
    if not (cfg.global_batch_size and cfg.micro_batch_size is None and s.device.type == "cuda"):
        return cfg
    trainable = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
    micro = batching.agree_min(batching.probe_micro_batch(
        s.model, cfg.seq_len, cfg.global_batch_size // s.world, s.device,
        extra_bytes=8 * trainable), s.device)
    cfg = batching.apply_batch(cfg, s.world, micro)
    say(f"micro-batch {micro} per process (memory probe), {cfg.grad_accum} accumulation "
        f"steps: {cfg.global_batch_size} sequences per update")
    if s.rank == 0 and s.resume_ckpt is None:
        write_run_json(s.run_dir, run_record(cfg, s.mcfg, s.model, s.data, s.world,
                                                      ddp.backend(s.device)))
    return cfg


def setup(cfg: TrainConfig, explicit: set[str], stack: contextlib.ExitStack) -> Session:
    """Options, process group (entered on `stack`), device, threads, data and model. The
    process that writes (rank 0) first takes the run directory's lock (dynlab.runs.lock), so
    a second trainer on the same --out is refused before it reads or writes anything."""
    if ddp.world()[0] == 0:
        taken = stack.enter_context(run_lock(cfg.resolved().out))
        if taken.took_over:
            warnings.warn(f"{taken.target}: took over the lock of a trainer that ended "
                          f"without releasing it ({holder_text(taken.took_over)})", stacklevel=2)
    cfg, run_dir, resume_ckpt = resolve_options(cfg, explicit)
    world = ddp.world()[1]
    cfg = batching.apply_batch(cfg, world)  # the global batch over W processes
    # checks every process makes identically before any of them joins the process group
    ddp.check_batch_size(cfg.batch_size, world)
    device = ddp.process_device(resolve_device(cfg.device), world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = stack.enter_context(ddp.process_group(device))
    tokenizer, data, mcfg, model = prepare_data_and_model(cfg, run_dir, resume_ckpt, device,
                                                          rank, world)
    return Session(cfg, run_dir, resume_ckpt, device, rank, world, tokenizer, data, mcfg, model)


def progress_bar(enabled: bool, console):
    """A rich progress bar (step, loss, lr, tokens per second); inert when not enabled."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                   "{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
        console=console,
    )


def summary(s: Session) -> str:
    """The line that opens a run on the console."""
    cfg, model = s.cfg, s.model
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    procs = f", {s.world} processes ({ddp.backend(s.device)})" if s.world > 1 else ""
    n_tokens = s.data.n_train_tokens
    return (f"[bold]{cfg.kind}[/] preset {cfg.preset}: {n_params:,} parameters "
            f"({n_trainable:,} trainable), vocab {s.mcfg.vocab_size}, "
            f"{'streamed' if n_tokens is None else f'{n_tokens:,}'} training tokens, "
            f"device {s.device}{procs}, out {escape(str(s.run_dir))}")


def record_step(step: int, last: bool, ckpt: Checkpointer, evaluator: EvalHook,
                metrics: MetricsLog | None, live: LiveLog | None = None) -> None:
    """The evaluation (rank 0), checkpoint and metrics.jsonl line due after update `step`."""
    cfg, state, clock = ckpt.cfg, ckpt.state, ckpt.clock
    result = evaluator(ckpt.model) if ckpt.rank == 0 and evaluator.due(step, last) else None
    ckpt.save(step, last, result)
    if metrics is None or not (step % cfg.log_every == 0 or result is not None
                               or ckpt.due(step, last)):
        return
    record = metrics_record(
        step, loss=state.train_loss, lr=learning_rate(cfg, step), tokens=state.tokens,
        wall_seconds=clock.wall(), tokens_per_second=clock.tokens_per_second(state.tokens),
        relora_cycle=state.relora_cycle if cfg.kind == "relora" else None,
        gpu_hours=clock.gpu_hours(step), eval_result=result)
    metrics.write(record)
    if live is not None:
        live.write(record)


# ---------------------------------------------------------------- the training loop


def run_training(cfg: TrainConfig, explicit: set[str] | None = None) -> Path:
    """Train according to cfg; returns the run directory. Under torchrun (WORLD_SIZE > 1)
    every process calls this and joins the process group (dynlab.training.ddp)."""
    threads_before = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        try:
            return _run_training(cfg, set(explicit or ()), stack)
        finally:
            torch.set_num_threads(threads_before)


def _run_training(cfg: TrainConfig, explicit: set[str], stack: contextlib.ExitStack) -> Path:
    # -- setup: options, processes, device, data, model, run directory
    s = setup(cfg, explicit, stack)
    console = Console(stderr=True, quiet=not (s.cfg.progress and s.rank == 0))
    s = dataclasses.replace(s, cfg=fit_micro_batch(s, console.print))
    cfg, model, device, rank, world = s.cfg, s.model, s.device, s.rank, s.world
    optimizer = make_optimizer(cfg, model, device)
    state = TrainState()
    ckpt = Checkpointer(s.run_dir, cfg, model, optimizer, state, s.data, device,
                        rank=rank, world=world)
    # -- resume: model, optimizer, counters and RNG from the latest complete checkpoint
    if s.resume_ckpt is not None:
        ckpt.load(s.resume_ckpt)
        console.print(f"resuming {escape(str(s.run_dir))} from step {state.step}")
    metrics = MetricsLog(s.run_dir / "metrics.jsonl",
                         truncate_after=state.step if s.resume_ckpt is not None else -1,
                         run_dir=s.run_dir) if rank == 0 else None
    if metrics is not None:
        stack.callback(metrics.close)
    live = LiveLog(cfg.log, s.run_dir, cfg.to_dict()) if cfg.log and rank == 0 else None
    if live is not None:
        stack.callback(live.close)
    console.print(summary(s))
    # -- the model that trains: DDP-wrapped, compiled; evaluation; ReLoRA resets
    ddp_model = ddp.wrap(model, device) if world > 1 else model
    no_sync = ddp_model.no_sync if world > 1 else None
    train_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    evaluator = EvalHook(cfg, s.tokenizer, device, console.print)
    rcfg = relora_config(cfg) if cfg.kind == "relora" else None
    resets = set(planned_reset_steps(cfg.steps, rcfg.reset_every, cfg.warmup_steps,
                                     rcfg.paper_compat) if rcfg is not None else ())
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len  # global
    batches = D.iter_batches(s.data, state.data_position, cfg.batch_size // world, cfg.seed,
                             rank, world)
    # -- step 0: the initial model's loss, checkpoint and evaluation
    if s.resume_ckpt is None:
        first = D.first_batch(s.data, cfg.batch_size, cfg.seed, rank, world)
        state.train_loss = ddp.mean_over_ranks(batch_loss(model, first, device), device)
        record_step(0, cfg.steps == 0, ckpt, evaluator, metrics, live)
    with progress_bar(cfg.progress and rank == 0, console) as bar:
        task = bar.add_task(cfg.kind, total=cfg.steps, completed=state.step,
                            loss=state.train_loss, lr=learning_rate(cfg, state.step + 1),
                            tps=0.0)
        while state.step < cfg.steps:
            # a reset due after update N runs here, after checkpoint N: checkpoints hold
            # each cycle's learned factors, and a resumed run replays the reset
            if state.step in resets:
                ddp.relora_reset(model, optimizer, rcfg)
                state.relora_cycle += 1
            # -- forward, backward, update over grad_accum micro-batches
            micro = []
            for _ in range(cfg.grad_accum):
                position, batch = next(batches)
                micro.append(batch)
            loss = train_step(train_model, optimizer, micro, learning_rate(cfg, state.step + 1),
                              device, no_sync=no_sync)
            if not math.isfinite(loss):
                last_good = complete_checkpoints(s.run_dir)
                raise TrainingDiverged(
                    f"training loss is {loss} at step {state.step + 1}; stopped without "
                    "updating. Last good checkpoint: "
                    f"{last_good[-1][1] if last_good else 'none'}. Try a lower --lr.")
            state.step += 1
            state.data_position = position
            state.tokens += tokens_per_step
            state.train_loss = loss
            fault_point("train.step")
            # -- evaluation, checkpoint, metrics line, progress
            last = state.step == cfg.steps
            if ckpt.due(state.step, last) or evaluator.due(state.step, last) or (
                    state.step % cfg.log_every == 0):
                record_step(state.step, last, ckpt, evaluator, metrics, live)
            bar.update(task, advance=1, loss=loss, lr=learning_rate(cfg, state.step),
                       tps=ckpt.clock.tokens_per_second(state.tokens))
            if cfg.stop_at is not None and state.step >= cfg.stop_at:
                break
    ddp.barrier()  # the run is complete on disk when any rank returns
    console.print(f"done: step {state.step}, loss {state.train_loss:.4f}, "
                  f"{ckpt.clock.wall():.1f} s -> {escape(str(s.run_dir))}")
    return s.run_dir


# ---------------------------------------------------------------- Python API


def check_launch(kind: str, nproc: int, *, config: str | Path | None = None, **options
                 ) -> TrainConfig:
    """The checks `dynlab train --nproc N` makes before starting N processes: the options
    resolve (on --resume, against the stored run), N divides --batch-size, and on CUDA there
    are N devices. Returns the resolved config."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: expected a positive number of processes")
    cfg = continue_interrupted(make_config(kind, options, config).resolved())
    if cfg.resume:
        explicit = {option_name(k) for k, v in options.items() if v is not None}
        if config is not None:
            explicit |= set(load_yaml_options(config))
        cfg = resume_config(cfg, explicit, check_out_dir(cfg)).resolved()
    else:
        check_out_dir(cfg)
    cfg = batching.apply_batch(cfg, nproc)
    ddp.check_batch_size(cfg.batch_size, nproc)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc}: only {torch.cuda.device_count()} CUDA devices "
                         "(one process per GPU)")
    return cfg


def train(kind: str = "decoder", *, config: str | Path | None = None, **options) -> Path:
    """Train a pico-decoder (kind="decoder") or pico-relora (kind="relora").

    Options are those of `dynlab train` with underscores (steps=..., batch_size=...,
    reset_every=..., paper_compat=True, out=...); `config` is a YAML file holding any of
    them (explicit options win). Returns the run directory.
    """
    cfg = make_config(kind, options, config)
    explicit = {option_name(k) for k, v in options.items() if v is not None}
    if config is not None:
        explicit |= set(load_yaml_options(config))
    return run_training(cfg, explicit)
