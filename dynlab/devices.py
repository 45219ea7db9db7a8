"""Devices: the one resolver of a `--device` value, shared by training, evaluation and
analysis (and their command lines)."""

from __future__ import annotations

import torch

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda when `torch.cuda.is_available()`, else cpu; 'cpu', 'cuda', 'cuda:N' (and
    other torch device strings such as 'mps') as `torch.device`. ValueError, naming the value,
    for a string that is not a device or a CUDA device on a machine without CUDA."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"--device {name!r}: not a device; expected {DEVICE_HELP}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device
