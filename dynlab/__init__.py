"""dynlab: learning dynamics of small language models.

Import is light: torch, xarray and zarr load on first use of the functions below.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynlab.version import __version__

__all__ = ["__version__", "analyze", "notebook", "open_store", "train"]

if TYPE_CHECKING:
    import xarray as xr


def analyze(*args: Any, **kwargs: Any) -> Path:
    """Spectral analysis of runs into a Zarr store; see `dynlab.analysis.analyze`."""
    from dynlab.analysis import analyze as run_analysis

    return run_analysis(*args, **kwargs)


def open_store(path: str | Path) -> xr.Dataset:
    """Open an analysis store as an xarray Dataset; see `dynlab.analysis.store.open_store`."""
    from dynlab.analysis.store import open_store as open_analysis_store

    return open_analysis_store(path)


def train(kind: str = "decoder", **options: Any) -> Path:
    """Train a pico-decoder (`kind="decoder"`) or pico-relora (`"relora"`) and return the run
    directory; see `dynlab.training.trainer.train` for the options."""
    from dynlab.training.trainer import train as run_training

    return run_training(kind, **options)


def notebook() -> Path:
    """The path of the exploration notebook shipped inside the package (`explore.ipynb`):
    copy it beside your store and open it in Jupyter."""
    return Path(__file__).resolve().parent / "notebooks" / "explore.ipynb"
