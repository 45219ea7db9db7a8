"""WeightWatcher's other tail fits (dynlab.analysis.heavytail): the truncated power law against
the `powerlaw` package's own Truncated_Power_Law (2.0.0, the dev extra's pin), mpmath and
scipy quadrature; the xmin_peak rule on a hand-built ESD and against powerlaw's
Fit(xmin=range); their edges; the opt-in metrics through a real store, `recompute` and the
ESD figure; in the slow lane real trained weights, and weightwatcher's own
analyze(fix_fingers='xmin_peak') where a powerlaw 1.x is given (DYNLAB_POWERLAW1_PATH)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
import xarray as xr
from builders import TINY_SPEC_ARGS, heavy_tailed_run
from safetensors.torch import load_file

import dynlab
from dynlab.analysis import heavytail as H
from dynlab.analysis.metrics import DEFAULT_METRICS, METRICS, OPT_IN_METRICS
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run, matrix_with_spectrum

powerlaw = pytest.importorskip("powerlaw", reason="powerlaw==2.0.0 is a dev dependency")
mpmath = pytest.importorskip("mpmath")

PEAK = ("alpha_peak", "alpha_peak_ks", "alpha_peak_n_tail")
TPL = ("tpl_alpha", "tpl_lambda", "tpl_llr", "tpl_p")


def evals(w):
    return np.sort(scipy.linalg.svdvals(np.asarray(w, dtype=np.float64)) ** 2)


def pareto(n, alpha, seed, xmin=1.0):
    u = np.random.default_rng(seed).uniform(size=n)
    return xmin * (1 - u) ** (-1.0 / (alpha - 1))


def tpl_sample(n, alpha, lam_, seed, xmin=1.0):
    """Samples of p(x) ∝ x^(−α) e^(−Λx), x ≥ x_min: Pareto draws kept with probability
    e^(−Λ(x − x_min)) (rejection sampling)."""
    rng = np.random.default_rng(seed)
    out = np.empty(0)
    while out.size < n:
        x = xmin * (1 - rng.uniform(size=4 * n)) ** (-1.0 / (alpha - 1))
        out = np.concatenate([out, x[rng.uniform(size=x.size) < np.exp(-lam_ * (x - xmin))]])
    return out[:n]


def pl_fit(lam, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(lam, verbose=False, **kw)


def reference_tpl(lam, xmin):
    """powerlaw's own TPL at x_min, with dynlab's parameter ranges, and its comparison."""
    ranges = {k: list(v) for k, v in H.TPL_RANGES.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(lam, xmin=xmin, parameter_ranges=ranges, verbose=False)
        tpl = fit.truncated_power_law
        r, p = fit.distribution_compare("power_law", "truncated_power_law")
    return fit, tpl, r, p


# ----------------------------------------------------------------------------------------
# The truncated power law


def test_upper_gamma_equals_mpmath_and_quadrature():
    rng = np.random.default_rng(0)
    s_all = np.concatenate([rng.uniform(-8, 3, 40), [-3.0, -1.0, 0.0, -2.0 + 1e-9, 1e-12]])
    for s in s_all:
        for x in (1e-9, 1e-3, 0.2, 1.0, 1.9, 2.5, 30.0):
            want = float(mpmath.gammainc(s, x))
            assert H.upper_gamma(float(s), x) == pytest.approx(want, rel=1e-11), (s, x)
    # independent of both: the integral itself
    for s, x in [(-1.5, 0.3), (-0.25, 1.2), (0.5, 0.01), (-3.7, 0.05)]:
        quad = scipy.integrate.quad(lambda t, s=s: t ** (s - 1) * math.exp(-t), x, np.inf,
                                    epsabs=0, epsrel=1e-12, limit=200)[0]
        assert H.upper_gamma(s, x) == pytest.approx(quad, rel=1e-9)


@pytest.mark.parametrize("alpha,lam_,xmin", [(2.5, 0.1, 1.0), (0.6, 2.0, 0.3), (4.3, 0.01, 5.0),
                                             (1.0, 0.5, 2.0)])
def test_tpl_density_integrates_to_one(alpha, lam_, xmin):
    c = H.tpl_normaliser(alpha, lam_, xmin)
    total = scipy.integrate.quad(lambda x: c * x ** (-alpha) * math.exp(-lam_ * x), xmin,
                                 np.inf, epsrel=1e-12, limit=200)[0]
    assert total == pytest.approx(1.0, rel=1e-9)
    tail = np.array([xmin, 2 * xmin, 7.5 * xmin])
    ll = H.tpl_loglikelihoods(tail, xmin, alpha, lam_)
    if alpha > 1:  # inside TPL_RANGES
        np.testing.assert_allclose(ll, np.log(c) - alpha * np.log(tail) - lam_ * tail,
                                   rtol=1e-12)
    else:  # outside the ranges: powerlaw's floor
        assert (ll == math.log(H.TINY_LIKELIHOOD)).all()
    assert (H.tpl_loglikelihoods(tail, xmin, alpha, -1.0) == math.log(H.TINY_LIKELIHOOD)).all()


def cases():
    rng = np.random.default_rng(3)
    bulk = rng.uniform(0.05, 0.9, 150)
    tail = torch.tensor(np.sort(rng.pareto(1.4, 60))[::-1] + 1.0)
    mat = matrix_with_spectrum(100, 60, tail, torch.Generator().manual_seed(1))
    return {"pareto": np.concatenate([bulk, pareto(300, 2.5, 1)]),
            "truncated": np.concatenate([bulk, tpl_sample(800, 1.8, 0.05, 2)]),
            "matrix": evals(mat.numpy())}


@pytest.mark.parametrize("case", ["pareto", "truncated", "matrix"])
def test_tpl_equals_powerlaws_truncated_power_law(case):
    lam = cases()[case]
    plain = H.fit_power_law(lam)
    ours = H.fit_truncated_power_law(lam, plain.xmin)
    fit, tpl, r, p = reference_tpl(lam, plain.xmin)
    assert ours.alpha == pytest.approx(tpl.alpha, rel=1e-6)
    assert ours.Lambda == pytest.approx(tpl.Lambda, rel=1e-6)
    # powerlaw's power law is the closed-form MLE for α in (1.5, 3]: the same comparison
    assert 1.5 < plain.alpha <= 3 and fit.power_law.alpha == pytest.approx(plain.alpha, rel=1e-12)
    assert ours.llr == pytest.approx(r, rel=1e-6, abs=1e-9)
    assert ours.p == pytest.approx(p, rel=1e-6, abs=1e-9)
    assert ours.reason == ""


def test_tpl_recovers_a_cut_off_and_prefers_a_plain_law_without_one():
    lam = tpl_sample(4000, 1.8, 0.05, seed=5)
    fit = H.fit_truncated_power_law(lam, 1.0)
    assert fit.alpha == pytest.approx(1.8, abs=0.1)
    assert fit.Lambda == pytest.approx(0.05, rel=0.25)
    assert fit.llr < 0 and fit.p < 1e-3  # the TPL fits significantly better
    plain = H.fit_truncated_power_law(pareto(4000, 2.5, seed=6), 1.0)
    assert plain.alpha == pytest.approx(2.5, abs=0.1)
    assert plain.p > 0.01  # no significant cut-off
    # R = ℓ_PL − ℓ_TPL by hand from the two log-likelihoods
    tail = lam[lam >= 1.0]
    a0 = 1 + tail.size / np.sum(np.log(tail))
    ll_pl = np.sum(np.log((a0 - 1) * tail ** (-a0)))
    c = H.tpl_normaliser(fit.alpha, fit.Lambda, 1.0)
    ll_tpl = np.sum(np.log(c) - fit.alpha * np.log(tail) - fit.Lambda * tail)
    assert fit.llr == pytest.approx(ll_pl - ll_tpl, rel=1e-9)


# ----------------------------------------------------------------------------------------
# xmin_peak


def test_xmin_peak_on_a_hand_built_esd():
    """50 eigenvalues at 1 and 100 at 10^t, t = 0.01 … 2: log10 λ spans [0, 2], so the 100
    bins are 0.02 wide and the first (51 values) is the peak: p = 10^0 = 1, and x_min is
    searched among the distinct eigenvalues in [log10 0.95, 1.5] but the largest there."""
    t = np.linspace(0.01, 2.0, 100)
    lam = np.concatenate([np.ones(50), 10 ** t])
    assert H.esd_peak(lam) == 1.0
    low, high = H.peak_xmin_range(1.0)
    assert low == pytest.approx(math.log10(0.95)) and high == 1.5
    inside = np.concatenate([[1.0], 10 ** t[10 ** t <= 1.5]])[:-1]
    assert inside.size == 9
    best = None
    for xmin in inside:  # by hand: the closed-form α and the KS distance of each candidate
        tail = np.sort(lam[lam >= xmin])
        a = 1 + tail.size / sum(math.log(x / xmin) for x in tail)
        d = max(abs((1 - (x / xmin) ** (1 - a)) - np.sum(tail < x) / tail.size) for x in tail)
        if best is None or d < best[2]:
            best = (xmin, a, d, tail.size)
    got = H.fit_power_law_peak(lam)
    assert got.peak == 1.0 and got.reason == ""
    assert got.fit.xmin == best[0] and got.fit.n_tail == best[3]
    assert got.fit.alpha == pytest.approx(best[1], rel=1e-12)
    assert got.fit.ks == pytest.approx(best[2], rel=1e-12)


def test_xmin_peak_equals_powerlaw_fit_with_the_range():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((300, 200))
    u, _ = np.linalg.qr(rng.standard_normal((300, 20)))
    v, _ = np.linalg.qr(rng.standard_normal((200, 20)))
    lam = evals(w + (u * np.sort(rng.pareto(2.0, 20) + 1) * 40) @ v.T)
    got = H.fit_power_law_peak(lam)
    ref = pl_fit(lam, xmin=H.peak_xmin_range(got.peak))
    assert got.fit.xmin == ref.xmin
    assert got.fit.alpha == pytest.approx(ref.alpha, rel=1e-10)
    assert got.fit.ks == pytest.approx(ref.D, rel=1e-9)
    assert got.fit.xmin <= 1.5 * got.peak


# ----------------------------------------------------------------------------------------
# Edges: NaN with a reason, never an exception


@pytest.mark.parametrize("lam,reason", [
    (np.zeros(30), "fewer than 10"),
    (np.full(30, 2.0), "no candidate"),
    (np.arange(1.0, 6.0), "fewer than 10"),
    (np.array([3.0]), "fewer than 10"),  # a 1 × n matrix
])
def test_peak_edges(lam, reason):
    got = H.fit_power_law_peak(lam)
    assert math.isnan(got.fit.alpha) and reason in got.reason


def test_huge_condition_number():
    """Eigenvalues over 24 decades: the TPL still equals powerlaw's; the ESD's peak is its
    first bin (a flat log-histogram), which leaves no candidate but 1e-12 itself: NaN."""
    lam = np.logspace(-12, 12, 60)
    plain = H.fit_power_law(lam)
    ours = H.fit_truncated_power_law(lam, plain.xmin)
    _, tpl, _, _ = reference_tpl(lam, plain.xmin)
    assert ours.alpha == pytest.approx(tpl.alpha, rel=1e-6)
    assert ours.Lambda == pytest.approx(tpl.Lambda, rel=1e-6)
    peak = H.fit_power_law_peak(lam)
    assert peak.peak == pytest.approx(1e-12) and "no candidate" in peak.reason


def test_tpl_edges():
    assert "alpha is NaN" in H.fit_truncated_power_law(np.ones(20), math.nan).reason
    assert "fewer than 2" in H.fit_truncated_power_law(np.arange(1.0, 20.0), 19.0).reason
    assert "equals x_min" in H.fit_truncated_power_law(np.full(20, 2.0), 2.0).reason
    # an infinite eigenvalue is not data; the rest is fitted
    a = H.fit_truncated_power_law(np.array([1.0, 1.5, np.inf, 3.0, 7.0]), 1.0)
    b = H.fit_truncated_power_law(np.array([1.0, 1.5, 3.0, 7.0]), 1.0)
    assert a == b and math.isfinite(a.alpha)
    assert math.isnan(H.upper_gamma(-1.5, 0.0)) and math.isnan(H.upper_gamma(math.nan, 1.0))


def test_batched_edges_and_dtypes():
    """NaN rows for a matrix holding NaN/Inf (all-NaN / inf spectrum), a zero matrix, a
    rank-deficient one with fewer than 10 non-zero σ; a bf16 spectrum equals its float64
    values; a rank-deficient one with enough non-zero σ fits those."""
    rng = np.random.default_rng(1)
    good = np.sort(rng.pareto(1.5, 40) + 1)[::-1]
    rows = np.full((6, 40), math.nan)
    rows[0] = good
    rows[2] = 0.0
    rows[3] = good
    rows[3, 0] = math.inf
    rows[4, :6] = good[:6]
    rows[4, 6:] = 1e-18  # rank 6: numerical zeros below the tolerance
    rows[5, :20] = good[:20]
    rows[5, 20:] = 0.0  # rank 20
    sig = torch.tensor(rows)
    tol = torch.tensor([0.0, 0.0, 0.0, 0.0, 1e-12, 1e-12])
    peak, tpl = H.peak_fits(sig, tol), H.tpl_fits(sig, tol)
    lam = np.sort(good ** 2)
    p = H.fit_power_law_peak(lam).fit
    np.testing.assert_allclose(peak[0], [p.alpha, p.ks, p.n_tail], rtol=1e-12)
    t = H.fit_truncated_power_law(lam, H.fit_power_law(lam).xmin)
    np.testing.assert_allclose(tpl[0], [t.alpha, t.Lambda, t.llr, t.p], rtol=1e-12)
    assert np.isnan(peak[1:5]).all() and np.isnan(tpl[1:5]).all()
    lam20 = np.sort(good[:20] ** 2)
    assert peak[5, 0] == pytest.approx(H.fit_power_law_peak(lam20).fit.alpha, rel=1e-12)
    assert tpl[5, 1] == pytest.approx(
        H.fit_truncated_power_law(lam20, H.fit_power_law(lam20).xmin).Lambda, rel=1e-12)
    bf = torch.tensor(good[None].copy()).to(torch.bfloat16)
    np.testing.assert_allclose(H.tpl_fits(bf, 0.0), H.tpl_fits(bf.double(), 0.0), rtol=1e-12)


# ----------------------------------------------------------------------------------------
# Through a real store


def test_registry_opt_in():
    for name in PEAK + TPL:
        assert name in OPT_IN_METRICS and name not in DEFAULT_METRICS
        assert METRICS[name].from_spectrum is not None
    assert "xmin_peak" in METRICS["alpha_peak"].definition
    assert "NaN for fewer than" in METRICS["tpl_alpha"].definition


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tails")
    run = heavy_tailed_run(root / "dec")
    metrics = "alpha,alpha_n_tail," + ",".join(PEAK + TPL)
    path = dynlab.analyze([run], root / "a.zarr", metrics=metrics, progress=False, device="cpu")
    return run, path


def test_store_holds_the_fits_of_every_kind(store):
    run, path = store
    ds = xr.open_zarr(path).sel(run="dec", step=10)
    w = load_file(str(run / "checkpoints" / "step_10" / "weights.safetensors"))
    for name in ("attention.q_proj", "swiglu.w_2"):
        lam = evals(w[f"layers.0.{name}.weight"].double().numpy())
        cell = ds.sel(kind="weights", layer=0, matrix=name)
        plain = H.fit_power_law(lam)
        t = H.fit_truncated_power_law(lam, plain.xmin)
        p = H.fit_power_law_peak(lam).fit
        want = {"tpl_alpha": t.alpha, "tpl_lambda": t.Lambda, "tpl_llr": t.llr, "tpl_p": t.p,
                "alpha_peak": p.alpha, "alpha_peak_ks": p.ks,
                "alpha_peak_n_tail": p.n_tail or math.nan}
        for k, v in want.items():  # (NaN where the fit is NaN)
            np.testing.assert_allclose(float(cell[k]), v, rtol=1e-6, atol=1e-9, err_msg=k)
        if name == "attention.q_proj":  # the planted tail: every fit finite
            assert all(math.isfinite(v) for v in want.values())
    for var in ("tpl_alpha", "tpl_llr", "alpha_peak"):
        for kind in ("weights", "grads", "updates"):
            assert np.isfinite(ds[var].sel(kind=kind).values).any(), (var, kind)
    # every table: the TPL is fitted exactly where α is (heads of 6 eigenvalues: neither)
    for prefix in ("", "head_", "qk_", "emb_"):
        a, t = ds[prefix + "alpha"].values, ds[prefix + "tpl_alpha"].values
        np.testing.assert_array_equal(np.isnan(a), np.isnan(t), err_msg=prefix)
        assert prefix + "alpha_peak" in ds
    assert "truncated power law" in ds["tpl_alpha"].attrs["definition"]
    assert "xmin_peak" in ds["alpha_peak"].attrs["definition"]


@pytest.mark.slow
def test_recompute_reproduces_the_fits(store, tmp_path):
    from dynlab.analysis.recompute import recompute

    _, path = store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    recompute(copy, ",".join(PEAK + TPL))
    before, after = xr.open_zarr(path), xr.open_zarr(copy)
    for m in PEAK + TPL:
        xr.testing.assert_identical(after[m].load(), before[m].load())


def test_esd_figure_draws_the_truncated_power_law(store):
    from dynlab.viz import heavytail as V

    _, path = store
    ds = dynlab.open_store(path)
    fig = V.esd(ds, "weights", "attention.q_proj", 0, steps=[10])
    fits = {t.meta["fit"]: t for t in fig.data if t.meta["role"] == "fit"}
    tpl = fits["truncated_power_law"]
    cell = ds.sel(run="dec", kind="weights", step=10, layer=0, matrix="attention.q_proj")
    assert tpl.meta["alpha"] == float(cell.tpl_alpha)
    assert tpl.meta["Lambda"] == float(cell.tpl_lambda)
    assert tpl.meta["xmin"] == fits["power_law"].meta["xmin"]
    lam = np.sort(cell.sigma.values[np.isfinite(cell.sigma.values)] ** 2)
    x = np.asarray(tpl.x)
    frac = int(cell.alpha_n_tail) / lam.size
    want = frac * H.tpl_normaliser(float(cell.tpl_alpha), float(cell.tpl_lambda),
                                   tpl.meta["xmin"]) * x ** (-float(cell.tpl_alpha)) * np.exp(
        -float(cell.tpl_lambda) * x)
    np.testing.assert_allclose(tpl.y, want, rtol=1e-12)
    captions = " ".join(caption for title, caption, _ in V.htsr_sections(ds))
    assert "truncated power law" in captions  # the report's heavy-tail captions


# ----------------------------------------------------------------------------------------
# Real weights (slow)

WW_SCRIPT = r"""
import json, logging, sys, warnings
import numpy as np, torch, weightwatcher as ww
warnings.simplefilter("ignore")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
mats = [torch.tensor(np.load(p)) for p in sys.argv[1:]]
model = torch.nn.Sequential(*[torch.nn.Linear(m.shape[1], m.shape[0], bias=False) for m in mats])
with torch.no_grad():
    for lin, m in zip(model, mats):
        lin.weight.copy_(m)
d = ww.WeightWatcher(model=model).analyze(fix_fingers="xmin_peak", pl_package="powerlaw")
t = ww.WeightWatcher(model=model).analyze(fit="TPL", pl_package="powerlaw")
print(json.dumps({"peak": d[["alpha", "xmin", "D", "num_pl_spikes"]].to_dict("records"),
                  "tpl": t[["alpha", "xmin", "Lambda"]].to_dict("records")}))
"""


@pytest.mark.slow
def test_real_weights(tmp_path):
    """A trained run's weights (and a Gaussian and a heavy-tailed matrix): the TPL equals
    powerlaw's, the xmin_peak fit powerlaw's Fit(xmin=range); and, where DYNLAB_POWERLAW1_PATH
    names a directory holding powerlaw 1.x (weightwatcher 0.7.7's xmin_peak and TPL routes
    fail with powerlaw 2.0.0), weightwatcher's own analyze(fix_fingers='xmin_peak') rows and
    its analyze(fit='TPL') α and Λ at the x_min it reports."""
    spec = ModelSpec(**TINY_SPEC_ARGS)
    run = make_run(tmp_path / "dec", spec, [0, 10])
    w = load_file(str(run / "checkpoints" / "step_10" / "weights.safetensors"))
    names = ["layers.0.swiglu.w_2.weight", "layers.0.attention.q_proj.weight"]
    rng = np.random.default_rng(11)
    gauss = rng.standard_normal((128, 64)).astype(np.float32)
    heavy = matrix_with_spectrum(100, 60, torch.tensor(np.sort(rng.pareto(1.2, 60))[::-1] + 1.0),
                                 torch.Generator().manual_seed(0)).float()
    mats = [w[n].float().numpy() for n in names] + [gauss, heavy.numpy()]
    ours = []
    for m in mats:
        lam = evals(m)
        plain = H.fit_power_law(lam)
        t = H.fit_truncated_power_law(lam, plain.xmin)
        _, tpl, _, _ = reference_tpl(lam, plain.xmin)
        assert t.alpha == pytest.approx(tpl.alpha, rel=1e-6)
        assert t.Lambda == pytest.approx(tpl.Lambda, rel=1e-6)
        ours.append(H.fit_power_law_peak(lam[lam > 1e-5]))  # weightwatcher's eigenvalue floor
        ref = pl_fit(lam[lam > 1e-5], xmin=H.peak_xmin_range(ours[-1].peak))
        assert ours[-1].fit.xmin == ref.xmin
        assert ours[-1].fit.alpha == pytest.approx(ref.alpha, rel=1e-6)
    beside = Path(sys.prefix) / "powerlaw1"  # where `make install` puts powerlaw 1.5
    pl1 = os.environ.get("DYNLAB_POWERLAW1_PATH") or (str(beside) if beside.is_dir() else "")
    if not pl1:
        pytest.skip("weightwatcher's xmin_peak needs powerlaw 1.x: set DYNLAB_POWERLAW1_PATH "
                    "to a directory holding it (pip install powerlaw==1.5 --target DIR; "
                    "`make install` puts one in .venv/powerlaw1)")
    files = []
    for i, m in enumerate(mats):
        np.save(tmp_path / f"m{i}.npy", m)
        files.append(str(tmp_path / f"m{i}.npy"))
    env = {**os.environ, "PYTHONPATH": pl1 + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", WW_SCRIPT, *files], env=env, check=True,
                         capture_output=True, text=True).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    for row, got in zip(rows["peak"], ours, strict=True):
        assert got.fit.xmin == pytest.approx(row["xmin"], rel=1e-12)
        assert got.fit.alpha == pytest.approx(row["alpha"], rel=1e-6)
        assert got.fit.ks == pytest.approx(row["D"], rel=1e-6)
        assert got.fit.n_tail == row["num_pl_spikes"]
    # its fit='TPL' chooses x_min by the TPL's KS distance; at that x_min, the same fit
    for row, m in zip(rows["tpl"], mats, strict=True):
        lam = evals(m)
        got = H.fit_truncated_power_law(lam[lam > 1e-5], row["xmin"])
        assert got.alpha == pytest.approx(row["alpha"], rel=1e-6)
        assert got.Lambda == pytest.approx(row["Lambda"], rel=1e-6)
