"""The QK circuit (per head and whole layer) of weights, gradients and updates against dense
float64 SVDs of the products written out, and its place in the store (old stores extended)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import xarray as xr
from builders import TINY_SPEC_ARGS

import dynlab
from dynlab.analysis import components as C
from dynlab.analysis.task import component_spectra
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run, random_weights

SPEC = ModelSpec(**TINY_SPEC_ARGS)


def tensors(seed):
    return random_weights(SPEC, torch.Generator().manual_seed(seed), dtype=torch.float64,
                          scale=0.2)


def dense_qk(q, k, head=None):
    """Q_hᵀ·K_g(h) (or the sum over heads) written out with numpy slices."""
    hd, group = SPEC.head_dim, SPEC.n_heads // SPEC.n_kv_heads
    q, k = np.asarray(q), np.asarray(k)
    heads = range(SPEC.n_heads) if head is None else [head]
    out = np.zeros((SPEC.d_model, SPEC.d_model))
    for h in heads:
        g = h // group
        out += q[h * hd:(h + 1) * hd].T @ k[g * hd:(g + 1) * hd]
    return out


def svals(x, k):
    s = scipy.linalg.svdvals(x)
    return s[:k]


def check(spectra, layer, reference):
    """reference(layer, head or None) -> dense matrix; compares every QK site of a layer."""
    for site, s in spectra.items():
        if site.table == "qk" and site.index == (layer,):
            ref = reference(layer, None)
        elif site.table == "qk_head" and site.index[0] == layer:
            ref = reference(layer, site.index[1])
        else:
            continue
        np.testing.assert_allclose(s.numpy(), svals(ref, s.shape[0]), rtol=1e-6,
                                   atol=1e-12 * svals(ref, 1)[0])


def q_k(w, layer):
    return (w[f"layers.{layer}.attention.q_proj.weight"].numpy(),
            w[f"layers.{layer}.attention.k_proj.weight"].numpy())


def test_qk_weights_grads_updates_equal_dense_svd():
    w, g, prev = tensors(0), tensors(1), tensors(2)
    hd = SPEC.head_dim
    comps = C.weight_components(w, SPEC)
    qk_sites = [s for s in comps if s.table.startswith("qk")]
    assert len(qk_sites) == SPEC.n_layers * (1 + SPEC.n_heads)
    assert comps[C.Site("qk_head", (0, 1))].rank_bound == hd
    assert comps[C.Site("qk", (0,))].rank_bound == SPEC.n_kv_heads * hd
    spectra = component_spectra(comps)
    grads = component_spectra(C.grad_components(g, w, SPEC))
    updates = component_spectra(C.update_components(w, prev, SPEC))
    assert grads[C.Site("qk_head", (1, 3))].shape == (2 * hd,)
    for layer in range(SPEC.n_layers):
        check(spectra, layer, lambda i, h: dense_qk(*q_k(w, i), h))
        check(grads, layer, lambda i, h: dense_qk(q_k(w, i)[0], q_k(g, i)[1], h)
              + dense_qk(q_k(g, i)[0], q_k(w, i)[1], h))
        check(updates, layer, lambda i, h: dense_qk(*q_k(w, i), h) - dense_qk(*q_k(prev, i), h))


def test_qk_is_the_attention_score_at_offset_zero():
    """x_iᵀ·QK_h·x_j equals head h's q·k of the model's own projections when RoPE does not
    rotate (the same position)."""
    from dynlab.model import ModelConfig, PicoDecoder

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      activation_hidden_dim=48, vocab_size=16, max_seq_len=8)
    model = PicoDecoder(cfg).double()
    att = model.layers[0].attention
    x = torch.randn(2, 32, dtype=torch.float64)
    with torch.no_grad():
        q = att.q_proj(x).reshape(2, 4, 8)
        k = att.k_proj(x).reshape(2, 2, 8).repeat_interleave(2, dim=1)
    w = {f"layers.0.attention.{n}_proj.weight": getattr(att, f"{n}_proj").weight.detach()
         for n in ("q", "k")}
    for h in range(4):
        qk = dense_qk(w["layers.0.attention.q_proj.weight"],
                      w["layers.0.attention.k_proj.weight"], h)
        assert float(x[0] @ torch.from_numpy(qk) @ x[1]) == pytest.approx(
            float(q[0, h] @ k[1, h]), rel=1e-10)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("qk") / "dec", SPEC, [0, 10, 20])


def test_store_has_qk_and_matches(run_dir, tmp_path):
    out = dynlab.analyze([run_dir], tmp_path / "a.zarr", metrics="per,alpha", progress=False,
                         device="cpu")
    ds = xr.open_zarr(out).isel(run=0)
    assert ds.qk_per.dims == ("kind", "step", "layer")
    assert ds.qk_head_per.dims == ("kind", "step", "layer", "head")
    assert ds.qk_head_sigma.dims[-1] == "head_sv"
    assert ds.qk_per.attrs["long_name"] == "proportional effective rank"
    from safetensors.torch import load_file

    w = {k: v.double() for k, v in load_file(
        str(run_dir / "checkpoints/step_10/weights.safetensors")).items()}
    s = svals(dense_qk(*q_k(w, 1), 2), SPEC.head_dim)
    p = s / s.sum()
    ref = math.exp(-(p * np.log(p)).sum()) / SPEC.head_dim
    got = float(ds.qk_head_per.sel(kind="weights", step=10, layer=1, head=2))
    assert got == pytest.approx(ref, rel=1e-6)
    # α of the layer matrices comes from the same stored spectra
    from dynlab.analysis.heavytail import fit_spectrum

    sig = ds.sigma.sel(kind="weights", step=10, layer=0, matrix="swiglu.w_0").values
    fit = fit_spectrum(sig, 48)
    assert float(ds.alpha.sel(kind="weights", step=10, layer=0, matrix="swiglu.w_0")) == (
        pytest.approx(fit.alpha, rel=1e-12))


def test_store_made_before_qk_is_extended(run_dir, tmp_path):
    """A store without the QK variables (as written by an earlier dynlab) gets them on the
    next analyze: earlier checkpoints keep NaN there, new ones are filled, nothing else moves."""
    import shutil

    import zarr

    from dynlab.analysis.store import quiet_zarr

    first = tmp_path / "first"
    (first / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "run.json", first / "run.json")
    for step in (0, 10):
        shutil.copytree(run_dir / f"checkpoints/step_{step}", first / f"checkpoints/step_{step}")
    store = dynlab.analyze([first], tmp_path / "s.zarr", metrics="per", progress=False,
                           device="cpu")
    with quiet_zarr():
        group = zarr.open_group(str(store), mode="r+")
        for name in [n for n in group.array_keys() if n.startswith("qk")]:
            del group[name]
        zarr.consolidate_metadata(str(store))
    before = xr.open_zarr(store).per.load()
    assert "qk_per" not in xr.open_zarr(store)
    shutil.copytree(run_dir / "checkpoints/step_20", first / "checkpoints/step_20")
    dynlab.analyze([first], store, progress=False, device="cpu")
    ds = xr.open_zarr(store)
    assert np.isnan(ds.qk_per.sel(step=[0, 10]).values).all()
    assert np.isfinite(ds.qk_per.sel(kind="weights", step=20).values).all()
    xr.testing.assert_identical(ds.per.sel(step=[0, 10]).load(), before)
