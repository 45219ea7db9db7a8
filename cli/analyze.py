"""`dynlab analyze` (stub; replaced by the foundation work)."""

from __future__ import annotations


def analyze() -> None:
    """Spectral metrics of checkpoints into a Zarr store."""
    raise SystemExit("not implemented yet")
