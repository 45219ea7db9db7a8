"""`dynlab train decoder|relora` (stub; replaced by the trainer work)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Train pico-decoder or pico-relora with learning-dynamics checkpoints.")
