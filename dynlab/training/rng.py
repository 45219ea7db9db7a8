"""The training run's random streams: saved in checkpoints, restored on resume, and kept
still while evaluation and learning-dynamics passes run."""

from __future__ import annotations

import torch

from dynlab.model.dynamics import preserved_rng

__all__ = ["capture_rng", "preserved_rng", "restore_rng"]


def capture_rng(device: torch.device) -> dict:
    """The global CPU generator's state, and the CUDA one of `device` when it is a GPU."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    """Set the generators to a `capture_rng` state."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
