"""`dynlab plot` and `dynlab report` (stubs; replaced by the visualisation work)."""

from __future__ import annotations


def plot() -> None:
    """One figure from a store."""
    raise SystemExit("not implemented yet")


def report() -> None:
    """An HTML report from one or more stores."""
    raise SystemExit("not implemented yet")
