"""Learning-dynamics capture: the gradient of a fixed batch's loss at a checkpoint.

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
"""

from __future__ import annotations

import torch
from torch import nn

from dynlab.model import dynamics
from dynlab.model.dynamics import factor_grads

__all__ = ["factor_grads", "learning_dynamics"]


def learning_dynamics(model: nn.Module, ld_batch: torch.Tensor, device: torch.device, *,
                      activations: bool = False, chunk_tokens: int = 16_384,
                      positions: str = "last", seed: int = 0,
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, float]:
    """The trainer's capture: `dynlab.model.dynamics.learning_dynamics`, recording activations
    when asked.

    Returns (grads, activations or None, mean loss). activations hold, at the kept token
    `positions` (`last`, `all` or `sample:N` drawn with `seed`), each linear module's output
    and each block's output (the residual stream, `layers.<i>`), plus `token_positions` and
    `batch_tokens` (dynlab.analysis.activations).
    """
    record = None
    if activations:
        from dynlab.analysis.activations import Recorder, recorded_modules, select_positions

        kept = select_positions(positions, ld_batch.shape[0], ld_batch.shape[1] - 1, seed)

        def record(plain: nn.Module) -> Recorder:
            return Recorder(recorded_modules(plain, (nn.Linear,)), kept)

    return dynamics.learning_dynamics(model, ld_batch, device, record=record,
                                      chunk_tokens=chunk_tokens)
