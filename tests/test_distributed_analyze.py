"""Dask-distributed analysis: a real LocalCluster of 2 worker processes gives the same store
as a serial run, and resumes like one."""

import pytest
import xarray as xr
from builders import TINY_SPEC_ARGS

import dynlab
from dynlab.analysis.dask import parse_scheduler
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run

pytestmark = pytest.mark.slow  # starts a Dask LocalCluster

SPEC = ModelSpec(**TINY_SPEC_ARGS)


def test_local_cluster_equals_serial_and_resumes(tmp_path):
    a = make_run(tmp_path / "a", SPEC, [0, 10, 20, 30], meta=lambda s: {"train_loss": 1.0 + s})
    b = make_run(tmp_path / "b", SPEC, [0, 15], relora={"r": 4, "alpha": 8}, seed=4)
    serial = dynlab.analyze([a, b], tmp_path / "serial.zarr", metrics="per,cn,gini",
                            progress=False)
    # a partial store first (only run a's first two checkpoints analysed), then the cluster
    part = tmp_path / "dask.zarr"
    import shutil

    shutil.copytree(a, tmp_path / "a_part" / "a")
    for step in (20, 30):
        shutil.rmtree(tmp_path / "a_part" / "a" / "checkpoints" / f"step_{step}")
    dynlab.analyze([tmp_path / "a_part" / "a", b], part, metrics="per,cn,gini",
                   kinds="weights,grads,updates,lora", progress=False)
    done_before = dynlab.open_store(part).analyzed.values.sum()
    assert done_before == 4
    dynlab.analyze([a, b], part, scheduler="local:2", progress=False)
    xr.testing.assert_identical(xr.open_zarr(serial).load(), xr.open_zarr(part).load())


def test_parse_scheduler():
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    for bad in ("local:0", "local:x", "10.0.0.1:8786"):
        with pytest.raises(ValueError, match="scheduler"):
            parse_scheduler(bad)
