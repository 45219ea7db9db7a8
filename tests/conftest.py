"""Fixtures shared by the test modules (builders of tiny models and runs: tests/builders.py).

Markers (pyproject.toml): `slow` for every test that spawns processes (the CLI as a
subprocess, torchrun, Dask workers, a Jupyter kernel, Chromium) or trains more than a few
steps; `make test-fast` runs the others."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on two cores) each worker computes on
    one thread: two workers of torch's default thread count would ask for twice the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU makes OpenMP threads spin;
    torch's previous setting is restored after the module. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """DYNLAB_CACHE (tokenizers trained on the data) in the test's own tmp_path."""
    monkeypatch.setenv("DYNLAB_CACHE", str(tmp_path / "cache"))
