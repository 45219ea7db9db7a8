"""`dynlab export --format pico-analyze`: the per-step JSON layout, read back against the store."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from builders import TINY_SPEC_ARGS

import dynlab
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run

SPEC = ModelSpec(**TINY_SPEC_ARGS)
BIN = Path(sys.executable).parent / "dynlab"


def cli(*args):
    """The real command line, in process (typer's runner); stderr kept apart."""
    from typer.testing import CliRunner

    from dynlab_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def rank_deficient(step, w, g):
    w["layers.1.swiglu.w_1.weight"] = torch.zeros(48, 32)  # CN NaN: left out
    w["layers.0.swiglu.w_0.weight"] = torch.randn(48, 2, dtype=torch.float64) @ torch.randn(
        2, 32, dtype=torch.float64)  # CN = inf


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    dec = make_run(root / "dec", SPEC, [0, 10], edit=rank_deficient)
    rel = make_run(root / "rel", SPEC, [0, 10], relora={"r": 4, "alpha": 8}, seed=2)
    return dynlab.analyze([dec, rel], root / "s.zarr", metrics="per,cn", progress=False,
                          device="cpu")


def test_layout_keys_and_values(store, tmp_path):
    out = tmp_path / "out"
    res = cli("export", store, "-o", out, "--format", "pico-analyze", "--run", "dec")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (out / "step_10").iterdir())
    # pico-analyze's layout: one file per metric (its name: cn is condition_number), every
    # data type in it, keys <layer>.<component>.<data type>
    assert names == ["condition_number_val.json", "per_val.json"]
    assert sorted(p.name for p in (out / "step_0").iterdir()) == names
    per = json.loads((out / "step_10" / "per_val.json").read_text())
    ds = xr.open_zarr(store).sel(run="dec", step=10, kind="weights")
    assert per["layers.1.attention.v_proj.weights"] == float(
        ds.per.sel(layer=1, matrix="attention.v_proj"))
    assert per["layers.0.ov_circuit.weights"] == float(ds.per.sel(layer=0, matrix="ov_circuit"))
    assert per["layers.1.ov_circuit.weights.heads.3"] == float(ds.head_per.sel(layer=1, head=3))
    assert per["layers.0.qk_circuit.weights.heads.2"] == float(
        ds.qk_head_per.sel(layer=0, head=2))
    assert per["layers.1.qk_circuit.weights"] == float(ds.qk_per.sel(layer=1))
    assert per["de_embedding_proj.weights"] == float(
        ds.emb_per.sel(embedding="de_embedding_proj"))
    full = xr.open_zarr(store).sel(run="dec", step=10)
    assert per["layers.0.swiglu.w_2.gradients"] == float(
        full.per.sel(kind="grads", layer=0, matrix="swiglu.w_2"))
    assert per["layers.1.ov_circuit.gradients.heads.0"] == float(
        full.head_per.sel(kind="grads", layer=1, head=0))
    assert per["layers.0.attention.o_proj.updates"] == float(
        full.per.sel(kind="updates", layer=0, matrix="attention.o_proj"))
    # weights: 8 matrices, 4 OV heads, the layer QK and 4 QK heads per layer, 2 embeddings;
    # the zero swiglu.w_1 of layer 1 has no PER (NaN) and is left out
    weights = [k for k in per if ".weights" in k]
    assert len(weights) == 2 * (8 + 4 + 1 + 4) + 2 - 1
    assert "layers.1.swiglu.w_1.weights" not in per
    step0 = json.loads((out / "step_0" / "per_val.json").read_text())
    assert not any(k.endswith(".updates") for k in step0)  # no update into step 0
    cn = json.loads((out / "step_10" / "condition_number_val.json").read_text())
    assert cn["layers.0.swiglu.w_0.weights"] == math.inf  # written as Infinity, read as inf
    assert "layers.1.swiglu.w_1.weights" not in cn  # NaN (zero matrix) is left out
    assert np.isnan(float(ds.cn.sel(layer=1, matrix="swiglu.w_1")))


def test_prefix_of_pico_train_keys(store, tmp_path):
    from dynlab.analysis.export import export

    export(store, tmp_path / "p", run="dec", prefix="_forward_module.layers.")
    per = json.loads((tmp_path / "p" / "step_10" / "per_val.json").read_text())
    ds = xr.open_zarr(store).sel(run="dec", step=10, kind="weights")
    assert per["_forward_module.layers.1.ov_circuit.weights.heads.2"] == float(
        ds.head_per.sel(layer=1, head=2))
    assert per["embedding_proj.weights"] == float(ds.emb_per.sel(embedding="embedding_proj"))


def test_several_runs_and_errors(store, tmp_path):
    from dynlab.analysis.export import export

    files = export(store, tmp_path / "all", split="train")
    rel = json.loads((tmp_path / "all" / "rel" / "step_10" / "per_train.json").read_text())
    assert any(k.endswith(".lora") for k in rel)
    dec = json.loads((tmp_path / "all" / "dec" / "step_10" / "per_train.json").read_text())
    assert not any(k.endswith(".lora") for k in dec)
    assert (tmp_path / "all" / "dec" / "step_0" / "per_train.json").is_file()
    assert len(files) == len(list((tmp_path / "all").rglob("*.json")))
    res = cli("export", store, "-o", tmp_path / "x", "--format", "csv")
    assert res.exit_code == 2 and "--format" in res.output
    res = cli("export", store, "-o", tmp_path / "x", "--run", "nope")
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_export_as_a_process(store, tmp_path):
    res = subprocess.run([str(BIN), "export", str(store), "-o", str(tmp_path / "p"),
                          "--run", "rel"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    per = json.loads((tmp_path / "p" / "step_10" / "per_val.json").read_text())
    assert any(k.endswith(".lora") for k in per)


def test_prefix_option_names_the_layer_keys(store, tmp_path):
    """`--prefix` starts every layer key with it (pico-train's module names), other keys kept."""
    out = tmp_path / "pre"
    res = cli("export", store, "-o", out, "--run", "dec", "--prefix", "_forward_module.layers.")
    assert res.exit_code == 0, res.output
    per = json.loads((out / "step_10" / "per_val.json").read_text())
    ds = xr.open_zarr(store).sel(run="dec", step=10, kind="weights")
    assert per["_forward_module.layers.1.attention.v_proj.weights"] == float(
        ds.per.sel(layer=1, matrix="attention.v_proj"))
    assert not any(k.startswith("layers.") for k in per)
    assert "de_embedding_proj.weights" in per
