"""One optimizer update, and the loss it minimises.

    loss = -mean_t log softmax(logits_t)[target_t]          (lm_loss, float32)

A step runs `grad_accum` micro-batches (bf16 autocast on CUDA, float32 elsewhere, as
pico-train), accumulates their gradients and makes one AdamW update.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from dynlab.model.dynamics import lm_loss
from dynlab.training import ddp
from dynlab.training.rng import preserved_rng

__all__ = ["autocast", "batch_loss", "lm_loss", "set_lr", "train_step"]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, plain float32 elsewhere (as pico-train)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[torch.Tensor], lr: float, device: torch.device, *,
               no_sync=None) -> float:
    """One update: mean loss over the micro-batches, gradients accumulated, AdamW step.

    Under DDP, `no_sync` (DistributedDataParallel.no_sync) skips the gradient all-reduce of
    every micro-batch but the last, and the returned loss is the mean over ranks, so every
    rank takes the same decision. Returns the mean loss; when it is not finite no update is
    made (the caller stops)."""
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        defer = no_sync is not None and i < len(micro_batches) - 1
        with no_sync() if defer else contextlib.nullcontext():
            with autocast(device):
                logits = model(batch[:, :-1])
            loss = lm_loss(logits, batch[:, 1:]) / len(micro_batches)
            loss.backward()
        total += loss.item()
    total = ddp.mean_over_ranks(total, device)
    if math.isfinite(total):
        optimizer.step()
    return total


@torch.no_grad()
def batch_loss(model: nn.Module, batch: torch.Tensor, device: torch.device) -> float:
    """Mean next-token loss of a batch in eval mode (no dropout), RNG untouched."""
    was_training = model.training
    model.eval()
    try:
        with preserved_rng(device):
            batch = batch.to(device)
            return lm_loss(model(batch[:, :-1]), batch[:, 1:]).item()
    finally:
        model.train(was_training)
