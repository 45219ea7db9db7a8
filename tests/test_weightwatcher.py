"""WeightWatcher's heavy-tailed self-regularisation family (dynlab.analysis.heavytail):
hand-computed norms, the Marchenko–Pastur fit on matrices of known spectra (pure noise, a
planted rank-r signal above the BBP threshold), the seeded randomised ESD, the metrics
through a real analysis store and `recompute`, and, in the slow lane, every metric against
weightwatcher's own `analyze()` rows."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import xarray as xr
from builders import TINY_SPEC_ARGS
from safetensors.torch import load_file

import dynlab
from dynlab.analysis import heavytail as H
from dynlab.analysis.metrics import DEFAULT_METRICS, METRICS, parse_metrics
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run, matrix_with_spectrum

SPEC = ModelSpec(**TINY_SPEC_ARGS)
WW_SPECTRAL = ("log_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "mp_sigma",
               "mp_sigma2", "mp_bulk_max", "num_spikes", "mp_softrank", "over_trained",
               "under_trained")
WW_RAND = ("rand_distance", "max_rand_eval", "num_rand_spikes")


def gaussian(n, m, var, seed):
    return np.random.default_rng(seed).standard_normal((n, m)) * math.sqrt(var)


def evals(w):
    return np.sort(scipy.linalg.svdvals(np.asarray(w, dtype=np.float64)) ** 2)


def test_norms_and_flags_hand_computed():
    lam = np.array([0.0, 0.5, 1.0, 4.0, 10.0])
    assert H.log_norm(lam) == pytest.approx(math.log10(15.5), rel=1e-14)
    assert H.log_spectral_norm(lam) == pytest.approx(1.0, rel=1e-14)
    assert H.alpha_weighted(2.5, lam) == pytest.approx(2.5, rel=1e-14)
    assert H.log_alpha_norm(2.0, lam) == pytest.approx(math.log10(0.25 + 1 + 16 + 100),
                                                       rel=1e-14)
    over, under = H.trained_flags(np.array([1.5, 2.0, 4.0, 6.0, 6.5, math.nan]))
    np.testing.assert_array_equal(over[:5], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(under[:5], [0, 0, 0, 0, 1])
    assert math.isnan(over[5]) and math.isnan(under[5])


def test_linear_kde_integrates_to_one_and_matches_a_triangle():
    data = np.array([1.0, 1.0, 2.0])
    x = np.linspace(0, 3, 3001)
    y = H.linear_kde(x, data, 0.1)
    assert np.trapezoid(y, x) == pytest.approx(1.0, rel=1e-6)
    # at a data point of weight 2/3 the triangle peaks at (2/3)/h
    assert y[1000] == pytest.approx((2 / 3) / 0.1, rel=1e-12)
    assert y[1050] == pytest.approx((2 / 3) * 0.5 / 0.1, rel=1e-9)


@pytest.mark.parametrize("n,m", [(600, 300), (400, 400)])
def test_mp_fit_of_pure_noise_has_no_spikes_and_its_variance(n, m):
    var = 0.04
    w = gaussian(n, m, var, seed=n + m)
    fit = H.mp_fit(evals(w), n, m)
    assert fit.num_spikes == 0
    assert fit.sigma2 == pytest.approx(var, rel=0.01)  # the truth
    assert fit.sigma2 == pytest.approx(np.mean(w * w), rel=1e-10)  # = the sample variance
    assert fit.sigma == pytest.approx(1.0, abs=0.02)  # the rescaled ESD's σ
    assert 0.9 < fit.softrank < 1.1  # noise: λ_max at the bulk edge


@pytest.mark.parametrize("n,m,r", [(400, 200, 3), (300, 100, 5), (256, 256, 2)])
def test_mp_fit_counts_a_planted_signal_above_bbp(n, m, r):
    """W = X + Σ θ_i u_i v_iᵀ with unit-variance noise X: a signal singular value
    θ > (n·m)^(1/4) (the BBP threshold, Benaych-Georges & Nadakuditi 2012) leaves the bulk."""
    rng = np.random.default_rng(r)
    x = rng.standard_normal((n, m))
    u, _ = np.linalg.qr(rng.standard_normal((n, r)))
    v, _ = np.linalg.qr(rng.standard_normal((m, r)))
    theta = 3 * (n * m) ** 0.25 * np.linspace(1, 2, r)
    fit = H.mp_fit(evals(x + (u * theta) @ v.T), n, m)
    assert fit.num_spikes == r
    assert fit.sigma2 == pytest.approx(1.0, rel=0.03)
    # below the threshold the same construction leaves no spike
    weak = H.mp_fit(evals(x + (u * 0.3 * (n * m) ** 0.25) @ v.T), n, m)
    assert weak.num_spikes == 0


def test_mp_fit_edges():
    assert math.isnan(H.mp_fit(np.zeros(5), 10, 5).sigma)
    assert math.isnan(H.mp_fit(np.array([2.0]), 10, 1).num_spikes)
    # a huge condition number: still a fit, the largest eigenvalue a spike
    lam = np.concatenate([np.full(50, 1.0), [1e12]])
    fit = H.mp_fit(lam, 102, 51)
    assert fit.num_spikes >= 1 and math.isfinite(fit.sigma)


def test_randomised_esd_is_seeded_and_compares_shuffles():
    w = gaussian(40, 30, 1.0, seed=3).astype(np.float32)
    a, b = H.randomised_esd(w, seed=7), H.randomised_esd(w, seed=7)
    assert a == b
    assert H.randomised_esd(w, seed=8) != a
    # by hand: RandomState(7) shuffles the row-major entries 5 times (30 < 100), then once more
    rng = np.random.RandomState(7)
    reps = []
    for _ in range(6):
        flat = w.astype(np.float64).ravel()
        rng.shuffle(flat)
        reps.append(evals(flat.reshape(w.shape)))
    lam = evals(w)
    p, q = lam / lam.sum(), reps[5] / reps[5].sum()
    js = math.sqrt((scipy.stats.entropy(p, (p + q) / 2) + scipy.stats.entropy(q, (p + q) / 2)) / 2)
    assert a.rand_distance == pytest.approx(js, rel=1e-12)
    assert a.max_rand_eval == pytest.approx(max(r.max() for r in reps[:5]), rel=1e-12)
    assert a.num_rand_spikes == H.mp_fit(np.sort(np.concatenate(reps[:5])), 40, 30).num_spikes
    # a shuffled matrix of the same entries: the same eigenvalue mass
    assert sum(r.sum() for r in reps[:5]) == pytest.approx(5 * lam.sum(), rel=1e-10)


def test_randomised_esd_edges():
    assert math.isnan(H.randomised_esd(np.zeros((4, 6))).rand_distance)
    bad = np.ones((4, 6))
    bad[1, 2] = math.nan
    assert math.isnan(H.randomised_esd(bad).max_rand_eval)
    row = H.randomised_esd(np.arange(1.0, 7.0).reshape(1, 6))  # 1 × n: one eigenvalue
    assert row.rand_distance == 0.0 and row.max_rand_eval == pytest.approx(91.0)
    bf = torch.randn(20, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = H.randomised_batch(bf[None])
    want = H.randomised_esd(bf.double().numpy())
    np.testing.assert_allclose(got[0], [want.rand_distance, want.max_rand_eval,
                                        want.num_rand_spikes], rtol=1e-12)


def test_registry_defaults_and_opt_in():
    for name in WW_SPECTRAL:
        assert METRICS[name].from_spectrum is not None and name in DEFAULT_METRICS
    for name in WW_RAND:
        assert METRICS[name].entrywise and name not in DEFAULT_METRICS
        assert name in parse_metrics("all")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ww")
    tail = torch.tensor(np.random.default_rng(5).pareto(1.5, 32) + 1.0).sort(descending=True)

    def plant(step, w, g):  # a heavy-tailed q_proj in layer 1
        w["layers.1.attention.q_proj.weight"] = 0.05 * matrix_with_spectrum(
            32, 32, tail.values, torch.Generator().manual_seed(step)).float()

    run = make_run(root / "dec", SPEC, [0, 10], edit=plant)
    metrics = "alpha," + ",".join(WW_SPECTRAL + WW_RAND)
    path = dynlab.analyze([run], root / "a.zarr", metrics=metrics, progress=False, device="cpu")
    return run, root, path


def test_store_values_equal_the_functions_on_numpy_spectra(store):
    run, _, path = store
    ds = xr.open_zarr(path).sel(run="dec", step=10)
    assert ds.attrs["rand_seed"] == H.RAND_SEED
    w = load_file(str(run / "checkpoints" / "step_10" / "weights.safetensors"))
    for layer, name in [(0, "swiglu.w_2"), (1, "attention.q_proj"), (0, "attention.k_proj")]:
        mat = w[f"layers.{layer}.{name}.weight"].double().numpy()
        lam = evals(mat)
        cell = ds.sel(kind="weights", layer=layer, matrix=name)
        a = float(cell.alpha)
        n, m = max(mat.shape), min(mat.shape)
        mp = H.mp_fit(lam, n, m)
        rnd = H.randomised_esd(mat, H.RAND_SEED)
        want = {"log_norm": math.log10(lam.sum()), "log_spectral_norm": math.log10(lam.max()),
                "alpha_weighted": a * math.log10(lam.max()),
                "log_alpha_norm": math.log10(np.sum(lam ** a)), "mp_sigma": mp.sigma,
                "mp_sigma2": mp.sigma2, "mp_bulk_max": mp.bulk_max,
                "num_spikes": mp.num_spikes, "mp_softrank": mp.softrank,
                "over_trained": float(a < 2), "under_trained": float(a > 6),
                "rand_distance": rnd.rand_distance, "max_rand_eval": rnd.max_rand_eval,
                "num_rand_spikes": rnd.num_rand_spikes}
        for k, v in want.items():
            assert float(cell[k]) == pytest.approx(v, rel=1e-6, abs=1e-12), (name, k)
    # the planted heavy tail: a small α, flagged over-trained
    assert float(ds.alpha.sel(kind="weights", layer=1, matrix="attention.q_proj")) < 2
    assert float(ds.over_trained.sel(kind="weights", layer=1, matrix="attention.q_proj")) == 1
    # every kind and table holds them (grads, updates, circuits, heads)
    for var in ("num_spikes", "head_num_spikes", "qk_num_spikes", "head_rand_distance"):
        for kind in ("weights", "grads", "updates"):
            assert np.isfinite(ds[var].sel(kind=kind).values).any(), (var, kind)


def test_recompute_reproduces_the_spectral_family(store, tmp_path):
    from dynlab.analysis.recompute import recompute

    _, _, path = store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    recompute(copy, ",".join(WW_SPECTRAL))
    before, after = xr.open_zarr(path), xr.open_zarr(copy)
    for prefix in ("", "head_", "qk_", "emb_"):
        for m in WW_SPECTRAL:
            xr.testing.assert_identical(after[prefix + m].load(), before[prefix + m].load())
