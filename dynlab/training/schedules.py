"""Learning-rate multipliers (the reset rule they follow: dynlab.runs.config.reset_due).

A schedule maps the scheduler index t (the number of optimizer updates already made,
as torch's LambdaLR) to a multiplier of the base learning rate: update t + 1 uses lr(t).
"""

from __future__ import annotations

import math

PAPER_COSINE_HORIZON = 200_000  # relora-pico's max_steps, used as the cosine horizon


def linear_warmup_decay(t: int, warmup: int, total: int) -> float:
    """pico-train: t / warmup while t < warmup, then max(0, (total - t) / (total - warmup))."""
    if t < warmup:
        return t / max(1, warmup)
    return max(0.0, (total - t) / max(1, total - warmup))


def cosine_floor(progress: float, min_lr_ratio: float) -> float:
    """min_lr_ratio + (1 - min_lr_ratio) · ½(1 + cos(π · progress))."""
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def jagged_cosine(t: int, warmup: int, total: int, reset_every: int, restart_warmup: int,
                  min_lr_ratio: float) -> float:
    """ReLoRA's jagged cosine (Lialin et al.; relora-pico's `relora_jagged_cosine`).

        t < warmup:                                   t / warmup
        t ≥ reset_every and t mod reset_every < W:    (t mod reset_every) / W · c(t_W)
        otherwise:                                    c(t)
    with c(t) = cosine_floor((t - warmup) / (total - warmup), min_lr_ratio), W the restart
    warmup and t_W = ⌊t / reset_every⌋ · reset_every + W the end of the current re-warmup:
    one cosine from 1 to min_lr_ratio over the run, re-warmed linearly from 0 after each
    reset.
    """
    if t < warmup:
        return t / max(1, warmup)
    restart_step, restart_number = t % reset_every, t // reset_every
    span = max(1, total - warmup)
    if t >= reset_every and restart_step < restart_warmup:
        end = restart_number * reset_every + restart_warmup
        return restart_step / max(1, restart_warmup) * cosine_floor((end - warmup) / span,
                                                                   min_lr_ratio)
    return cosine_floor((t - warmup) / span, min_lr_ratio)


def lr_multiplier(t: int, *, kind: str, warmup: int, total: int, reset_every: int = 0,
                  restart_warmup: int = 0, min_lr_ratio: float = 0.1,
                  paper_compat: bool = False) -> float:
    """The run's schedule: pico-train's linear one for decoder, jagged cosine for relora."""
    if kind == "decoder":
        return linear_warmup_decay(t, warmup, total)
    horizon = PAPER_COSINE_HORIZON if paper_compat else total
    return jagged_cosine(t, warmup, horizon, reset_every, restart_warmup, min_lr_ratio)


def learning_rate(cfg, step: int) -> float:
    """The learning rate of update number `step` of a run with options `cfg` (a resolved
    dynlab.training.config.TrainConfig); step 0 gives the first update's: cfg.lr ·
    lr_multiplier(max(step - 1, 0))."""
    return cfg.lr * lr_multiplier(max(step - 1, 0), kind=cfg.kind, warmup=cfg.warmup_steps,
                                  total=cfg.schedule_horizon or cfg.steps,
                                  reset_every=cfg.reset_every or 0,
                                  restart_warmup=cfg.restart_warmup_steps or 0,
                                  min_lr_ratio=cfg.min_lr_ratio, paper_compat=cfg.paper_compat)
