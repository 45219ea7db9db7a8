"""The learning-dynamics gradient: the gradient of a fixed batch's loss at a checkpoint.

    G_W = ∂L/∂W,   L = (1 / N) Σ_{sequences, positions} -log softmax(logits_t)[target_t]

on the run's fixed learning-dynamics batch (N tokens), apart from training: the model runs
in eval mode (no dropout) and float32, the batch in chunks, gradients come from
torch.autograd.grad (parameters' .grad, the optimizer and the RNG are untouched).

A relora model is evaluated as the plain decoder it computes (`dynlab.model.relora.unwrap`:
each wrapped weight replaced by W_eff = W + s·B A), so `<module>.weight` holds
G = ∂L/∂W_eff, the gradient an unwrapped model holding W_eff gets. The factors' gradients
follow by the chain rule through W_eff = W + s·(B A):

    ∂L/∂A = Bᵀ (s G),   ∂L/∂B = (s G) Aᵀ

computed per chunk in the order autograd would (scale first, then the product), so they
equal what autograd through the wrapped model gives.

The trainer (every checkpoint) and the gradient readers of other checkpoints
(`dynlab.sources.grads`) share this one function, so both compute the same gradient. What it
records besides (activations) is passed in as a `record` factory by the layer above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynlab.model.relora import relora_modules, unwrap


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
            ) -> torch.Tensor:
    """Next-token cross-entropy: -mean_t log softmax(logits_t)[target_t]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction=reduction)


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block without disturbing the global RNG streams (CPU, and `device`'s on CUDA)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def factor_grads(grad_w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂A, ∂L/∂B) from G = ∂L/∂W_eff for W_eff = W + scale·(B A): (Bᵀ (s G), (s G) Aᵀ)."""
    sg = grad_w * scale
    return lora_B.detach().t().mm(sg), sg.mm(lora_A.detach().t())


def learning_dynamics(model: nn.Module, ld_batch: torch.Tensor, device: torch.device, *,
                      record: Callable[[nn.Module], Any] | None = None,
                      chunk_tokens: int = 16_384,
                      ) -> tuple[dict[str, torch.Tensor], Any, float]:
    """Gradients of the mean next-token loss on the fixed batch (module docstring).

    Returns (grads, record's result or None, mean loss). grads: every trainable parameter of
    `model` (for relora the factors `<module>.lora_A` / `.lora_B`, by the chain rule) plus,
    for relora, `<module>.weight` = ∂L/∂W_eff. `record(plain_model)`, when given, returns a
    recorder (`dynlab.analysis.activations.Recorder`): its `start`/`stop` are set to each
    chunk's rows, `remove()` is called at the end and `result(ld_batch)` is returned.
    """
    wrapped = relora_modules(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    plain = unwrap(model).eval() if wrapped else model  # no RNG drawn (unwrap forks it)
    params = dict(plain.named_parameters())
    # what autograd differentiates on `plain`: its counterparts of the trainable parameters
    # (the factors excepted) and the effective weight of every wrapped module
    factors = {n for n in trainable if n.endswith((".lora_A", ".lora_B"))}
    inputs = [n for n in trainable if n not in factors] + [f"{n}.weight" for n in wrapped]
    grads = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in inputs}
    for name, m in wrapped.items():
        grads[f"{name}.lora_A"] = torch.zeros_like(m.lora_A, dtype=torch.float32)
        grads[f"{name}.lora_B"] = torch.zeros_like(m.lora_B, dtype=torch.float32)
    grads = {n: grads[n] for n in [*trainable, *(f"{n}.weight" for n in wrapped)]}
    recorder = record(plain) if record is not None else None
    n_seq, width = ld_batch.shape
    total_tokens = n_seq * (width - 1)
    chunk = max(1, chunk_tokens // max(1, width - 1))
    loss_sum = 0.0
    try:
        with preserved_rng(device):
            for start in range(0, n_seq, chunk):
                batch = ld_batch[start:start + chunk].to(device)
                if recorder is not None:
                    recorder.start, recorder.stop = start, start + batch.shape[0]
                logits = plain(batch[:, :-1])
                loss = lm_loss(logits, batch[:, 1:], reduction="sum") / total_tokens
                got = torch.autograd.grad(loss, [params[n] for n in inputs], allow_unused=True)
                for name, g in zip(inputs, got, strict=True):
                    if g is not None:
                        grads[name] += g.float()
                for name, m in wrapped.items():
                    g = got[inputs.index(f"{name}.weight")]
                    if g is not None:
                        g_a, g_b = factor_grads(g, m.lora_A, m.lora_B, m.scale)
                        grads[f"{name}.lora_A"] += g_a.float()
                        grads[f"{name}.lora_B"] += g_b.float()
                loss_sum += loss.item()
    finally:
        if recorder is not None:
            recorder.remove()
        model.train(was_training)
    out_acts = recorder.result(ld_batch) if recorder is not None else None
    return grads, out_acts, loss_sum
