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
from builders import TINY_SPEC_ARGS, heavy_tailed_run
from safetensors.torch import load_file

import dynlab
from dynlab.analysis import heavytail as H
from dynlab.analysis.metrics import DEFAULT_METRICS, METRICS, parse_metrics
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run, matrix_with_spectrum

SPEC = ModelSpec(**TINY_SPEC_ARGS)
#: one layer, d 24: a store of every kind small enough for the fast lane
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
    mp = ("mp_sigma", "mp_sigma2", "mp_bulk_max", "num_spikes", "mp_softrank")
    for name in WW_SPECTRAL:
        assert METRICS[name].from_spectrum is not None
        assert (name in DEFAULT_METRICS) == (name not in mp)
    for name in WW_RAND:
        assert METRICS[name].entrywise and name not in DEFAULT_METRICS
    for name in WW_SPECTRAL + WW_RAND:
        assert name in parse_metrics("all")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ww")
    run = heavy_tailed_run(root / "dec")
    metrics = "alpha,alpha_n_tail," + ",".join(WW_SPECTRAL + WW_RAND)
    path = dynlab.analyze([run], root / "a.zarr", metrics=metrics, progress=False, device="cpu")
    return run, root, path


def test_store_values_equal_the_functions_on_numpy_spectra(store):
    run, _, path = store
    ds = xr.open_zarr(path).sel(run="dec", step=10)
    assert ds.attrs["rand_seed"] == H.RAND_SEED
    w = load_file(str(run / "checkpoints" / "step_10" / "weights.safetensors"))
    for layer, name in [(0, "swiglu.w_2"), (0, "attention.q_proj"), (0, "attention.k_proj")]:
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
    assert float(ds.alpha.sel(kind="weights", layer=0, matrix="attention.q_proj")) < 2
    assert float(ds.over_trained.sel(kind="weights", layer=0, matrix="attention.q_proj")) == 1
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


# ----------------------------------------------------------------------------------------
# Against weightwatcher's own analyze() (test-only dependency, pinned in the `dev` extra)


def ww_analyze(model, **kw):
    """weightwatcher's details rows, its global numpy generator seeded as dynlab seeds."""
    import logging

    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    np.random.seed(H.RAND_SEED)
    return ww.WeightWatcher(model=model).analyze(randomize=True, mp_fit=True, **kw)


def ww_small_n_alpha(lam):
    """weightwatcher's small-N rule (WWFit with fewer than 20 eigenvalues above 1e-5),
    transcribed: over tails of ≥ 8 points the bias-corrected α = 1 + (n − 1)/Σ ln(x/x_min)
    and its KS distance D (other candidates: D = 1); WWFit.__init__ then takes the α of the
    smallest D (fit_powerlaw_smallN's own choice by D − 0.868/√n is overwritten)."""
    x = np.sort(lam[lam > 1e-5])
    alphas, ds = np.zeros(x.size - 1), np.ones(x.size - 1)
    for i in range(x.size - 1):
        n = x.size - i
        s = np.sum(np.log(x[i:])) - n * np.log(x[i])
        if n < 8 or s <= 1e-12:
            continue
        alphas[i] = 1 + (n - 1) / s
        if alphas[i] > 1:
            ds[i] = np.max(np.abs(np.arange(n) / n - (1 - (x[i:] / x[i]) ** (1 - alphas[i]))))
    return alphas[int(np.argmin(ds))]


def dynlab_row(w):
    """Every metric of matrix w (float32 values) as dynlab computes it."""
    w = np.asarray(w, dtype=np.float64)
    lam = evals(w)
    fit = H.fit_spectrum(np.sqrt(lam[::-1]), eps=np.finfo(np.float32).eps, c=2.0)
    a = fit.alpha
    mp = H.mp_fit(lam, max(w.shape), min(w.shape))
    rnd = H.randomised_esd(w)
    return {"alpha": a, "xmin": fit.xmin, "D": fit.ks, "log_norm": H.log_norm(lam),
            "log_spectral_norm": H.log_spectral_norm(lam),
            "alpha_weighted": H.alpha_weighted(a, lam), "log_alpha_norm": H.log_alpha_norm(a, lam),
            "sigma_mp": mp.sigma, "bulk_max": mp.bulk_max, "num_spikes": mp.num_spikes,
            "mp_softrank": mp.softrank, "rand_distance": rnd.rand_distance,
            "max_rand_eval": rnd.max_rand_eval, "rand_num_spikes": rnd.num_rand_spikes}


DETERMINISTIC = ("log_norm", "log_spectral_norm", "sigma_mp", "bulk_max", "num_spikes",
                 "mp_softrank")
FIT = ("alpha", "xmin", "D", "alpha_weighted", "log_alpha_norm")
RANDOM = ("rand_distance", "max_rand_eval", "rand_num_spikes")


def assert_row(ww_row, ours, names, label):
    for k in names:
        assert ours[k] == pytest.approx(float(ww_row[k]), rel=1e-6, abs=1e-12), (label, k)


@pytest.mark.slow
def test_every_metric_equals_weightwatchers_analyze(tmp_path):
    rng = np.random.default_rng(11)
    gauss = rng.standard_normal((128, 64)).astype(np.float32)
    tail = torch.tensor(np.sort(rng.pareto(1.2, 60))[::-1] + 1.0)
    heavy = matrix_with_spectrum(100, 60, tail, torch.Generator().manual_seed(0)).float()
    run = make_run(tmp_path / "dec", SPEC, [0, 10])  # weights written by dynlab.testing
    trained = load_file(str(run / "checkpoints" / "step_10" / "weights.safetensors"))[
        "layers.0.swiglu.w_2.weight"]
    mats = [torch.as_tensor(gauss), heavy, trained]
    model = torch.nn.Sequential(*[torch.nn.Linear(m.shape[1], m.shape[0], bias=False)
                                  for m in mats])
    with torch.no_grad():
        for lin, m in zip(model, mats, strict=True):
            lin.weight.copy_(m)
    rows = ww_analyze(model)
    assert len(rows) == 3
    for i, (label, m) in enumerate(zip(("gaussian", "heavy", "dynlab"), mats, strict=True)):
        ours = dynlab_row(m.numpy())
        assert_row(rows.iloc[i], ours, DETERMINISTIC + FIT, label)
        assert (float(rows.iloc[i]["alpha"]) < 2) == (rows.iloc[i]["warning"] == "over-trained")
    assert_row(rows.iloc[0], dynlab_row(mats[0].numpy()), RANDOM, "gaussian")  # fresh generator
    assert float(rows.iloc[1]["alpha"]) < 2  # the planted tail
    # later layers continue weightwatcher's generator: agreement in distribution only
    for i in (1, 2):
        ours = dynlab_row(mats[i].numpy())
        assert ours["rand_distance"] == pytest.approx(float(rows.iloc[i]["rand_distance"]),
                                                      rel=0.5)
    # the store of that run holds the same values (the metric registry, not the functions)
    path = dynlab.analyze([run], tmp_path / "a.zarr", progress=False, device="cpu",
                          metrics="alpha,alpha_ks," + ",".join(WW_SPECTRAL), kinds="weights")
    cell = xr.open_zarr(path).sel(run="dec", step=10, kind="weights", layer=0,
                                  matrix="swiglu.w_2")
    for ours, theirs in [("alpha", "alpha"), ("alpha_ks", "D"), ("log_norm", "log_norm"),
                         ("alpha_weighted", "alpha_weighted"), ("mp_sigma", "sigma_mp"),
                         ("mp_bulk_max", "bulk_max"), ("num_spikes", "num_spikes"),
                         ("mp_softrank", "mp_softrank"), ("log_alpha_norm", "log_alpha_norm")]:
        assert float(cell[ours]) == pytest.approx(float(rows.iloc[2][theirs]), rel=1e-6), ours


@pytest.mark.slow
def test_hf_llama_against_weightwatcher_and_its_small_n_rule(tmp_path):
    """A Llama written by transformers with GQA k/v of 16 eigenvalues: weightwatcher takes its
    small-N branch there (another α rule), which dynlab does not follow (its α is the
    Clauset–Shalizi–Newman fit everywhere); every other value agrees."""
    transformers = pytest.importorskip("transformers")
    import hf_fixtures as fx

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=1, num_attention_heads=8,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for step in range(3):
        ids = fx.batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "llama" / "step3")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama" / "step3")
    names = [n for n, _ in loaded.named_modules()]
    ids = [names.index("model.layers.0.self_attn.k_proj"),
           names.index("model.layers.0.mlp.down_proj")]
    rows = ww_analyze(loaded, layers=ids)
    assert list(rows["longname"]) == ["model.layers.0.self_attn.k_proj",
                                      "model.layers.0.mlp.down_proj"]
    sd = loaded.state_dict()
    k = sd["model.layers.0.self_attn.k_proj.weight"].numpy()
    down = sd["model.layers.0.mlp.down_proj.weight"].numpy()
    assert k.shape == (16, 64)
    ours_k, ours_down = dynlab_row(k), dynlab_row(down)
    assert_row(rows.iloc[0], ours_k, DETERMINISTIC + RANDOM, "k_proj")
    assert_row(rows.iloc[1], ours_down, DETERMINISTIC + FIT, "down_proj")
    # k_proj: weightwatcher's α is its small-N rule's; dynlab keeps its own fit
    assert float(rows.iloc[0]["alpha"]) == pytest.approx(ww_small_n_alpha(evals(k)), rel=1e-9)
    assert ours_k["alpha"] == pytest.approx(H.fit_power_law(evals(k)).alpha, rel=1e-12)
    assert ours_k["alpha"] != pytest.approx(float(rows.iloc[0]["alpha"]), rel=1e-3)
    # the dynlab store of the saved checkpoint agrees with the module's values
    path = dynlab.analyze([tmp_path / "llama"], tmp_path / "a.zarr", progress=False,
                          device="cpu", metrics="alpha," + ",".join(WW_SPECTRAL),
                          kinds="weights")
    ds = xr.open_zarr(path).sel(step=3, kind="weights", layer=0)
    assert float(ds.num_spikes.sel(matrix="attention.k_proj").squeeze()) == float(
        rows.iloc[0]["num_spikes"])
    assert float(ds.mp_sigma.sel(matrix="swiglu.w_2").squeeze()) == pytest.approx(
        float(rows.iloc[1]["sigma_mp"]), rel=1e-6)
    assert float(ds.alpha.sel(matrix="swiglu.w_2").squeeze()) == pytest.approx(
        float(rows.iloc[1]["alpha"]), rel=1e-6)


# ----------------------------------------------------------------------------------------
# Figures and the report table (dynlab.viz.heavytail)


def test_mp_density_in_lambda_units_integrates_to_one():
    from scipy.integrate import quad

    from dynlab.viz.heavytail import mp_density_lambda, power_law_density

    for q in (1.0, 2.0, 4.0):  # λ = x / 0.5: support [λ₋, λ₊] / 0.5
        lo, hi = 2 * (1 - 1 / math.sqrt(q)) ** 2, 2 * (1 + 1 / math.sqrt(q)) ** 2
        total, _ = quad(lambda x, q=q: float(mp_density_lambda(np.array([x]), q, 1.0, 0.5)[0]),
                        lo, hi, limit=200)
        assert total == pytest.approx(1.0, abs=1e-6), q
    lam = np.logspace(0, 8, 200001)
    assert np.trapezoid(power_law_density(lam, 2.5, 1.0, 0.3), lam) == pytest.approx(
        0.3, rel=1e-3)


def test_esd_trajectory_and_flags_figures(store):
    from dynlab.viz import heavytail as V

    _, _, path = store
    ds = dynlab.open_store(path)
    fig = V.esd(ds, "weights", "attention.q_proj", 0)
    steps = [t.meta["step"] for t in fig.data if t.meta["role"] == "spectrum"]
    assert steps == [0, 10]
    fits = {(t.meta["fit"], t.meta["step"]): t for t in fig.data if t.meta["role"] == "fit"}
    a = float(ds.alpha.sel(run="dec", kind="weights", step=10, layer=0,
                           matrix="attention.q_proj"))
    pl = fits[("power_law", 10)]
    assert pl.meta["alpha"] == a
    lam = np.sort(ds.sigma.sel(run="dec", kind="weights", step=10, layer=0,
                               matrix="attention.q_proj").values[:24] ** 2)
    n_tail = int(ds.alpha_n_tail.sel(run="dec", kind="weights", step=10, layer=0,
                                     matrix="attention.q_proj"))
    assert pl.meta["xmin"] == pytest.approx(lam[-n_tail], rel=1e-12)
    assert min(pl.x) >= pl.meta["xmin"]
    assert ("mp", 10) in fits and max(fits[("mp", 10)].y) > 0
    assert V.esd(ds, "weights", "nope", 0).layout.meta["notes"] == ["weights · nope not in store"]
    tr = V.over_steps(ds, "weights", "swiglu.w_2")
    series = [t for t in tr.data if t.meta["role"] == "series"]
    assert {t.meta["metric"] for t in series} == {"alpha", "num_spikes", "rand_distance"}
    t = next(t for t in series if t.meta["metric"] == "num_spikes")
    np.testing.assert_array_equal(t.y, ds.num_spikes.sel(run="dec", kind="weights", layer=0,
                                                         matrix="swiglu.w_2").values)
    rows = V.trained_flags(ds)
    flagged = [(r["layer"], r["matrix"], r["flag"]) for r in rows if r["flag"]]
    assert (0, "attention.q_proj", "over-trained") in flagged
    for r in rows:
        want = "over-trained" if r["alpha"] < 2 else "under-trained" if r["alpha"] > 6 else ""
        assert r["flag"] == want and r["step"] == 10
    table = V.flags_table(ds)
    assert table.data[0].meta["n_flagged"] == len(flagged)
    from dynlab.viz import report as REP

    titles = [s.title for s in REP.report_sections(ds)]
    assert titles[-3:] == ["Heavy tails: ESD of the weights", "Heavy tails over steps",
                           "Heavy tails: under-/over-trained flags"]


def test_batched_family_edges():
    """The registry's batched functions: NaN for a matrix that held NaN/Inf (all-NaN row) and
    for a zero matrix; a NaN-padded product spectrum uses its k values (M = k)."""
    good = np.sort(np.random.default_rng(0).uniform(0.5, 3.0, 12))[::-1]
    rows = np.full((3, 16), math.nan)
    rows[0, :12] = good
    rows[2, :16] = 0.0
    sig = torch.tensor(rows)
    norms = H.ww_norms(sig, 0.0)
    lam = np.sort(good ** 2)
    a = H.fit_power_law(lam).alpha
    np.testing.assert_allclose(norms[0], [math.log10(lam.sum()), math.log10(lam.max()),
                                          a * math.log10(lam.max()),
                                          math.log10(np.sum(lam ** a))], rtol=1e-12)
    assert np.isnan(norms[1:]).all()
    mp = H.mp_fits(sig, torch.tensor([20.0, 20.0, 20.0]))
    want = H.mp_fit(lam, 20, 12)
    np.testing.assert_allclose(mp[0], [want.sigma, want.sigma2, want.bulk_max, want.num_spikes,
                                       want.softrank], rtol=1e-12)
    assert np.isnan(mp[1:]).all()
