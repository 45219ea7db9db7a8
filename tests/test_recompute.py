"""`dynlab recompute`: metrics from stored spectra equal those analyze computes, without the
checkpoints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from builders import TINY_SPEC_ARGS

import dynlab
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run

SPEC = ModelSpec(**TINY_SPEC_ARGS)
BIN = Path(sys.executable).parent / "dynlab"
ADDED = ["alpha", "alpha_ks", "alpha_n_tail", "cn", "numerical_rank"]


def cli(*args):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True)


def cli_in_process(*args):
    """The real command line, in process (typer's runner)."""
    from typer.testing import CliRunner

    from dynlab_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_recompute_equals_analyze_without_checkpoints(tmp_path):
    run = make_run(tmp_path / "runs" / "rel", SPEC, [0, 10, 20], relora={"r": 4, "alpha": 8})
    full = dynlab.analyze([run], tmp_path / "full.zarr", metrics=",".join(["per", *ADDED]),
                          progress=False, device="cpu")
    part = dynlab.analyze([run], tmp_path / "part.zarr", metrics="per", progress=False,
                          device="cpu")
    hidden = tmp_path / "elsewhere"
    shutil.move(tmp_path / "runs", hidden)  # no checkpoint is reachable now
    res = cli("recompute", part, "--metrics", ",".join(ADDED), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "alpha" in res.stdout and "qk_head_alpha" in res.stdout
    a, b = xr.open_zarr(full), xr.open_zarr(part)
    assert b.attrs["metrics"] == ["per", *ADDED]
    for prefix in ("", "head_", "emb_", "qk_", "qk_head_"):
        for m in ADDED:
            xr.testing.assert_identical(a[prefix + m].load(), b[prefix + m].load())
    assert np.isfinite(b.alpha.sel(kind="weights", matrix="swiglu.w_0").values).all()
    # the store keeps growing with its new metric list when training writes more
    shutil.move(hidden, tmp_path / "runs")
    make_run(tmp_path / "more" / "rel", SPEC, [0, 10, 20, 30], relora={"r": 4, "alpha": 8})
    shutil.copytree(tmp_path / "more/rel/checkpoints/step_30", run / "checkpoints/step_30")
    dynlab.analyze([run], part, progress=False, device="cpu")
    c = xr.open_zarr(part)
    assert np.isfinite(c.alpha.sel(kind="weights", step=30, matrix="swiglu.w_0").values).all()


def test_recompute_refuses_clearly(tmp_path):
    run = make_run(tmp_path / "dec", SPEC, [0], grads=False)
    store = dynlab.analyze([run], tmp_path / "s.zarr", metrics="per", progress=False,
                           device="cpu")
    res = cli_in_process("recompute", store, "--metrics", "hoyer")
    assert res.exit_code == 2 and "hoyer" in res.output and "dynlab analyze" in res.output
    res = cli_in_process("recompute", store, "--metrics", "nonsense")
    assert res.exit_code == 2 and "nonsense" in res.output
    res = cli_in_process("recompute", tmp_path / "nope.zarr", "--metrics", "alpha")
    assert res.exit_code == 2 and "nope.zarr" in res.output
    assert "Traceback" not in res.output
    # recomputing a metric the store has overwrites it with the same numbers
    before = xr.open_zarr(store).per.load()
    from dynlab.analysis.recompute import recompute

    assert "per" in recompute(store, "per")
    xr.testing.assert_identical(xr.open_zarr(store).per.load(), before)
