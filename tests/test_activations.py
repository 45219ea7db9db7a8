"""Saved activations (positions, residual stream) and their analysis into the store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import xarray as xr
from builders import tiny_train_options
from safetensors.torch import load_file

import dynlab
from dynlab.analysis import representations as R
from dynlab.analysis.activations import parse_positions, parse_targets, select_positions
from dynlab.errors import InputError

SMALL = tiny_train_options(ld_batch_size=6, threads=1)


def test_positions():
    assert select_positions("last", 3, 10, 0).tolist() == [[9], [9], [9]]
    assert select_positions("all", 2, 4, 0).tolist() == [[0, 1, 2, 3]] * 2
    a = select_positions("sample:5", 4, 12, seed=7)
    assert a.shape == (4, 5)
    assert torch.equal(a, select_positions("sample:5", 4, 12, seed=7))  # seeded
    assert not torch.equal(a, select_positions("sample:5", 4, 12, seed=8))
    for row in a.tolist():
        assert row == sorted(set(row)) and all(0 <= p < 12 for p in row)
    assert parse_positions("sample:3") == ("sample", 3)
    for bad in ("sample:0", "sample:x", "first", ""):
        with pytest.raises(InputError, match="activation-positions"):
            parse_positions(bad)
    with pytest.raises(InputError, match="sequence length"):
        select_positions("sample:13", 1, 12, 0)
    assert parse_targets("final, previous,dec@40,40") == ["final", "previous", "dec@40", "40"]
    for bad in ("last", "@4", "dec@x", ""):
        with pytest.raises(InputError, match="--target"):
            parse_targets(bad)


def test_learning_dynamics_activations_are_the_forward_values():
    from dynlab.model import ModelConfig, PicoDecoder
    from dynlab.training.dynamics import learning_dynamics

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                      activation_hidden_dim=32, vocab_size=50, max_seq_len=16)
    model = PicoDecoder(cfg)
    batch = torch.randint(0, 50, (5, 13))
    dev = torch.device("cpu")
    grads0, none, loss0 = learning_dynamics(model, batch, dev)
    assert none is None
    # chunks of 2 sequences: the positions of each chunk must follow its sequences
    grads, acts, loss = learning_dynamics(model, batch, dev, activations=True,
                                          positions="sample:3", seed=4, chunk_tokens=24)
    assert loss == pytest.approx(loss0, rel=1e-6)
    for k in grads0:
        torch.testing.assert_close(grads[k], grads0[k], rtol=1e-5, atol=1e-7)
    pos = select_positions("sample:3", 5, 12, 4)
    rows = acts["token_positions"]
    assert rows.tolist() == [[s, int(p)] for s in range(5) for p in pos[s]]
    with torch.no_grad():
        x = model.embedding_proj(batch[:, :-1])
        cos, sin = model.rope_cos[:12], model.rope_sin[:12]
        for i, block in enumerate(model.layers):
            q = block.attention.q_proj(block.attention_norm(x))
            x = block(x, cos, sin)
            torch.testing.assert_close(acts[f"layers.{i}"], x[rows[:, 0], rows[:, 1]])
            torch.testing.assert_close(acts[f"layers.{i}.attention.q_proj"],
                                       q[rows[:, 0], rows[:, 1]])
    assert acts["layers.1"].shape == (15, 16)


def ref_per(x):
    """PER of the centred activations, rank bound min(n − 1, p), with scipy."""
    xc = x - x.mean(0)
    k = min(x.shape[0] - 1, x.shape[1])
    s = scipy.linalg.svdvals(xc)[:k]
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum()) / k


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("acts")
    kw = dict(SMALL, steps=4, checkpoint_every=2, save_activations=True,
              activation_positions="sample:8")
    dec = dynlab.train("decoder", out=str(root / "dec"), **kw)
    rel = dynlab.train("relora", out=str(root / "rel"), rank=2, reset_every=3, **kw)
    return root, dec, rel


@pytest.fixture(scope="module")
def acts_store(two_runs):
    """Both runs analysed once (per, cn, alpha; targets final, previous, dec@4): the tests that
    only read a store share it, a test that grows it works on a copy."""
    root, dec, rel = two_runs
    return dynlab.analyze([dec, rel], root / "shared.zarr", metrics="per,cn,alpha",
                          progress=False, device="cpu", target="final,previous,dec@4")


def acts_of(run, step):
    return {k: v.double().numpy() for k, v in load_file(
        str(run / "checkpoints" / f"step_{step}" / "activations.safetensors")).items()}


@pytest.mark.slow
def test_store_activation_metrics(two_runs, acts_store, tmp_path):
    import shutil

    root, dec, rel = two_runs
    out = shutil.copytree(acts_store, tmp_path / "a.zarr")  # grown below
    ds = xr.open_zarr(out)
    assert list(ds.target.values) == ["final", "previous", "dec@4"]
    assert list(ds.act_site.values)[:2] == ["residual", "attention.q_proj"]
    assert ds.cka.dims == ("run", "target", "step", "layer", "act_site")
    assert ds.anisotropy.dims == ("run", "step", "layer", "act_site")
    assert ds.act_analyzed.values.tolist() == [[1, 1, 1], [1, 1, 1]]
    for run, path in (("dec", dec), ("rel", rel)):
        final = acts_of(path, 4)
        other = acts_of(dec, 4)
        for step in (0, 2, 4):
            a = acts_of(path, step)
            assert a["layers.1"].shape == (48, 16)  # 6 sequences × 8 positions
            cell = ds.sel(run=run, step=step, layer=1, act_site="residual")
            x = a["layers.1"]
            assert float(cell.anisotropy) == pytest.approx(R.anisotropy(x), rel=1e-12)
            assert float(cell.isoscore) == pytest.approx(R.isoscore(x), rel=1e-12)
            assert float(cell.act_per) == pytest.approx(ref_per(x), rel=1e-6)
            fin = cell.sel(target="final")
            assert float(fin.cka) == pytest.approx(R.linear_cka(x, final["layers.1"]), rel=1e-12)
            assert float(fin.pwcca) == pytest.approx(R.pwcca(x, final["layers.1"]), rel=1e-12)
            assert float(fin.svcca) == pytest.approx(R.svcca(x, final["layers.1"]), rel=1e-12)
            assert float(cell.sel(target="dec@4").cka_debiased) == pytest.approx(
                R.debiased_cka(x, other["layers.1"]), rel=1e-12)
            assert 0 < float(fin.pwcca) <= 1 + 1e-12
            # 48 samples, 32 features on each side: 32 + 32 > 47, so CCA is degenerate; SVCCA
            # first keeps the directions with 99 % of the variance and may be defined
            w0 = ds.sel(run=run, step=step, layer=1, act_site="swiglu.w_0", target="final")
            xw, yw = a["layers.1.swiglu.w_0"], final["layers.1.swiglu.w_0"]
            assert math.isnan(float(w0.pwcca)) and math.isnan(R.pwcca(xw, yw))
            assert float(w0.svcca) == pytest.approx(R.svcca(xw, yw), rel=1e-12, nan_ok=True)
            assert np.isfinite(float(w0.cka))
        assert float(ds.cka.sel(run=run, target="final", step=4, layer=0,
                                act_site="swiglu.w_0")) == pytest.approx(1.0, rel=1e-12)
        assert np.isnan(ds.cka.sel(run=run, target="previous", step=0).values).all()
        prev = ds.cka.sel(run=run, target="previous", step=4, layer=0, act_site="residual")
        assert float(prev) == pytest.approx(R.linear_cka(acts_of(path, 4)["layers.0"],
                                                         acts_of(path, 2)["layers.0"]), rel=1e-12)
    assert np.isfinite(ds.anisotropy.values).all()

    # a later call with another target grows the target coordinate; nothing else changes
    before = ds.cka.load()
    dynlab.analyze([dec, rel], out, progress=False, device="cpu", target="first")
    ds2 = xr.open_zarr(out)
    assert list(ds2.target.values) == ["final", "previous", "dec@4", "first"]
    xr.testing.assert_identical(ds2.cka.sel(target=["final", "previous", "dec@4"]).load(),
                                before)
    assert float(ds2.cka.sel(run="dec", target="first", step=0, layer=0,
                             act_site="residual")) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.slow
def test_target_errors(two_runs):
    root, dec, rel = two_runs
    with pytest.raises(InputError, match="nope"):
        dynlab.analyze([dec], root / "b.zarr", metrics="per", progress=False, device="cpu",
                       target="nope@4")
    with pytest.raises(InputError, match="--target"):
        dynlab.analyze([dec], root / "c.zarr", progress=False, target="last")


@pytest.mark.slow
def test_representation_figures_and_report(two_runs):
    from dynlab.viz import report as REP
    from dynlab.viz import representations as V

    root, dec, rel = two_runs
    out = dynlab.analyze([dec, rel], root / "r.zarr", metrics="per,alpha", progress=False,
                         device="cpu")
    ds = REP.open_store(out)
    fig = V.similarity_heatmap(ds, "cka", "final")
    heat = [t for t in fig.data if t.meta["role"] == "heatmap"]
    assert [t.meta["run"] for t in heat] == ["dec", "rel"]
    want = ds.cka.sel(run="rel", target="final", act_site="residual").transpose(
        "layer", "step").values
    np.testing.assert_array_equal(np.array(heat[1].z, dtype=float), want)
    assert heat[1].z[0][-1] == pytest.approx(1.0)  # the final step against itself
    fig = V.anisotropy_over_steps(ds)
    series = [t for t in fig.data if t.meta["role"] == "series"]
    assert len(series) == 4  # 2 layers × 2 runs
    np.testing.assert_allclose(series[0].y, ds.anisotropy.sel(
        run="dec", layer=0, act_site="residual").values)
    fig = V.qk_beside_ov(ds)
    means = [t for t in fig.data if t.meta["role"] == "mean"]
    qk = ds.qk_per.sel(run="dec", kind="weights").mean("layer").values
    np.testing.assert_allclose(means[0].y, qk, rtol=1e-12)
    fig = V.alpha_over_steps(ds)
    # attention.v_proj is 8 × 16 here: 8 eigenvalues, too few for the fit; said, not blank
    assert fig.layout.meta["notes"] == ["attention.v_proj: no finite α (the fit needs at "
                                        "least 10 non-zero eigenvalues)"]
    text, sections = REP.build_report(ds)
    titles = [s.title for s in sections]
    assert "Representations: CKA against the final checkpoint" in titles
    assert "QK circuit beside OV circuit" in titles and "Heavy-tail α" in titles
    # + two heavy-tail figures (dynlab.viz.heavytail): over steps and the flags table; the ESD
    # figure needs alpha_n_tail or the MP fit, which `-m per,alpha` did not compute
    assert len(sections) == 7 + 5 + 2
    assert "Heavy tails: ESD of the weights" not in titles
    assert all(s.figure is not None for s in sections[7:])
    assert "Representations: anisotropy" in text
    # a figure asked for something the store lacks says so instead of failing
    note = V.similarity_heatmap(ds, "cka", "previous").layout.meta["notes"]
    assert note == ["target 'previous' not in store"]


@pytest.mark.slow
def test_export_activation_metrics(acts_store, tmp_path):
    import json

    from dynlab.analysis.export import export

    store = acts_store
    export(store, tmp_path / "pico", run="rel")
    step = tmp_path / "pico" / "step_2"
    ds = xr.open_zarr(store).sel(run="rel", step=2)
    cka = json.loads((step / "cka_val.json").read_text())
    assert cka["layers.1.residual.activations"] == float(
        ds.cka.sel(target="final", layer=1, act_site="residual"))
    assert cka["layers.0.swiglu.w_2.activations"] == float(
        ds.cka.sel(target="final", layer=0, act_site="swiglu.w_2"))
    other = json.loads((step / "cka_vs_dec@4_val.json").read_text())
    assert other["layers.0.residual.activations"] == float(
        ds.cka.sel(target="dec@4", layer=0, act_site="residual"))
    aniso = json.loads((step / "anisotropy_val.json").read_text())
    assert len(aniso) == 2 * 8
    # pico-analyze's files: one per metric, every data type in it
    per = json.loads((step / "per_val.json").read_text())
    assert per["layers.1.residual.activations"] == float(
        ds.act_per.sel(layer=1, act_site="residual"))
    assert per["layers.1.attention.v_proj.weights"] == float(
        ds.per.sel(kind="weights", layer=1, matrix="attention.v_proj"))
    assert not (step / "per_activations_val.json").exists()


@pytest.mark.slow
def test_activations_computed_at_analysis_time(two_runs, tmp_path):
    from dynlab.analysis.activations import data_batch, forward_activations
    from dynlab.analysis.store import StoreError
    from dynlab.model import load_checkpoint_model
    from dynlab.runs.checkpoints import find_runs

    root, dec, rel = two_runs
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(["the dog near the trees sleeps ."] * 40
                                + ["these cats saw themselves ."] * 40))
    store = dynlab.analyze([dec], tmp_path / "c.zarr", metrics="per", progress=False,
                           device="cpu", activations_data=str(text), activations_batch=4,
                           activation_positions="sample:8", target="final")
    ds = xr.open_zarr(store)
    assert ds.attrs["activations_source"].startswith("computed: ")
    run = find_runs([dec])[0]
    batch = data_batch(run, str(text), 4)
    assert batch.shape == (4, 17)  # the run's seq_len 16
    model = load_checkpoint_model(dec / "checkpoints" / "step_2")
    acts = forward_activations(model, batch, "sample:8")
    x = acts["layers.0"].double().numpy()
    assert x.shape == (32, 16)
    cell = ds.sel(run="dec", step=2, layer=0, act_site="residual")
    assert float(cell.anisotropy) == pytest.approx(R.anisotropy(x), rel=1e-12)
    final = forward_activations(load_checkpoint_model(dec / "checkpoints" / "step_4"), batch,
                                "sample:8")["layers.0"].double().numpy()
    assert float(cell.cka.sel(target="final")) == pytest.approx(R.linear_cka(x, final),
                                                                rel=1e-12)
    # computed activations are the model's own forward values (the residual stream)
    with torch.no_grad():
        h = model.embedding_proj(batch[:, :-1])
        h = model.layers[0](h, model.rope_cos[:16], model.rope_sin[:16])
    pos = acts["token_positions"]
    torch.testing.assert_close(acts["layers.0"], h[pos[:, 0], pos[:, 1]])
    # one source per store
    with pytest.raises(StoreError, match="activations_source|come from"):
        dynlab.analyze([dec], store, progress=False, device="cpu")
    with pytest.raises(InputError, match="activations-data"):
        dynlab.analyze([dec], tmp_path / "d.zarr", progress=False, device="cpu",
                       activations_data=str(tmp_path / "missing.csv"))


@pytest.mark.slow
def test_recompute_activation_metrics(two_runs, acts_store, tmp_path):
    from dynlab.analysis.recompute import recompute

    root, dec, rel = two_runs
    part = dynlab.analyze([dec], tmp_path / "p.zarr", metrics="per", progress=False,
                          device="cpu")
    assert "act_cn" in recompute(part, "cn,alpha")
    a, b = xr.open_zarr(acts_store).sel(run=["dec"]), xr.open_zarr(part)  # full: per,cn,alpha
    for name in ("act_cn", "act_alpha", "act_per"):
        xr.testing.assert_identical(a[name].load(), b[name].load())
    assert np.isfinite(b.act_cn.sel(act_site="residual").values).all()


@pytest.mark.slow
def test_pico_convention_cka_pwcca(two_runs, tmp_path):
    """Under --convention pico, `cka` and `pwcca` are pico-analyze's (checked against the
    written-out transcription of its formulas); the indices it lacks stay dynlab's."""
    from test_representations import pico_reference_cka, pico_reference_pwcca

    root, dec, rel = two_runs
    out = dynlab.analyze([dec], tmp_path / "pico.zarr", metrics="per", progress=False,
                         device="cpu", convention="pico")
    ds = xr.open_zarr(out)
    assert ds.attrs["convention"] == "pico"
    assert "pico-analyze" in ds.cka.attrs["long_name"]
    final = acts_of(dec, 4)
    for step in (0, 2):
        a = acts_of(dec, step)
        for site, key in (("residual", "layers.1"), ("swiglu.w_0", "layers.1.swiglu.w_0")):
            x, y = a[key], final[key]
            cell = ds.sel(run="dec", step=step, layer=1, act_site=site, target="final")
            assert float(cell.cka) == pytest.approx(pico_reference_cka(x, y), rel=2e-6)
            assert float(cell.cka_debiased) == pytest.approx(R.debiased_cka(x, y), rel=1e-12,
                                                             nan_ok=True)
            assert float(cell.svcca) == pytest.approx(R.svcca(x, y), rel=1e-12, nan_ok=True)
            assert float(cell.pwcca) == pytest.approx(pico_reference_pwcca(x, y), rel=1e-9,
                                                      nan_ok=True)
        # residual stream: 48 samples, 16 features, a defined CCA. swiglu.w_0: 32 + 32
        # features > 47, the whitened covariance's square root holds NaN in pico-analyze's
        # arithmetic (it then retries on random noise): NaN here
        cell = ds.sel(run="dec", step=step, layer=1, target="final")
        assert 0 < float(cell.pwcca.sel(act_site="residual")) <= 1
        assert math.isnan(float(cell.pwcca.sel(act_site="swiglu.w_0")))


def test_heatmap_colour_range():
    from dynlab.viz.representations import colour_range

    assert colour_range(np.array([0.93, 0.99, np.nan, 1.0])) == (0.9, 1.0)
    assert colour_range(np.array([0.999, 1.0])) == pytest.approx((0.9, 1.0))  # span ≥ 0.1
    assert colour_range(np.array([-0.12, 0.5])) == (-0.15, 1.0)  # debiased CKA can be < 0
    assert colour_range(np.array([np.nan])) == (0.0, 1.0)
