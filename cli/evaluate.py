"""`dynlab eval` (stub; replaced by the evaluation work)."""

from __future__ import annotations


def evaluate() -> None:
    """Perplexity and BLiMP at checkpoints."""
    raise SystemExit("not implemented yet")
