"""`dynlab analyze` end to end on generated runs, against scipy float64 references computed
independently from the safetensors files."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import xarray as xr
from safetensors.torch import load_file
from typer.testing import CliRunner

import dynlab
from dynlab.analysis.metrics import TOL_FACTOR as TOL_C
from dynlab.analysis.store import StoreError
from dynlab.runs.checkpoints import CheckpointError, ModelSpec
from dynlab.testing import geometric_spectrum, make_run, matrix_with_spectrum
from dynlab_cli.main import app

sys.path.insert(0, str(Path(__file__).parent))
from builders import TINY_SPEC_ARGS  # noqa: E402
from references import product_norm  # noqa: E402

SPEC = ModelSpec(**TINY_SPEC_ARGS)
BIN = Path(sys.executable).parent / "dynlab"


# ---- an independent reference (numpy/scipy, float64) ------------------------------------


F64_EPS = float(np.finfo(np.float64).eps)
F32_EPS = float(np.finfo(np.float32).eps)


def ref_metrics(w: np.ndarray, k: int | None = None, eps: float = F64_EPS,
                norm: float | None = None) -> dict[str, float]:
    """er, per, cn of a dense matrix; k = rank bound (default min(m, n)); eps of the
    precision the matrix (or its inputs) was stored in, norm the Frobenius norm S of those
    stored inputs (default ‖w‖_F): σ ≤ max(c·eps·S·(1/√m + 1/√n), max(m, n)·eps_64·σ_1) is
    zero."""
    w = np.asarray(w, dtype=np.float64)
    if not np.isfinite(w).all():
        return {"er": math.nan, "per": math.nan, "cn": math.nan}
    s = scipy.linalg.svdvals(w)
    k = k or min(w.shape)
    s = s[:k]
    if s[0] == 0:
        return {"er": math.nan, "per": math.nan, "cn": math.nan}
    p = s / s.sum()
    nz = p[p > 0]
    er = math.exp(-(nz * np.log(nz)).sum())
    norm = float(np.linalg.norm(w)) if norm is None else norm
    m, n = w.shape
    tol = max(TOL_C * eps * norm * (m**-0.5 + n**-0.5), max(m, n) * F64_EPS * s[0])
    cn = math.inf if s[-1] <= tol else s[0] / s[-1]
    return {"er": er, "per": er / k, "cn": cn}


def assert_metric(got: float, ref: float, name: str) -> None:
    if math.isnan(ref):
        assert math.isnan(got), f"{name}: expected NaN, got {got}"
    elif math.isinf(ref):
        assert got == ref, f"{name}: expected {ref}, got {got}"
    else:
        assert got == pytest.approx(ref, rel=1e-6), name


def tensors(run: Path, step: int, file: str = "weights") -> dict[str, np.ndarray]:
    out = load_file(str(run / "checkpoints" / f"step_{step}" / f"{file}.safetensors"))
    return {k: v.double().numpy() for k, v in out.items()}  # bf16 is exact in float64


def stored_eps(run: Path, step: int, file: str = "weights") -> dict[str, float]:
    """Machine epsilon of the dtype each tensor is stored in."""
    out = load_file(str(run / "checkpoints" / f"step_{step}" / f"{file}.safetensors"))
    return {k: torch.finfo(v.dtype).eps for k, v in out.items()}


def plant(step, w, g):
    """Known spectra in layer 0 (κ = 1e8, rank-deficient, zero) at every step."""
    gen = torch.Generator().manual_seed(step + 7)
    d = SPEC.d_model
    w["layers.0.attention.q_proj.weight"] = matrix_with_spectrum(
        d, d, geometric_spectrum(d, 1e8), gen)  # stored as float64: κ exactly 1e8
    low = torch.randn(48, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, d, generator=gen, dtype=torch.float64)
    w["layers.0.swiglu.w_0.weight"] = low  # rank 3 of 32 (float64, so it stays so): κ = inf
    w["layers.1.swiglu.w_1.weight"] = torch.zeros(48, d)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dec = make_run(root / "dec", SPEC, [0, 100, 200], edit=plant,
                   meta=lambda s: {"train_loss": 4.0 - s / 100, "wall_seconds": 1.5 * s,
                                   "eval": {"perplexity": {"by_domain": {"a": 30.0, "b": 20.0 + s},
                                                           "macro": 25.0 + s / 2},
                                            "blimp": {"by_uid": {"u1": 0.5}, "by_field": {},
                                                      "overall": 0.5}}})
    rel = make_run(root / "rel", SPEC, [0, 150], relora={"r": 4, "alpha": 8}, seed=3,
                   dtype=torch.bfloat16)
    return dec, rel


@pytest.fixture(scope="module")
def store(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "a.zarr"
    dec, rel = runs
    res = CliRunner().invoke(app, ["analyze", str(dec), str(rel), "--metrics", "per,cn,er",
                                   "-o", str(out), "--no-progress"])  # in-process: no spawn
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == str(out)
    return xr.open_zarr(out)


def test_store_contract(store, runs):
    ds = store
    assert list(ds.run.values) == ["dec", "rel"]
    assert list(ds.step.values) == [0, 100, 150, 200]
    assert list(ds.kind.values) == ["weights", "grads", "updates", "lora"]
    assert ds.per.dims == ("run", "kind", "step", "layer", "matrix")
    assert ds.head_per.dims == ("run", "kind", "step", "layer", "head")
    assert ds.sigma.dims == ("run", "kind", "step", "layer", "matrix", "sv")
    v = ds.per.sel(run="dec", kind="weights", step=100, layer=1, matrix="attention.v_proj")
    assert v.shape == () and np.isfinite(float(v))
    assert ds.per.attrs["long_name"] == "proportional effective rank"
    assert json.loads(ds.attrs["run_configs"])["rel"]["relora"]["r"] == 4
    assert ds.attrs["metrics"] == ["per", "cn", "er"]
    assert ds.analyzed.values.tolist() == [[1, 1, 0, 1], [1, 0, 1, 0]]
    # missing combinations are NaN
    assert np.isnan(ds.per.sel(run="dec", kind="lora").values).all()
    assert np.isnan(ds.per.sel(run="dec", kind="updates", step=0).values).all()
    assert np.isnan(ds.per.sel(run="rel", step=100).values).all()


def test_layer_matrices_equal_scipy(store, runs):
    dec, rel = runs
    for run, path, step in (("dec", dec, 100), ("rel", rel, 150)):
        w, eps = tensors(path, step), stored_eps(path, step)
        for layer in range(SPEC.n_layers):
            for matrix in ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                           "attention.o_proj", "swiglu.w_0", "swiglu.w_1", "swiglu.w_2"):
                key = f"layers.{layer}.{matrix}.weight"
                ref = ref_metrics(w[key], eps=eps[key])
                for metric in ("per", "cn", "er"):
                    got = float(store[metric].sel(run=run, kind="weights", step=step,
                                                  layer=layer, matrix=matrix))
                    assert_metric(got, ref[metric], f"{run} {layer} {matrix} {metric}")
    # the planted cases really are the edges
    sel = dict(run="dec", kind="weights", step=100, layer=0)
    assert float(store.cn.sel(**sel, matrix="attention.q_proj")) == pytest.approx(1e8, rel=1e-6)
    assert float(store.cn.sel(**sel, matrix="swiglu.w_0")) == math.inf
    assert np.isnan(float(store.cn.sel(run="dec", kind="weights", step=0, layer=1,
                                       matrix="swiglu.w_1")))


def test_grads_updates_embeddings_equal_scipy(store, runs):
    dec, _ = runs
    w1, w2, g2 = tensors(dec, 100), tensors(dec, 200), tensors(dec, 200, "grads")
    for name in ("layers.1.attention.o_proj.weight", "layers.0.swiglu.w_2.weight"):
        layer, matrix = int(name.split(".")[1]), name.split(".", 2)[2].removesuffix(".weight")
        sel = dict(run="dec", step=200, layer=layer, matrix=matrix)
        assert_metric(float(store.per.sel(kind="grads", **sel)), ref_metrics(g2[name])["per"], name)
        assert_metric(float(store.cn.sel(kind="updates", **sel)),
                      ref_metrics(w2[name] - w1[name], eps=F32_EPS,
                                  norm=math.hypot(np.linalg.norm(w2[name]),
                                                  np.linalg.norm(w1[name])))["cn"], name)
    for emb in ("embedding_proj", "de_embedding_proj"):
        ref = ref_metrics(w2[f"{emb}.weight"] - w1[f"{emb}.weight"])
        got = float(store.emb_per.sel(run="dec", kind="updates", step=200, embedding=emb))
        assert_metric(got, ref["per"], emb)


def ov_heads(w, layer):
    d, h, kv = SPEC.d_model, SPEC.n_heads, SPEC.n_kv_heads
    hd = d // h
    o = w[f"layers.{layer}.attention.o_proj.weight"]
    v = w[f"layers.{layer}.attention.v_proj.weight"]
    heads = []
    for head in range(h):
        g = head // (h // kv)
        heads.append((o[:, head * hd:(head + 1) * hd], v[g * hd:(g + 1) * hd, :]))
    return heads


def test_ov_circuits_equal_scipy(store, runs):
    dec, _ = runs
    hd, kv = SPEC.d_model // SPEC.n_heads, SPEC.n_kv_heads
    w1, w2, g2 = tensors(dec, 100), tensors(dec, 200), tensors(dec, 200, "grads")
    for layer in range(SPEC.n_layers):
        heads, prev, grads = ov_heads(w2, layer), ov_heads(w1, layer), ov_heads(g2, layer)
        sel = dict(run="dec", step=200, layer=layer)
        # whole layer: Σ_h O_h V_g(h) has rank <= n_kv·hd (GQA), so k = n_kv·hd, not d
        wholes = {
            "weights": (sum(o @ v for o, v in heads), kv * hd),
            "grads": (sum(o @ dv + do @ v for (o, v), (do, dv) in zip(heads, grads, strict=True)),
                      min(SPEC.d_model, 2 * kv * hd)),
            "updates": (sum(o @ v for o, v in heads) - sum(o @ v for o, v in prev),
                        min(SPEC.d_model, 2 * kv * hd)),
        }
        # S from the factors O_sum (Σ of each group's O_h) and v_proj, summed over the terms
        # of O·dV + dO·V (grads) and O·V − O_prev·V_prev (updates)
        def o_sum(hs):
            g = SPEC.n_heads // kv
            return np.concatenate([sum(hs[i][0] for i in range(j * g, (j + 1) * g))
                                   for j in range(kv)], axis=1)

        def v_all(hs):
            g = SPEC.n_heads // kv
            return np.concatenate([hs[j * g][1] for j in range(kv)], axis=0)

        norms = {
            "weights": product_norm(o_sum(heads), v_all(heads)),
            "grads": (product_norm(o_sum(heads), v_all(grads))
                      + product_norm(o_sum(grads), v_all(heads))),
            "updates": (product_norm(o_sum(heads), v_all(heads))
                        + product_norm(o_sum(prev), v_all(prev))),
        }
        for kind, (mat, k) in wholes.items():
            assert np.linalg.matrix_rank(mat) <= k
            ref = ref_metrics(mat, k, eps=F32_EPS, norm=norms[kind])
            for metric in ("per", "cn", "er"):
                got = float(store[metric].sel(kind=kind, matrix="ov_circuit", **sel))
                assert_metric(got, ref[metric], f"whole OV {kind} {metric}")
            n_sigma = int((~np.isnan(store.sigma.sel(kind=kind, matrix="ov_circuit", **sel)
                                     .values)).sum())
            assert n_sigma == k
        for head in range(SPEC.n_heads):
            (o, v), (po, pv), (do, dv) = heads[head], prev[head], grads[head]
            cases = {
                "weights": (o @ v, hd),
                "grads": (o @ dv + do @ v, 2 * hd),  # product rule, rank <= 2hd
                "updates": (o @ v - po @ pv, 2 * hd),
            }
            for kind, (mat, k) in cases.items():
                ref = ref_metrics(mat, k)
                for metric in ("per", "er"):
                    got = float(store[f"head_{metric}"].sel(kind=kind, head=head, **sel))
                    assert_metric(got, ref[metric], f"{kind} head {head} {metric}")
    sig = store.head_sigma.sel(run="dec", kind="weights", step=200, layer=0, head=1).values
    ref = scipy.linalg.svdvals(ov_heads(w2, 0)[1][0] @ ov_heads(w2, 0)[1][1])[:hd]
    np.testing.assert_allclose(sig[:hd], ref, rtol=1e-6)
    assert np.isnan(sig[hd:]).all()


def test_lora_products_equal_scipy(store, runs):
    _, rel = runs
    w = tensors(rel, 150)
    scale = 8 / 4
    for matrix in ("attention.q_proj", "swiglu.w_2"):
        b, a = w[f"layers.1.{matrix}.lora_B"], w[f"layers.1.{matrix}.lora_A"]
        ref = ref_metrics(scale * b @ a, k=4, eps=float(torch.finfo(torch.bfloat16).eps),
                          norm=product_norm(scale * b, a))
        sel = dict(run="rel", kind="lora", step=150, layer=1, matrix=matrix)
        for metric in ("per", "cn"):
            assert_metric(float(store[metric].sel(**sel)), ref[metric], f"lora {matrix}")
        s = store.sigma.sel(**sel).values
        np.testing.assert_allclose(s[:4], scipy.linalg.svdvals(scale * b @ a)[:4], rtol=1e-6)


def test_sigma_recomputes_every_spectral_metric(store):
    """The stored spectrum alone gives back the stored scalars."""
    s = store.sigma.sel(run="dec", kind="weights", step=200).values  # (layer, matrix, sv)
    for layer in range(2):
        for j in range(8):
            row = s[layer, j][~np.isnan(s[layer, j])]
            if row[0] == 0:
                continue
            p = row / row.sum()
            nz = p[p > 0]
            er = math.exp(-(nz * np.log(nz)).sum())
            assert float(store.er.values[0, 0, 3, layer, j]) == pytest.approx(er, rel=1e-12)


def test_training_and_eval_values_reach_the_store(store):
    assert store.train_loss.sel(run="dec").values.tolist()[:2] == [4.0, 3.0]
    assert np.isnan(store.train_loss.sel(run="rel").values).all()
    assert store.ppl.sel(run="dec", step=200, domain="b").values.item() == 220.0
    assert store.ppl_macro.sel(run="dec", step=100).values.item() == 75.0
    assert store.blimp.sel(run="dec", step=0, uid="u1").values.item() == 0.5


def test_eval_json_overrides_and_new_checkpoints_extend_the_store(tmp_path):
    run = make_run(tmp_path / "r", SPEC, [0, 10], grads=False)
    out = tmp_path / "s.zarr"
    dynlab.analyze([run], out, metrics="per", progress=False)
    (run / "checkpoints" / "step_10" / "eval.json").write_text(json.dumps(
        {"perplexity": {"by_domain": {"x": 9.0}, "macro": 9.0}}))
    make_run(tmp_path / "more", SPEC, [20], grads=False, seed=5)
    os.rename(tmp_path / "more" / "checkpoints" / "step_20", run / "checkpoints" / "step_20")
    dynlab.analyze([run], out, progress=False)  # metrics adopted from the store
    ds = dynlab.open_store(out)
    assert ds.step.values.tolist() == [0, 10, 20]
    assert ds.analyzed.values.tolist() == [[1, 1, 1]]
    assert ds.ppl.sel(step=10, domain="x").values.item() == 9.0
    w20, w10 = tensors(run, 20), tensors(run, 10)
    name = "layers.1.swiglu.w_2.weight"
    assert_metric(float(ds.per.sel(kind="updates", step=20, layer=1, matrix="swiglu.w_2")
                        .squeeze()),
                  ref_metrics(w20[name] - w10[name])["per"], "update across resume")


@pytest.mark.slow  # three analyses of two runs
def test_interrupted_analysis_resumes_to_the_same_store(runs, tmp_path):
    dec, rel = runs
    full = dynlab.analyze([dec, rel], tmp_path / "full.zarr", metrics="per,cn", progress=False)

    class Stop(Exception):
        pass

    def stop_after_two(task, seen=[]):  # noqa: B006
        seen.append(task)
        if len(seen) == 2:
            raise Stop

    part = tmp_path / "part.zarr"
    with pytest.raises(Stop):
        dynlab.analyze([dec, rel], part, metrics="per,cn", progress=False,
                       on_checkpoint=stop_after_two)
    assert int(dynlab.open_store(part).analyzed.sum()) == 2
    dynlab.analyze([dec, rel], part, progress=False)
    a, b = xr.open_zarr(full).load(), xr.open_zarr(part).load()
    xr.testing.assert_identical(a, b)


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_store(runs, tmp_path):
    """A real SIGKILL in the middle of `dynlab analyze`, then a rerun."""
    dec, rel = runs
    full = tmp_path / "full.zarr"
    dynlab.analyze([dec, rel], full, metrics="per", progress=False)
    part = tmp_path / "part.zarr"
    cmd = [str(BIN), "analyze", str(dec), str(rel), "--metrics", "per", "-o", str(part),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    marker = part / "analyzed" / "c" / "0" / "0"  # chunk (run 0, step 0) of `analyzed`
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, check=True, capture_output=True)
    xr.testing.assert_identical(xr.open_zarr(full).load(), xr.open_zarr(part).load())


# ---- bad input ------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([str(BIN), "analyze", *map(str, args), "--no-progress"],
                          capture_output=True, text=True)


def cli(*args):
    """`dynlab analyze ARGS --no-progress` in this process (typer's CliRunner): the message
    and exit status of the console path without a new Python."""
    return CliRunner().invoke(app, ["analyze", *map(str, args), "--no-progress"])


@pytest.mark.slow  # runs `dynlab analyze` as a process
def test_nan_weights_give_nan_metrics_and_a_warning(tmp_path):
    def poison(step, w, g):
        w["layers.1.attention.k_proj.weight"][0, 0] = math.inf
        w["layers.0.swiglu.w_2.weight"][3, 3] = math.nan

    run = make_run(tmp_path / "r", SPEC, [0], grads=False, edit=poison)
    with pytest.warns(RuntimeWarning, match=r"2 matrices hold NaN/Inf"):
        out = dynlab.analyze([run], tmp_path / "s.zarr", metrics="per,cn", progress=False)
    ds = dynlab.open_store(out)
    ds = ds.squeeze(["run", "step"])
    assert np.isnan(float(ds.per.sel(kind="weights", layer=1, matrix="attention.k_proj")))
    assert np.isnan(float(ds.cn.sel(kind="weights", layer=0, matrix="swiglu.w_2")))
    assert np.isfinite(float(ds.per.sel(kind="weights", layer=0, matrix="swiglu.w_0")))
    res = run_cli(run, "-o", tmp_path / "t.zarr")
    assert res.returncode == 0 and "NaN/Inf" in res.stderr


@pytest.mark.slow
def test_bad_checkpoints_give_clear_errors(tmp_path):
    run = make_run(tmp_path / "r", SPEC, [0, 5], grads=False)
    weights = run / "checkpoints" / "step_5" / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    res = run_cli(run, "-o", tmp_path / "s.zarr")  # a real process: its exit status
    assert res.returncode == 2
    assert "step_5/weights.safetensors" in res.stderr and "truncated or corrupt" in res.stderr
    weights.write_bytes(b"\x00garbage" * 10)
    res = cli(run, "-o", tmp_path / "s2.zarr")
    assert res.exit_code == 2 and "weights.safetensors" in res.stderr

    res = cli(tmp_path / "nope")
    assert res.exit_code == 2 and "no such directory" in res.stderr
    (tmp_path / "empty").mkdir()
    res = cli(tmp_path / "empty")
    assert res.exit_code == 2 and "no run.json" in res.stderr.replace("\n", " ")
    norun = make_run(tmp_path / "norun", SPEC, [0], grads=False)
    (norun / "run.json").unlink()
    with pytest.raises(CheckpointError, match="run.json"):
        dynlab.analyze([norun / "checkpoints"], tmp_path / "x.zarr")


def test_shape_contradicting_run_json(tmp_path):
    def shrink(step, w, g):
        w["layers.1.swiglu.w_1.weight"] = w["layers.1.swiglu.w_1.weight"][:40]

    run = make_run(tmp_path / "r", SPEC, [0], grads=False, edit=shrink)
    with pytest.raises(CheckpointError, match=r"layers.1.swiglu.w_1.weight has shape \(40, 32\)"):
        dynlab.analyze([run], tmp_path / "s.zarr", progress=False)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def test_store_of_another_analysis_is_refused_and_untouched(tmp_path):
    run = make_run(tmp_path / "r", SPEC, [0], grads=False)
    out = dynlab.analyze([run], tmp_path / "s.zarr", metrics="per,cn", progress=False)
    before = tree_digest(out)
    with pytest.raises(StoreError, match=r"metrics \['per', 'cn'\].*this analysis: \['er'\]"):
        dynlab.analyze([run], out, metrics="er", progress=False)
    bigger = ModelSpec(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       activation_hidden_dim=48, vocab_size=64)
    other = make_run(tmp_path / "big", bigger, [0], grads=False)
    with pytest.raises(StoreError, match="dimension sv of size 32"):
        dynlab.analyze([other], out, progress=False)
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "file.txt").write_text("not a store")
    with pytest.raises(StoreError, match="junk.zarr"):
        dynlab.analyze([run], tmp_path / "junk.zarr", progress=False)
    assert tree_digest(out) == before
    with pytest.raises(ValueError, match="unknown kind.*valid: weights, grads"):
        dynlab.analyze([run], tmp_path / "k.zarr", kinds="weights,bogus")
    with pytest.raises(ValueError, match="grads not available"):
        dynlab.analyze([run], tmp_path / "k.zarr", kinds="grads")


def test_runs_analysed_earlier_keep_their_values_when_another_run_is_added(tmp_path):
    a = make_run(tmp_path / "a", SPEC, [0, 10], grads=False,
                 meta=lambda s: {"train_loss": 1.0 + s, "eval": {"blimp": {
                     "by_uid": {"u": 0.25}, "by_field": {"f": 0.25}, "overall": 0.25}}})
    b = make_run(tmp_path / "b", SPEC, [5], grads=False, seed=2,
                 meta=lambda s: {"train_loss": 7.0})
    out = tmp_path / "s.zarr"
    dynlab.analyze([a], out, metrics="per", progress=False)
    before = dynlab.open_store(out).per.sel(run="a").load()
    dynlab.analyze([b], out, progress=False)
    ds = dynlab.open_store(out)
    assert ds.run.values.tolist() == ["a", "b"] and ds.step.values.tolist() == [0, 5, 10]
    assert ds.analyzed.values.tolist() == [[1, 0, 1], [0, 1, 0]]
    xr.testing.assert_identical(ds.per.sel(run="a", step=[0, 10]).load(), before)
    assert ds.train_loss.sel(run="a").values.tolist()[0::2] == [1.0, 11.0]
    assert ds.train_loss.sel(run="b", step=5).values.item() == 7.0
    assert ds.blimp_field.sel(run="a", step=10, field="f").values.item() == 0.25
