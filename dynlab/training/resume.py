"""The resume policy: what --out may hold, which options a resume may change, which
checkpoint a run continues from, and what a checkpoint restores.

- A fresh run needs an empty (or missing) --out; --overwrite replaces a dynlab run there.
- --resume continues the run in --out from its latest complete checkpoint, with the stored
  options; only `RESUME_MUTABLE` ones may be given anew (others must match).
- Rerunning the exact command of an interrupted run continues it (`continue_interrupted`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dynlab.errors import InputError
from dynlab.model.relora import relora_modules
from dynlab.runs.files import read_run_json, read_trainer_state, read_weights
from dynlab.runs.layout import CheckpointError, complete_checkpoints
from dynlab.training import ddp
from dynlab.training.config import MODEL_FIELDS, TrainConfig
from dynlab.training.rng import restore_rng

RESUME_MUTABLE = {"resume", "overwrite", "stop_at", "device", "threads", "progress", "compile",
                  "eval_every", "eval_ppl", "eval_blimp", "eval_batch_size", "save_activations",
                  "activation_positions",
                  "log_every", "out", "micro_batch_size", "log"}
MODEL_DEFINING = {"kind", "preset", "lora_rank", "lora_alpha", "paper_compat", "vocab_size",
                  "tokenizer", *MODEL_FIELDS}


@dataclass
class TrainState:
    """The counters a checkpoint saves and a resume restores."""

    step: int = 0
    data_position: int = 0
    relora_cycle: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    train_loss: float = math.nan
    device_seconds: float = 0.0  # wall-clock × processes, summed over sessions


def resume_config(cfg: TrainConfig, explicit: set[str], run_dir: Path) -> TrainConfig:
    """The stored run's options, with the explicitly given mutable ones applied."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} has no run.json (nothing to resume)")
    try:
        stored = read_run_json(run_dir)
    except CheckpointError as err:
        raise InputError(f"--resume: {err}") from err
    if not isinstance(stored.get("train", {}), dict):
        raise InputError(f"--resume: {path}: expected an object with a 'train' object")
    base = TrainConfig.from_stored(stored.get("train", {}))
    try:
        base.resolved()
    except (ValueError, TypeError) as err:
        raise InputError(f"--resume: {path} holds options that cannot train: {err}") from err
    given = dataclasses.asdict(cfg)
    for name in sorted(explicit | {"kind"}):
        if name in RESUME_MUTABLE or name not in given:
            continue
        if given[name] != getattr(base, name):
            what = "a run of another model" if name in MODEL_DEFINING else "a run whose option"
            raise ValueError(
                f"--resume into {what}: {run_dir} has {name}={getattr(base, name)!r}, "
                f"given {given[name]!r}"
            )
    mutable = {"stop_at": None}  # an interruption of the stored run is not carried over
    mutable |= {k: given[k] for k in explicit if k in RESUME_MUTABLE and k in given}
    mutable |= {"resume": True, "overwrite": False}
    return dataclasses.replace(base, **mutable)


def check_out_dir(cfg: TrainConfig) -> Path:
    """Errors for an --out that cannot be used; changes nothing on disk."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    if cfg.resume:
        return out
    if nonempty and not cfg.overwrite:
        raise FileExistsError(f"--out {out}: exists and is not empty; pass --resume to continue "
                              "that run or --overwrite to replace it")
    if nonempty and not (out / "run.json").is_file():
        raise FileExistsError(f"--out {out}: --overwrite refuses to delete a directory that "
                              "is not a dynlab run (no run.json)")
    return out


def interrupted_run(cfg: TrainConfig) -> bool:
    """Whether --out holds an unfinished run of exactly these options (all but those a resume
    may change, RESUME_MUTABLE): then rerunning the command that was interrupted continues
    that run, which an exact resume makes the same as starting it again."""
    if cfg.resume or cfg.overwrite or cfg.stop_at is not None:
        return False
    out = Path(cfg.out).expanduser()
    try:
        stored = read_run_json(out)["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(stored, dict):
        return False
    given = cfg.to_dict()  # stored names, as run.json holds them
    if any(stored.get(k) != v for k, v in given.items() if k not in RESUME_MUTABLE | {"extra"}):
        return False
    return not any(step >= cfg.steps for step, _ in complete_checkpoints(out))


def continue_interrupted(cfg: TrainConfig) -> TrainConfig:
    """cfg with --resume set when --out holds its interrupted run (interrupted_run), said on
    the console; else cfg."""
    if not interrupted_run(cfg):
        return cfg
    warnings.warn(f"--out {cfg.out}: holds an unfinished run of these options; continuing it "
                  "(as --resume; --overwrite starts it again)", stacklevel=2)
    return dataclasses.replace(cfg, resume=True)


def resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint a --resume continues from: the run's latest complete one (None when
    there is none, or without --resume)."""
    found = complete_checkpoints(run_dir) if cfg.resume else []
    return found[-1][1] if found else None


def warm_start_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest complete checkpoint of a run directory."""
    p = Path(path).expanduser()
    if (p / "weights.safetensors").is_file():
        return p
    found = complete_checkpoints(p)
    if not found:
        raise FileNotFoundError(f"--warm-start {path}: neither a checkpoint directory nor a "
                                "run with complete checkpoints")
    return found[-1][1]


def tokenizer_source(cfg: TrainConfig, run_dir: Path, warm_ckpt: Path | None) -> Path | None:
    """The tokenizer a run loads instead of training one: the resumed run's, --tokenizer, or
    the warm-start run's (None: train a BPE tokenizer on the documents)."""
    if cfg.resume and (run_dir / "tokenizer.json").is_file():
        return run_dir / "tokenizer.json"
    if cfg.tokenizer:
        return Path(cfg.tokenizer).expanduser()
    if warm_ckpt is not None:
        return warm_ckpt.parent.parent / "tokenizer.json"
    return None


def trainer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                  rng: dict, rng_by_rank: list[dict] | None = None) -> dict:
    """What resuming needs besides weights.safetensors (loadable with weights_only=True).

    `rng` is rank 0's RNG state; under DDP `rng_by_rank` holds every rank's."""
    frozen = {f"{n}.weight": m.weight.detach().cpu().clone()
              for n, m in relora_modules(model).items()}
    out = {"state": dataclasses.asdict(state), "optimizer": optimizer.state_dict(),
           "rng": rng, "frozen_weights": frozen}
    if rng_by_rank is not None:
        out["rng_by_rank"] = rng_by_rank
    return out


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
            ckpt: Path, device: torch.device, *, rank: int = 0, world_size: int = 1,
            seed: int = 0) -> None:
    """Load model, optimizer, counters and RNG from a complete checkpoint.

    Every rank loads the same state. Rank r takes its own saved RNG state when the checkpoint
    was written by as many processes; otherwise rank 0 takes rank 0's and rank r > 0 starts
    a fresh stream (ddp.rank_seed(seed, r, step))."""
    ts = read_trainer_state(ckpt)
    weights = read_weights(ckpt / "weights.safetensors")
    weights.update(ts["frozen_weights"])  # relora: raw frozen W, not the effective weight
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"--resume: {ckpt} does not match the model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    optimizer.load_state_dict(ts["optimizer"])
    for k, v in ts["state"].items():
        setattr(state, k, v)
    by_rank = ts.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == world_size:
        restore_rng(by_rank[rank], device)
    elif rank == 0:
        restore_rng(ts["rng"], device)
    else:
        torch.manual_seed(ddp.rank_seed(seed, rank, state.step))
