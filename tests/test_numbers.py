"""Honest numbers: the precision-aware zero tolerance, cn_nz and rank_deficit, relora updates
from their factors, and log-space bands, against independent float64 references (numpy,
scipy, hand computations) and a real tiny relora run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import xarray as xr
from safetensors.torch import load_file
from scipy import stats

import dynlab
from dynlab.analysis import components as C
from dynlab.analysis import metrics as metrics_mod
from dynlab.analysis import spectra
from dynlab.analysis import task as A
from dynlab.runs.checkpoints import find_runs
from dynlab.testing import geometric_spectrum, matrix_with_spectrum
from dynlab.viz import figures as F
from dynlab.viz import report as R

sys.path.insert(0, str(Path(__file__).parent))
from builders import tiny_train_options  # noqa: E402
from references import product_norm as hand_product_norm  # noqa: E402

C_TOL = metrics_mod.TOL_FACTOR
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
EPS64 = float(torch.finfo(torch.float64).eps)


def eps_of(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def spectra_and_metrics(comp: C.Component) -> dict[str, float]:
    """The analysis pipeline's own route: component spectrum, then every spectral metric with
    the component's storage eps."""
    s = A.component_spectra({C.Site("layer", (0, 0)): comp})[C.Site("layer", (0, 0))]
    out = {"sigma": s.numpy()}
    args = dict(min_dim=comp.min_dim, norm=comp.storage_norm, compute_eps=EPS64)
    for name in ("numerical_rank", "cn", "cn_nz", "rank_deficit", "per"):
        out[name] = float(metrics_mod.METRICS[name].from_spectrum(s, comp.max_dim, comp.eps,
                                                               **args))
    out["tol"] = float(metrics_mod.zero_tolerance(s, comp.max_dim, comp.eps, **args))
    return out


def tol_by_hand(m: int, n: int, eps: float, norm: float, sigma_1: float) -> float:
    """max(c·eps·S·(√m + √n)/√(m·n), max(m, n)·eps_64·σ_1), written out."""
    storage = C_TOL * eps * norm * (math.sqrt(m) + math.sqrt(n)) / math.sqrt(m * n)
    return max(storage, max(m, n) * EPS64 * sigma_1)


def planted_factors(m: int, n: int, sigma: list[float], seed: int):
    """Float64 factors L (m×r), R (r×n) of U·diag(σ)·Vᵀ, U, V orthonormal."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigma)
    u, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=g))
    return u * torch.tensor(sigma, dtype=torch.float64), v.T


# ---- metric definitions by hand ---------------------------------------------------------


def test_cn_nz_and_rank_deficit_by_hand():
    nan = math.nan
    s = torch.tensor([[4.0, 2.0, 1e-3, 1e-12], [4.0, 2.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0],
                      [nan, nan, nan, nan], [3.0, 1.0, 0.0, nan]], dtype=torch.float64)
    # an 8 × 4 stored matrix: tol = c·eps·‖X‖_F·(1/√8 + 1/√4) = c·1e-4·4.47·0.854 = c·3.8e-4
    # (rows 0, 1), between 1e-12 and 1e-3 for any c in [1e-8, 2.6]
    assert 1e-8 <= C_TOL <= 2.6
    eps = 1e-4
    r = metrics_mod.numerical_rank(s, 8, eps)
    nz = metrics_mod.nonzero_condition_number(s, 8, eps)
    deficit = metrics_mod.rank_deficit(s, 8, eps)
    cn = metrics_mod.condition_number(s, 8, eps)
    assert r[[0, 1, 2, 4]].tolist() == [3, 4, 0, 2] and math.isnan(r[3])
    assert nz[0] == 4.0 / 1e-3 and cn[0] == math.inf
    assert nz[1] == cn[1] == 8.0  # full numerical rank: cn_nz = cn
    assert math.isnan(nz[2]) and math.isnan(cn[2])  # zero matrix
    assert math.isnan(nz[3]) and math.isnan(deficit[3])  # a matrix that held NaN/Inf
    assert cn[4] == math.inf and nz[4] == 3.0  # k = 3 (NaN-padded)
    assert deficit[[0, 1, 2, 4]].tolist() == [1, 0, 4, 1]
    assert {"cn_nz", "rank_deficit"} <= set(metrics_mod.parse_metrics("all"))


def test_zero_tolerance_formula_and_storage_eps():
    s = torch.tensor([[2.0, 1.0], [5.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    eps = torch.tensor([eps_of(torch.float32), eps_of(torch.bfloat16), EPS64],
                       dtype=torch.float64)
    m = torch.tensor([10.0, 3.0, 4096.0])
    n = torch.tensor([4.0, 2.0, 2.0])
    norm = torch.tensor([7.0, 5.0, 1.0])
    got = metrics_mod.zero_tolerance(s, m, eps, min_dim=n, norm=norm, compute_eps=EPS64)
    # the storage term for rows 0 and 1; the SVD's own error 4096·eps_64·σ_1 for row 2, whose
    # storage term c·eps_64·(1/√4096 + 1/√2) is smaller
    want = [C_TOL * 2**-23 * 7.0 * (10**-0.5 + 4**-0.5), C_TOL * 2**-7 * 5.0 * (3**-0.5 + 2**-0.5),
            4096 * 2**-52 * 1.0]
    np.testing.assert_allclose(got, want, rtol=1e-14)
    assert want[2] > C_TOL * 2**-52 * (4096**-0.5 + 2**-0.5)
    # defaults: S = ‖X‖_F of the spectrum itself, n = k, compute eps = sigma's dtype's
    np.testing.assert_allclose(
        metrics_mod.zero_tolerance(s[:2], m[:2], eps[:2]),
        [C_TOL * 2**-23 * math.sqrt(5) * (10**-0.5 + 2**-0.5),
         C_TOL * 2**-7 * 5.0 * (3**-0.5 + 2**-0.5)], rtol=1e-14)
    # a product's S (hand computation of the documented bound)
    assert metrics_mod.product_noise_norm(3.0, 2.0, 100, 4, 25) == pytest.approx(
        6.0 * (0.1 + 2 * 0.5 + 0.2) / (0.1 + 0.2), rel=1e-15)
    assert metrics_mod.product_noise_norm(3.0, 2.0, 100, 4, 25, 1.5, 0.5) == pytest.approx(
        (3.0 * 0.5 * (0.1 + 0.5) + 1.5 * 2.0 * (0.5 + 0.2)) / (0.1 + 0.2), rel=1e-15)
    assert metrics_mod.storage_eps(torch.float32, torch.bfloat16) == 2**-7
    assert metrics_mod.storage_eps(torch.float64) == 2**-52
    assert C.coarsest(torch.float64, torch.float16, torch.float32) == torch.float16


# ---- known rank, stored in float32 / bf16 / float64 -------------------------------------


SIGMA = [1.0, 0.9, 0.75, 0.625]  # r = 4 of k = 40; κ of the non-zero part 1.6


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_known_rank_from_stored_factors(dtype):
    """A rank-4 product of factors stored in `dtype`: rank 4 of 40, cn = inf, cn_nz = σ_1/σ_4
    of the float64 product of the stored factors to 1e-6."""
    dt = DTYPES[dtype]
    left, right = planted_factors(48, 40, SIGMA, seed=1)
    lo, ro = left.to(dt), right.to(dt)  # the factors as stored
    comp = C.LowRank(lo.double(), ro.double(), stored=dt, full=True)
    assert comp.eps == eps_of(dt) and comp.max_rank == 4 and comp.rank_bound == 40
    got = spectra_and_metrics(comp)
    ref = scipy.linalg.svdvals((lo.double() @ ro.double()).numpy())
    assert got["numerical_rank"] == 4 and got["rank_deficit"] == 36
    assert got["cn"] == math.inf
    assert got["cn_nz"] == pytest.approx(ref[0] / ref[3], rel=1e-6)
    np.testing.assert_allclose(got["sigma"][:4], ref[:4], rtol=1e-6)
    assert (got["sigma"][4:] == 0).all() and got["sigma"].shape == (40,)  # the cliff, kept


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_known_rank_dense_stored(dtype, noise):
    """The same rank-4 matrix formed, then stored in `dtype` (rounding: noise of the storage
    precision in every direction), optionally plus Gaussian noise the size of one more
    rounding's worst case (‖E‖_F = u·‖X‖_F): rank 4, cn = inf, cn_nz = σ_1/σ_4 of the
    unrounded float64 matrix within the perturbation (Weyl: |Δσ_i| ≤ ‖E‖_2), which is 1e-6
    or better for float32 / float64."""
    dt = DTYPES[dtype]
    left, right = planted_factors(48, 40, SIGMA, seed=2)
    exact = left @ right
    x = exact.clone()
    if noise:
        g = torch.Generator().manual_seed(3)
        e = torch.randn(48, 40, dtype=torch.float64, generator=g)
        u = eps_of(dt) / 2
        x = x + e * (u * float(torch.linalg.norm(exact)) / float(torch.linalg.norm(e)))
    stored = x.to(dt)
    comp = C.dense(stored.double(), stored=dt)
    got = spectra_and_metrics(comp)
    pert = float(torch.linalg.matrix_norm(stored.double() - exact, 2))
    assert got["numerical_rank"] == 4 and got["cn"] == math.inf and got["rank_deficit"] == 36
    ref = scipy.linalg.svdvals(exact.numpy())  # the unrounded matrix
    bound = 2 * pert / ref[3] + 1e-12  # relative change of σ_1/σ_4 under ‖E‖_2 = pert
    assert abs(got["cn_nz"] / (ref[0] / ref[3]) - 1) <= bound
    if dtype != "bfloat16":
        assert got["cn_nz"] == pytest.approx(ref[0] / ref[3], rel=1e-6)
    # the largest value counted as zero is the storage noise, under the tolerance
    assert pert <= got["tol"] and got["sigma"][4] <= got["tol"] < got["sigma"][3]
    if dtype != "float64":  # the former rule (float64 eps) counts that noise as rank
        s = torch.from_numpy(got["sigma"])
        assert metrics_mod.numerical_rank(s, 48, eps_of(torch.float64)) == 40
        assert metrics_mod.condition_number(s, 48, eps_of(torch.float64)) < math.inf


def test_full_rank_float32_kappa_1e5_keeps_an_exact_finite_cn():
    g = torch.Generator().manual_seed(4)
    w = matrix_with_spectrum(40, 40, geometric_spectrum(40, 1e5), g).to(torch.float32)
    got = spectra_and_metrics(C.dense(w))
    ref = scipy.linalg.svdvals(w.double().numpy())  # of the stored float32 entries
    # 1e-5·σ_1 > c·eps_32·‖W‖_F·(2/√40): ‖W‖_F ≈ 1.3·σ_1, so tol ≈ 1e-7·σ_1
    assert ref[-1] > got["tol"] and got["tol"] == pytest.approx(
        tol_by_hand(40, 40, eps_of(torch.float32), float(torch.linalg.norm(w.double())),
                    ref[0]), rel=1e-12)
    assert got["numerical_rank"] == 40 and got["rank_deficit"] == 0
    assert got["cn"] == pytest.approx(ref[0] / ref[-1], rel=1e-6)
    assert got["cn"] == pytest.approx(1e5, rel=0.05)  # float32 rounding moves σ_40 by ~1%
    assert got["cn_nz"] == got["cn"]


# ---- a real tiny relora run ---------------------------------------------------------------


SMALL = tiny_train_options()
R_LORA = 2


@pytest.fixture(scope="module")
def relora_store(tmp_path_factory):
    """12 steps, checkpoints at 0, 4, 8, 12, a reset after step 8: 0→4 and 4→8 lie within
    the first cycle, 8→12 across the reset."""
    root = tmp_path_factory.mktemp("numbers")
    run = dynlab.train("relora", out=str(root / "rel"), steps=12, checkpoint_every=4,
                       reset_every=8, restart_warmup_steps=1, warmup_steps=1, rank=R_LORA,
                       lr=1e-2, **SMALL)
    store = dynlab.analyze([run], out=root / "a.zarr", kinds="weights,updates,lora",
                           progress=False)
    return Path(run), xr.open_zarr(store).load()


def stored(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step}" / "weights.safetensors"))


def test_relora_within_cycle_update_from_factors(relora_store):
    run, ds = relora_store
    cfg = json.loads((run / "run.json").read_text())
    s = cfg["relora"]["alpha"] / cfg["relora"]["r"]
    spec = find_runs([run])[0].spec
    cycles = {t: json.loads((run / "checkpoints" / f"step_{t}" / "meta.json").read_text())
              ["relora_cycle"] for t in (0, 4, 8, 12)}
    checked = 0
    for t0, t1 in ((0, 4), (4, 8), (8, 12)):
        w0, w1 = stored(run, t0), stored(run, t1)
        within = cycles[t0] == cycles[t1]
        for layer in range(2):
            for j, name in enumerate(C.LAYER_MATRICES):
                comp = C.relora_update(w1, w0, layer, name, s)
                assert (comp is not None) == within, (t0, t1, name)  # the trainer's cycles
                sel = dict(run="rel", kind="updates", step=t1, layer=layer, matrix=name)
                shape = tuple(w1[f"layers.{layer}.{name}.weight"].shape)
                if not within:
                    assert float(ds.max_rank.sel(**sel)) == min(shape)  # dense fallback
                    continue
                a, b = f"layers.{layer}.{name}.lora_A", f"layers.{layer}.{name}.lora_B"
                upd = s * (w1[b].double() @ w1[a].double() - w0[b].double() @ w0[a].double())
                ref = scipy.linalg.svdvals(upd.numpy())
                bound = 2 * R_LORA if 2 * R_LORA < min(shape) else min(shape)
                assert float(ds.max_rank.sel(**sel)) == bound
                sig = ds.sigma.sel(**sel).values[: min(shape)]
                tol = float(ds.tol.sel(**sel))
                # S of s·B_t·A_t − s·B_prev·A_prev from the stored factors: the sum over both
                # terms of (‖L‖_F‖R‖_2(1/√m + 1/√r) + ‖L‖_2‖R‖_F(1/√r + 1/√n))/(1/√m + 1/√n)
                m, n = shape
                s_prod = sum(hand_product_norm(s * x[b].double().numpy(), x[a].double().numpy())
                             for x in (w1, w0))
                assert tol == pytest.approx(tol_by_hand(m, n, eps_of(torch.float32), s_prod,
                                                        ref[0]), rel=1e-10)
                r = int(ds.numerical_rank.sel(**sel))
                assert r == int((ref > tol).sum()) and r <= bound
                # the genuine rank: 2r, or r at 0→4 where B_0 = 0 (the factors' exact zeros
                # are ~1e-16·σ_1 in float64)
                genuine = int((ref > 1e-9 * ref[0]).sum())
                assert r == genuine == (R_LORA if t0 == 0 else 2 * R_LORA)
                np.testing.assert_allclose(sig[:r], ref[:r], rtol=1e-6)
                assert float(ds.cn_nz.sel(**sel)) == pytest.approx(ref[0] / ref[r - 1], rel=1e-6)
                assert int(ds.rank_deficit.sel(**sel)) == min(shape) - r
                if bound < min(shape):
                    assert float(ds.cn.sel(**sel)) == math.inf
                    assert (sig[bound:] == 0).all()
                    checked += 1
                    # the dense float32 difference of the stored W_eff (the pipeline's own
                    # component without the factors) gives the same rank: its extra values
                    # are the rounding noise of both W_eff, under the tolerance of
                    # S = √(‖W_t‖_F² + ‖W_prev‖_F²)
                    cur = w1[f"layers.{layer}.{name}.weight"]
                    prev = w0[f"layers.{layer}.{name}.weight"]
                    d = C.update_components(w1, w0, spec)[C.Site("layer", (layer, j))]
                    assert isinstance(d, C.Dense) and d.eps == eps_of(torch.float32)
                    assert d.storage_norm == pytest.approx(math.hypot(
                        float(torch.linalg.norm(cur.double())),
                        float(torch.linalg.norm(prev.double()))), rel=1e-12)
                    dm = spectra_and_metrics(d)
                    assert dm["numerical_rank"] == r and dm["cn"] == math.inf
                    sd = scipy.linalg.svdvals((cur.double() - prev.double()).numpy())
                    assert sd[r - 1] > dm["tol"] >= sd[r]  # the cliff, straddled
                    assert dm["cn_nz"] == pytest.approx(ref[0] / ref[r - 1], rel=1e-3)
    assert checked >= 2 * 5  # q, o, w_0, w_1, w_2 of both layers, at 0→4 and 4→8
    # the tolerance attrs document the rule
    assert "c*eps*S*(1/sqrt(m)+1/sqrt(n))" in ds.tol.attrs["definition"]
    assert ds.tol.attrs["c"] == C_TOL
    assert "2r" in ds.max_rank.attrs["definition"]


def test_report_explains_rank_deficiency_with_the_runs_numbers(relora_store):
    _, ds = relora_store
    ex = R.rank_deficiency(ds)
    assert ex is not None and ex.matrix == "swiglu.w_2" and ex.run == "rel"
    sel = dict(run="rel", kind="updates", step=ex.step, matrix="swiglu.w_2")
    ranks = ds.numerical_rank.sel(**sel).values
    assert ex.rank == float(np.median(ranks)) and ex.bound == 16
    assert ex.cn_nz == pytest.approx(float(np.median(ds.cn_nz.sel(**sel).values)), rel=1e-12)
    text = R.conditioning_explanation(ds)
    assert f"numerical rank {ex.rank:g} of 16" in text and "infinite" in text
    assert f"{ex.cn_nz:.3g}" in text and f"steps {ex.prev_step} and {ex.step}" in text
    sections = {s.title: s for s in R.report_sections(ds)}
    assert text in sections["Condition number of weights and updates"].caption


# ---- confidence bands in log space ------------------------------------------------------


def test_log_space_band_equals_hand_computation_and_stays_above_one():
    vals = np.array([[1.0, 1.2, 50.0, np.inf, np.nan],     # n = 3; inf and NaN left out
                     [2.0, 4.0, 8.0, 16.0, 32.0],          # n = 5
                     [7.0, np.inf, np.inf, np.inf, np.inf]])  # n = 1: no band
    da = xr.DataArray(vals, dims=("step", "layer"), coords={"step": [0, 1, 2]})
    st = F.layer_mean_ci(da, log=True, bounds=F.METRIC_RANGES["cn"])
    raw_lo = []
    for i, row in enumerate(vals):
        y = [math.log(v) for v in row if math.isfinite(v)]
        n = len(y)
        m = sum(y) / n
        assert float(st["mean"][i]) == pytest.approx(math.exp(m), rel=1e-12)  # geometric
        assert int(st["n"][i]) == n and int(st["n_bad"][i]) == 5 - n
        if n < 2:
            assert math.isnan(float(st["lo"][i]))
            continue
        sd = math.sqrt(sum((v - m) ** 2 for v in y) / (n - 1))
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        raw_lo.append(math.exp(m - half))
        assert float(st["hi"][i]) == pytest.approx(math.exp(m + half), rel=1e-12)
        assert float(st["lo"][i]) == pytest.approx(max(1.0, math.exp(m - half)), rel=1e-12)
    assert raw_lo[0] < 1 and float(st["lo"][0]) == 1.0  # row 0's raw band crossed below 1
    assert (st["lo"].values[:2] >= 1).all()


def test_cn_figure_bands_stay_in_range_and_inf_is_hollow():
    steps, layers = [0, 10, 20], [0, 1, 2, 3]
    cn = np.array([[1.0, 1.1, 200.0, 3.0], [1.0, np.inf, 1.5, 900.0],
                   [np.inf, np.inf, np.inf, np.inf]])[None, None, :, :, None]
    per = np.array([[0.95, 0.99, 0.2, 0.9], [0.5, 0.6, 0.7, 0.99], [0.9, 0.99, 0.97, 0.98]]
                   )[None, None, :, :, None]
    coords = dict(run=["rel"], kind=["updates"], step=steps, layer=layers, matrix=["w"])
    dims = ("run", "kind", "step", "layer", "matrix")
    ds = xr.Dataset({"cn": (dims, cn), "per": (dims, per)}, coords=coords)
    fig = F.trajectory(ds, "cn", "updates", "w")
    (mean,) = [t for t in fig.data if t.meta["role"] == "mean"]
    (lo,) = [t for t in fig.data if t.meta["role"] == "band_lo"]
    assert list(mean.x) == [0, 10]  # step 20: every layer inf, not drawn, noted
    assert list(mean.marker.symbol) == ["circle", "circle-open"]  # inf at step 10: hollow
    assert min(lo.y) >= 1.0
    assert fig.layout.yaxis.type == "log"
    assert "geometric mean" in fig.layout.title.text
    assert any("inf in every layer at 1 step" in n for n in fig.layout.meta["notes"])
    fig = F.trajectory(ds, "per", "updates", "w")
    band = [t for t in fig.data if t.meta["role"] in ("band_lo", "band_hi")]
    assert all(0.0 <= v <= 1.0 for t in band for v in t.y)
    assert max(band[0].y) == 1.0  # the raw t-interval at step 20 reaches above 1


# ---- half-precision storage of wide matrices ----------------------------------------------


HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def dct_matrix_with_spectrum(n: int, sigma: np.ndarray, seed: int) -> torch.Tensor:
    """U·diag(σ)·Vᵀ in float64 with U the orthonormal DCT-II matrix and V a random signed
    permutation: dense entries with a planted spectrum, built in O(n²) (no n × n QR)."""
    import scipy.fft

    rng = np.random.default_rng(seed)
    u = scipy.fft.dct(np.eye(n), norm="ortho", axis=0)
    x = (u * sigma)[:, rng.permutation(n)] * rng.choice([-1.0, 1.0], n)
    return torch.from_numpy(np.ascontiguousarray(x))


def spectral_norm_of(e: torch.Tensor) -> float:
    """‖E‖_2 = sqrt(λ_max(EᵀE)), in float64 (σ_1 is accurate on the Gram route at any κ)."""
    return float(spectra.svdvals(e, method="gram")[0])


@pytest.mark.parametrize("width", [64, 512, pytest.param(2048, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", list(HALF))
def test_full_rank_kappa_10_stored_in_half_precision(dtype, width):
    """κ = 10, full rank, stored in bf16 / fp16: full numerical rank and cn equal to the
    planted 10 within Weyl's bound of the actual storage perturbation E = fl(X) − X:
    cn ∈ [(σ_1 − ‖E‖_2)/(σ_k + ‖E‖_2), (σ_1 + ‖E‖_2)/(σ_k − ‖E‖_2)]. The former rule
    (0.25·max(m, n)·eps·σ_1) reached σ_1 at these widths for bf16 (512, 2048) and read rank 0."""
    dt = HALF[dtype]
    sigma = np.geomspace(1.0, 0.1, width)
    exact = dct_matrix_with_spectrum(width, sigma, seed=width)
    x = exact.to(dt)
    got = spectra_and_metrics(C.dense(x.double(), stored=dt))
    e = spectral_norm_of(x.double() - exact)
    assert e <= eps_of(dt) / 2 * float(torch.linalg.norm(exact))  # ‖E‖_2 ≤ u·‖X‖_F
    assert got["numerical_rank"] == width and got["rank_deficit"] == 0
    lo, hi = (1 - e) / (0.1 + e), (1 + e) / (0.1 - e)
    assert lo <= got["cn"] <= hi and got["cn_nz"] == got["cn"]
    assert got["tol"] == pytest.approx(tol_by_hand(width, width, eps_of(dt),
                                                   float(torch.linalg.norm(x.double())),
                                                   float(got["sigma"][0])), rel=1e-12)
    assert got["sigma"][-1] > got["tol"] > e  # the rounding noise's size sits below tol
    if dtype == "bfloat16" and width >= 512:
        assert 0.25 * width * eps_of(dt) >= 1  # the former rule's tolerance ≥ σ_1


def test_rank_r_stored_in_bf16_at_width_1024():
    """A rank-4 matrix (of k = 1024) stored in bf16: rank 4, cn = inf, cn_nz = σ_1/σ_4 of the
    unrounded float64 matrix within Weyl's bound of the storage perturbation."""
    left, right = planted_factors(1024, 1024, SIGMA, seed=5)
    exact = left @ right
    x = exact.to(torch.bfloat16)
    got = spectra_and_metrics(C.dense(x.double(), stored=torch.bfloat16))
    e = spectral_norm_of(x.double() - exact)
    assert got["numerical_rank"] == 4 and got["rank_deficit"] == 1020
    assert got["cn"] == math.inf
    s1, s4 = SIGMA[0], SIGMA[3]
    assert (s1 - e) / (s4 + e) <= got["cn_nz"] <= (s1 + e) / (s4 - e)
    assert got["sigma"][4] <= e < got["tol"] < got["sigma"][3]  # noise ≤ ‖E‖_2 < tol


def test_gradient_ov_noise_pairs_each_factor_with_what_it_multiplies():
    """The whole-layer OV gradient O·dV + dO·V (float32 weights and gradients, gradients 1e-4
    of the weights): S is the sum of the two terms' product bounds, so the rounding of O is
    weighed against dV, not V. Its numerical rank is the float64 reference's full rank 2·n_kv·hd
    = d; the concatenated factors [O, dO]·[dV; V] would put the tolerance at the scale of
    ‖O‖·‖V‖, 1e4 times too high, and call most of it zero."""
    from dynlab.runs.checkpoints import ModelSpec
    from dynlab.testing import random_weights

    spec = ModelSpec(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, activation_hidden_dim=8,
                     vocab_size=8)
    w = random_weights(spec, torch.Generator().manual_seed(6))
    g = {k: v * 1e-4 for k, v in random_weights(spec, torch.Generator().manual_seed(7)).items()}
    comp = C.grad_components(g, w, spec)[C.Site("layer", (0, C.MATRICES.index("ov_circuit")))]
    o, v = (w[f"layers.0.attention.{p}.weight"].double().numpy() for p in ("o_proj", "v_proj"))
    do, dv = (g[f"layers.0.attention.{p}.weight"].double().numpy() for p in ("o_proj", "v_proj"))

    def o_sum(x):  # heads 0, 1 share v group 0; heads 2, 3 group 1 (hd = 8)
        return np.concatenate([x[:, 0:8] + x[:, 8:16], x[:, 16:24] + x[:, 24:32]], axis=1)

    bound = hand_product_norm

    want = bound(o_sum(o), dv) + bound(o_sum(do), v)
    assert comp.storage_norm == pytest.approx(want, rel=1e-12)
    exact = o_sum(o) @ dv + o_sum(do) @ v
    assert np.linalg.matrix_rank(exact) == 32
    got = spectra_and_metrics(comp)
    assert got["numerical_rank"] == 32 and got["cn"] < math.inf
    ref = scipy.linalg.svdvals(exact)
    assert got["cn"] == pytest.approx(ref[0] / ref[-1], rel=1e-6)
    concat = bound(np.concatenate([o_sum(o), o_sum(do)], axis=1), np.concatenate([dv, v]))
    s = torch.from_numpy(got["sigma"])
    assert metrics_mod.numerical_rank(s, 32, comp.eps, min_dim=32, norm=concat) < 32
