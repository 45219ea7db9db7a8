"""dynlab: learning dynamics of small language models.

Import is light: torch, xarray and zarr load on first use of the functions below.
"""

from __future__ import annotations

__version__ = "0.1.0"


def analyze(*args, **kwargs):
    """Spectral analysis of runs into a Zarr store; see `dynlab.analysis.analyze`."""
    from dynlab.analysis import analyze as _analyze

    return _analyze(*args, **kwargs)


def open_store(path):
    """Open an analysis store as an xarray Dataset; see `dynlab.store.open_store`."""
    from dynlab.store import open_store as _open_store

    return _open_store(path)


def train(*args, **kwargs):
    """Train a pico-decoder or pico-relora; see `dynlab.train.trainer.train`."""
    from dynlab.train.trainer import train as _train

    return _train(*args, **kwargs)
