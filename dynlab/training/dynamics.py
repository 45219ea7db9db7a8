"""The trainer's learning-dynamics capture: `dynlab.model.dynamics.learning_dynamics` (the
gradient of the fixed learning-dynamics batch's loss at a checkpoint, relora factors by the
chain rule; the formulas are in that module's docstring), plus the activations the trainer
records with `--save-activations`.
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
