"""The three jobs together: a real `dynlab train relora` run is read by `dynlab analyze`, and
the store holds what the checkpoints hold (spectra against scipy, training and evaluation
values against meta.json)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import xarray as xr
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # trains a relora run and spawns CLI processes

BIN = Path(sys.executable).parent / "dynlab"


def per_ref(mat: np.ndarray, k: int) -> float:
    s = scipy.linalg.svdvals(mat)[:k]
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum()) / k


def read(path: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    run = root / "relora"
    cmd = [str(BIN), "train", "relora", "--steps", "40", "--checkpoint-every", "10",
           "--reset-every", "20", "--restart-warmup-steps", "5", "--warmup-steps", "5",
           "--n-documents", "600", "--out", str(run), "--no-progress", "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = root / "analysis.zarr"
    res = subprocess.run([str(BIN), "analyze", str(run), "-o", str(out), "--metrics", "per,cn",
                          "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return run, xr.open_zarr(out).load()


def test_store_reads_every_checkpoint_of_a_trained_relora_run(trained):
    run, ds = trained
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert steps == [0, 10, 20, 30, 40]
    assert ds.step.values.tolist() == steps
    assert ds.kind.values.tolist() == ["weights", "grads", "updates", "lora"]
    assert ds.analyzed.values.tolist() == [[1] * 5]
    cfg = json.loads((run / "run.json").read_text())
    assert json.loads(ds.attrs["run_configs"])["relora"] == cfg


def test_spectra_of_trained_checkpoints_equal_scipy(trained):
    run, ds = trained
    cfg = json.loads((run / "run.json").read_text())
    scale = cfg["relora"]["alpha"] / cfg["relora"]["r"]
    r = cfg["relora"]["r"]
    ck = run / "checkpoints"
    w30, w20 = read(ck / "step_30/weights.safetensors"), read(ck / "step_20/weights.safetensors")
    g30 = read(ck / "step_30/grads.safetensors")
    sel = dict(run="relora", step=30, layer=1)
    name = "layers.1.attention.v_proj"
    cases = {
        ("weights", "attention.v_proj"): (w30[f"{name}.weight"], None),
        ("grads", "swiglu.w_2"): (g30["layers.1.swiglu.w_2.weight"], None),
        ("updates", "attention.v_proj"): (w30[f"{name}.weight"] - w20[f"{name}.weight"], None),
        ("lora", "attention.v_proj"): (scale * w30[f"{name}.lora_B"] @ w30[f"{name}.lora_A"], r),
    }
    for (kind, matrix), (mat, k) in cases.items():
        got = float(ds.per.sel(kind=kind, matrix=matrix, **sel))
        assert got == pytest.approx(per_ref(mat, k or min(mat.shape)), rel=1e-6), (kind, matrix)


def test_training_and_evaluation_values_reach_the_store(trained):
    run, ds = trained
    for step in (0, 20, 40):
        meta = json.loads((run / "checkpoints" / f"step_{step}" / "meta.json").read_text())
        sel = dict(run="relora", step=step)
        assert float(ds.train_loss.sel(**sel)) == pytest.approx(meta["train_loss"])
        assert float(ds.relora_cycle.sel(**sel)) == meta["relora_cycle"]
        ev = meta["eval"]
        assert float(ds.ppl_macro.sel(**sel)) == pytest.approx(ev["perplexity"]["macro"])
        for dom, value in ev["perplexity"]["by_domain"].items():
            assert float(ds.ppl.sel(domain=dom, **sel)) == pytest.approx(value)
        assert float(ds.blimp_overall.sel(**sel)) == pytest.approx(ev["blimp"]["overall"])
        for uid, value in ev["blimp"]["by_uid"].items():
            assert float(ds.blimp.sel(uid=uid, **sel)) == pytest.approx(value)
    # the model learned something between the first and last checkpoint
    ppl = ds.ppl_macro.sel(run="relora")
    assert float(ppl.sel(step=40)) < float(ppl.sel(step=0))


def test_standalone_eval_reaches_the_store_on_the_next_analyze(trained, tmp_path):
    run, _ = trained
    res = subprocess.run([str(BIN), "eval", str(run / "checkpoints" / "step_40"), "--blimp",
                          "none", "-o", str(tmp_path / "e.json")], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "e.json").read_text())
    result = result[0] if isinstance(result, list) else result
    out = tmp_path / "s.zarr"
    subprocess.run([str(BIN), "analyze", str(run), "-o", str(out), "--metrics", "per",
                    "--kinds", "weights", "--no-progress"], check=True, capture_output=True)
    ds = xr.open_zarr(out)
    for dom, value in result["perplexity"]["by_domain"].items():
        assert float(ds.ppl.sel(run="relora", step=40, domain=dom)) == pytest.approx(value)
