"""The trainer's writes to its run directory: run.json and tokenizer.json at the start, a
checkpoint at step 0, every `checkpoint_every` steps and at the last step.

    ckpt = Checkpointer(run_dir, cfg, model, optimizer, state, data, device)
    ckpt.load(path)                          # every rank restores the same checkpoint
    ckpt.save(step, last, eval_result)       # every rank calls it; rank 0 writes

A checkpoint holds the weights (relora: effective weights W + s·B A and the factors), the
learning-dynamics gradients of the fixed batch (dynlab.training.dynamics), optional
activations, the resume state, and meta.json last (dynlab.runs.files.write_checkpoint).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from torch import nn

from dynlab.errors import InputError
from dynlab.model.relora import effective_state_dict
from dynlab.runs.config import ModelConfig, planned_reset_steps
from dynlab.runs.files import write_checkpoint, write_ld_batch, write_run_json, write_tokenizer
from dynlab.runs.layout import clean_incomplete, remove_run_files, step_of
from dynlab.training import ddp
from dynlab.training.config import TrainConfig, relora_config
from dynlab.training.data import TokenData
from dynlab.training.dynamics import learning_dynamics
from dynlab.training.resume import TrainState, restore, trainer_state
from dynlab.training.rng import capture_rng
from dynlab.training.schedules import learning_rate


class Clock:
    """Wall-clock seconds and device-hours of a run, continued from the checkpoint a session
    resumed from, and its training throughput in this session."""

    def __init__(self, state: TrainState, world: int) -> None:
        self.start = time.perf_counter()
        self.wall_before, self.device_before = state.wall_seconds, state.device_seconds
        self.tokens_before, self.world = state.tokens, world
        self.checkpointed: dict[int, float] = {}  # step -> the gpu_hours its checkpoint holds

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.start

    def gpu_hours(self, step: int | None = None) -> float:
        """Device-hours: wall-clock × processes (GPUs on CUDA), summed over sessions from the
        checkpoint each resumed; a checkpointed step gives its checkpoint's value."""
        if step in self.checkpointed:
            return self.checkpointed[step]
        return (self.device_before + (time.perf_counter() - self.start) * self.world) / 3600.0

    def tokens_per_second(self, tokens: int) -> float:
        """Training tokens per second in this session."""
        return (tokens - self.tokens_before) / max(1e-9, self.wall() - self.wall_before)


def run_record(cfg: TrainConfig, mcfg: ModelConfig, model: nn.Module, data: TokenData,
               world_size: int = 1, backend: str | None = None) -> dict:
    """run.json: kind, model, relora (with the updates a reset follows), train options, data,
    parameters, distributed (the processes the run started with), dynlab_version."""
    from dynlab.version import __version__

    rec = {"kind": cfg.kind, "model": mcfg.to_dict()}
    if cfg.kind == "relora":
        rcfg = relora_config(cfg)
        rec["relora"] = rcfg.to_dict() | {"reset_steps": planned_reset_steps(
            cfg.steps, rcfg.reset_every, cfg.warmup_steps, rcfg.paper_compat)}
    rec["train"] = cfg.to_dict()
    rec["data"] = {"train_tokens": data.n_train_tokens, "train_windows": data.n_windows,
                   "ld_batch_size": int(data.ld_batch.shape[0]),
                   "ld_seq_len": int(data.ld_batch.shape[1] - 1)}
    rec["parameters"] = {"total": sum(p.numel() for p in model.parameters()),
                         "trainable": sum(p.numel() for p in model.parameters()
                                          if p.requires_grad)}
    rec["distributed"] = {"world_size": world_size,
                          "backend": backend if world_size > 1 else None,
                          "batch_size_per_process": cfg.batch_size // world_size}
    rec["dynlab_version"] = __version__
    return rec


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, resume_ckpt: Path | None, record: dict,
                    tokenizer, ld_batch: torch.Tensor | None = None) -> None:
    """Rank 0's setup of --out: on resume, delete what lies beyond the checkpoint resumed
    from; else (after --overwrite's removal of the old run's files) write run.json,
    tokenizer.json and the learning-dynamics batch (ld_batch.safetensors)."""
    if resume_ckpt is not None:
        clean_incomplete(run_dir, after_step=step_of(resume_ckpt))
        return
    if cfg.overwrite and run_dir.exists():
        remove_run_files(run_dir)  # only what dynlab wrote (resume.check_out_dir)
    elif cfg.resume:
        warnings.warn(f"--resume: {run_dir} has no complete checkpoint; starting the run at "
                      "step 0 (nothing but dynlab's unfinished checkpoints is deleted)",
                      stacklevel=3)
        clean_incomplete(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_json(run_dir, record)
    write_tokenizer(run_dir, tokenizer)
    if ld_batch is not None:
        write_ld_batch(run_dir, ld_batch)


class Checkpointer:
    """Saves and loads the checkpoints of one training run (module docstring)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, model: nn.Module,
                 optimizer: torch.optim.Optimizer, state: TrainState, data: TokenData,
                 device: torch.device, *, rank: int = 0, world: int = 1) -> None:
        self.run_dir, self.cfg, self.model, self.optimizer = run_dir, cfg, model, optimizer
        self.state, self.data, self.device = state, data, device
        self.rank, self.world = rank, world
        self.clock = Clock(state, world)

    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.checkpoint_every == 0 or last

    def save(self, step: int, last: bool, eval_result: dict | None = None) -> Path | None:
        """Write checkpoint `step` when one is due (every rank calls this: under DDP it checks
        that the ranks hold the same state and gathers their RNG states); returns its path
        on rank 0. `eval_result` is stored as meta.json["eval"]."""
        if not self.due(step, last):
            return None
        cfg, state, model = self.cfg, self.state, self.model
        rng = capture_rng(self.device)
        rngs = None
        if self.world > 1:  # collectives: every rank takes part
            ddp.check_in_step(step, model, self.optimizer, self.rank)
            rngs = ddp.gather_rng(rng)
        if self.rank != 0:
            return None
        grads, acts, ld_loss = learning_dynamics(model, self.data.ld_batch, self.device,
                                                 activations=bool(cfg.save_activations),
                                                 positions=cfg.activation_positions,
                                                 seed=cfg.seed)
        meta = {"step": step, "tokens": state.tokens, "train_loss": state.train_loss,
                "lr": learning_rate(cfg, step), "wall_seconds": self.clock.wall(),
                "ld_loss": ld_loss, "gpu_hours": self.clock.gpu_hours()}
        state.device_seconds = meta["gpu_hours"] * 3600.0
        self.clock.checkpointed = {step: meta["gpu_hours"]}
        if cfg.kind == "relora":
            meta["relora_cycle"] = state.relora_cycle
        if self.world > 1:
            meta |= {"world_size": self.world, "ranks_in_step": True}
        if eval_result is not None:
            meta["eval"] = eval_result
        return write_checkpoint(self.run_dir, step, effective_state_dict(model), grads, meta,
                                activations=acts, dtype=torch.float32,
                                trainer_state=trainer_state(model, self.optimizer, state, rng,
                                                            rngs))

    def load(self, ckpt: Path) -> None:
        """Restore model, optimizer, counters and RNG from checkpoint `ckpt` (every rank);
        InputError naming it, and how to resume from an earlier one, when it is unreadable."""
        try:
            restore(self.model, self.optimizer, self.state, ckpt, self.device, rank=self.rank,
                    world_size=self.world, seed=self.cfg.seed)
        except InputError as err:
            raise InputError(f"--resume: {err}. The checkpoints are left as they are; to "
                             f"resume from an earlier one, move {ckpt} out of the run") from err
        self.clock = Clock(self.state, self.world)  # time continues from the checkpoint's
