"""`--convention pico`: pico-analyze's OV matrices and condition number, against hand-computed
V·O products and concatenations (numpy/scipy float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import xarray as xr
from builders import TINY_SPEC_ARGS
from safetensors.torch import load_file

import dynlab
from dynlab.analysis.conventions import condition_number_pico
from dynlab.analysis.metrics import max_abs_entry
from dynlab.analysis.store import StoreError
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run

SPEC = ModelSpec(**TINY_SPEC_ARGS)
HD, GROUP = 8, 2


def per(s, k):
    s = s[:k]
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum()) / k


def load(run, step, what):
    return {k: v.double().numpy() for k, v in load_file(
        str(run / "checkpoints" / f"step_{step}" / f"{what}.safetensors")).items()}


def o_v(t, layer):
    return (t[f"layers.{layer}.attention.o_proj.weight"],
            t[f"layers.{layer}.attention.v_proj.weight"])


def head_vo(o, v, h):
    g = h // GROUP
    return v[g * HD:(g + 1) * HD] @ o[:, h * HD:(h + 1) * HD]  # V_g · O_h, hd × hd


def head_grad(o, v, do, dv, h):
    g = h // GROUP
    oh, vg = o[:, h * HD:(h + 1) * HD], v[g * HD:(g + 1) * HD]
    doh, dvg = do[:, h * HD:(h + 1) * HD], dv[g * HD:(g + 1) * HD]
    return oh @ dvg + doh @ vg  # d × d


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    run = make_run(root / "dec", SPEC, [0, 10])
    pico = dynlab.analyze([run], root / "pico.zarr", metrics="per,cn,numerical_rank,inf_norm",
                          convention="pico", progress=False, device="cpu")
    return run, root, pico


def test_pico_ov_equals_hand_computed(stores):
    run, _, pico = stores
    ds = xr.open_zarr(pico).sel(run="dec", step=10)
    assert ds.attrs["convention"] == "pico"
    w, g, prev = load(run, 10, "weights"), load(run, 10, "grads"), load(run, 0, "weights")
    for layer in range(2):
        o, v = o_v(w, layer)
        do, dv = o_v(g, layer)
        po, pv = o_v(prev, layer)
        heads = [head_vo(o, v, h) for h in range(4)]
        whole = np.concatenate(heads, axis=1)  # hd × 4·hd
        assert whole.shape == (HD, 4 * HD)
        s = scipy.linalg.svdvals(whole)
        cell = ds.sel(kind="weights", layer=layer, matrix="ov_circuit")
        np.testing.assert_allclose(cell.sigma.values[:HD], s, rtol=1e-6)
        assert np.isnan(cell.sigma.values[HD:]).all()
        assert float(cell.per) == pytest.approx(per(s, HD), rel=1e-6)
        assert float(cell.cn) == pytest.approx(s[0] / s[-1], rel=1e-6)
        for h in range(4):
            s = scipy.linalg.svdvals(heads[h])
            hc = ds.sel(kind="weights", layer=layer, head=h)
            assert float(hc.head_per) == pytest.approx(per(s, HD), rel=1e-6)
            assert float(hc.head_cn) == pytest.approx(s[0] / s[-1], rel=1e-6)
            # gradients: the dense d × d product, PER normalised by d, CN over all d values
            gm = head_grad(o, v, do, dv, h)
            s = scipy.linalg.svdvals(gm)
            gc = ds.sel(kind="grads", layer=layer, head=h)
            assert float(gc.head_per) == pytest.approx(per(s, 32), rel=1e-6)
            # rank 2·hd = 16 of 32: computed from the product's factors, σ_17..σ_32 are exact
            # zeros and κ is +inf; the dense SVD gives rounding noise there (κ > 1e12)
            np.testing.assert_allclose(gc.head_sigma.values[:16], s[:16], rtol=1e-6)
            assert (gc.head_sigma.values[16:] == 0).all()
            assert float(gc.head_cn) == math.inf and s[0] / s[-1] > 1e12
            assert float(gc.head_inf_norm) == pytest.approx(np.abs(gm).max(), rel=1e-12)
            # updates: the weights' convention at both steps
            um = heads[h] - head_vo(po, pv, h)
            uc = ds.sel(kind="updates", layer=layer, head=h)
            assert float(uc.head_per) == pytest.approx(per(scipy.linalg.svdvals(um), HD),
                                                       rel=1e-6)
        gwhole = np.concatenate([head_grad(o, v, do, dv, h) for h in range(4)], axis=1)
        s = scipy.linalg.svdvals(gwhole)
        assert float(ds.per.sel(kind="grads", layer=layer, matrix="ov_circuit")) == (
            pytest.approx(per(s, 32), rel=1e-6))
    # plain matrices are as in the default convention
    q = w["layers.1.attention.q_proj.weight"]
    assert float(ds.per.sel(kind="weights", layer=1, matrix="attention.q_proj")) == (
        pytest.approx(per(scipy.linalg.svdvals(q), 32), rel=1e-6))
    assert float(ds.inf_norm.sel(kind="weights", layer=1, matrix="attention.q_proj")) == (
        np.abs(q).max())


def test_pico_cn_and_inf_norm_functions():
    s = torch.tensor([[4.0, 2.0, 1e-20], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                      [2.0, 1.0, math.nan]], dtype=torch.float64)
    got = condition_number_pico(s)
    assert got[0] == pytest.approx(4e20)  # no tolerance: a tiny σ_min counts
    assert got[1] == math.inf and math.isnan(got[2]) and got[3] == 2.0
    x = torch.tensor([[[1.0, -7.0], [3.0, 2.0]], [[0.0, math.nan], [1.0, 1.0]]])
    out = max_abs_entry(x)
    assert out[0] == 7.0 and math.isnan(out[1])


def test_store_keeps_one_convention_and_recompute_follows_it(stores, tmp_path):
    import shutil

    from dynlab.analysis.recompute import recompute

    run, root, pico = stores
    with pytest.raises(StoreError, match="convention 'pico'"):
        dynlab.analyze([run], pico, progress=False, device="cpu")
    with pytest.raises(ValueError, match="--convention"):
        dynlab.analyze([run], tmp_path / "x.zarr", convention="other", progress=False)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(pico, copy)
    before = xr.open_zarr(pico)
    recompute(copy, "cn,numerical_rank,per")
    after = xr.open_zarr(copy)
    for prefix in ("", "head_", "qk_"):
        for m in ("cn", "numerical_rank", "per"):
            xr.testing.assert_identical(after[prefix + m].load(), before[prefix + m].load())


# ----------------------------------------------------------------------------------------
# pico-train runs: both gradient splits (val_gradients -> grads, train_gradients ->
# train_grads) against a numpy transcription of pico-analyze's OV component and metrics.


def pico_analyze_ov_gradients(dv, do, v, o, n_heads, n_kv_heads):
    """pico-analyze's OVComponent.compute_ov_gradients, transcribed: per head
    O_h·dV_g + dO_h·V_g, and the heads concatenated along columns."""
    hd = o.shape[0] // n_heads
    heads = []
    for h in range(n_heads):
        g = h // (n_heads // n_kv_heads)
        heads.append(o[:, h * hd:(h + 1) * hd] @ dv[g * hd:(g + 1) * hd, :]
                     + do[:, h * hd:(h + 1) * hd] @ v[g * hd:(g + 1) * hd, :])
    return heads, np.concatenate(heads, axis=1)


def pico_analyze_metrics(x):
    """pico-analyze's per, condition_number, norm (frobenius, nuclear, inf), hoyer and gini
    of one matrix, transcribed into numpy float64."""
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    flat = np.abs(x.ravel())
    n = flat.size
    srt = np.sort(flat)
    idx = np.arange(1, n + 1)
    return {"per": math.exp(-np.sum(p * np.log(p))) / len(s), "cn": s.max() / s.min(),
            "frobenius_norm": math.sqrt(np.sum(x * x)), "nuclear_norm": s.sum(),
            "inf_norm": flat.max(),
            "hoyer": (math.sqrt(n) - flat.sum() / math.sqrt(np.sum(x * x))) / (math.sqrt(n) - 1),
            "gini": np.sum((2 * idx - n - 1) * srt) / (n * srt.sum())}


PICO_METRICS = "per,cn,frobenius_norm,nuclear_norm,inf_norm,hoyer,gini"


@pytest.fixture(scope="module")
def pico_train_store(tmp_path_factory):
    from test_sources_pico import write_pico_run

    root = tmp_path_factory.mktemp("pico-conv") / "pico-run"
    written = write_pico_run(root)
    store = dynlab.analyze([root], root.parent / "p.zarr", metrics=PICO_METRICS,
                           convention="pico", progress=False, device="cpu")
    return written, xr.open_zarr(store)


@pytest.mark.parametrize("split,kind", [("val", "grads"), ("train", "train_grads")])
def test_pico_train_gradient_splits_match_pico_analyze(pico_train_store, split, kind):
    from test_sources_pico import SPEC as PSPEC

    written, ds = pico_train_store
    steps = [s for s in written if f"{split}_grads" in written[s]]
    assert steps and kind in ds.kind.values
    prefix = "_forward_module."
    for step in steps:
        w = {k: v.double().numpy() for k, v in written[step]["weights"].items()}
        g = {k: v.double().numpy() for k, v in written[step][f"{split}_grads"].items()}
        for layer in range(PSPEC.n_layers):
            base = f"layers.{layer}.attention."
            heads, whole = pico_analyze_ov_gradients(
                g[f"{prefix}{base}v_proj"], g[f"{prefix}{base}o_proj"],
                w[f"{base}v_proj.weight"], w[f"{base}o_proj.weight"],
                PSPEC.n_heads, PSPEC.n_kv_heads)
            assert whole.shape == (PSPEC.d_model, PSPEC.n_heads * PSPEC.d_model)
            cell = ds.sel(run="pico-run", step=step, kind=kind, layer=layer)
            ref = pico_analyze_metrics(whole)
            for m, value in ref.items():
                got = float(cell[m].sel(matrix="ov_circuit"))
                assert got == pytest.approx(value, rel=1e-6), (kind, step, layer, m)
            for h, hm in enumerate(heads):
                ref = pico_analyze_metrics(hm)
                hc = cell.sel(head=h)
                for m, value in ref.items():
                    got = float(hc["head_" + m])
                    if m == "cn":  # rank 2·hd of d: exactly singular (σ_min is rounding
                        # noise in pico-analyze's SVD of the dense matrix)
                        assert got == math.inf and value > 1e10
                    else:
                        assert got == pytest.approx(value, rel=1e-6), (kind, step, layer, h, m)
