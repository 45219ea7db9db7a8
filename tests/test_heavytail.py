"""dynlab.analysis.heavytail against the `powerlaw` package (2.0.0) and hand computations."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dynlab.analysis import heavytail as H

powerlaw = pytest.importorskip("powerlaw", reason="powerlaw==2.0.0 is a dev dependency")

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


def pareto(n, alpha, seed, xmin=1.0):
    """Samples of p(x) ∝ x^(−alpha), x ≥ xmin (inverse CDF)."""
    u = np.random.default_rng(seed).uniform(size=n)
    return xmin * (1 - u) ** (-1.0 / (alpha - 1))


def powerlaw_fit(lam):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(lam, verbose=False)


def assert_matches_powerlaw(lam):
    """Every candidate powerlaw fits in closed form (α in (1.5, 3]) has our α and D, and
    when our best candidate is one of those, both pick the same x_min."""
    fit = powerlaw_fit(lam)
    res = fit.xmin_fitting_results
    xmins, alphas, dists, _ = H.candidate_fits(lam)
    np.testing.assert_array_equal(xmins, res["xmins"])
    # powerlaw keeps the closed-form α when it lies in (1.5, 3], else refits numerically
    closed = (alphas > 1.5) & (alphas <= 3)
    assert closed.sum() >= 3
    np.testing.assert_allclose(alphas[closed], res["alphas"][closed], rtol=1e-10)
    np.testing.assert_allclose(dists[closed], res["distances"][closed], rtol=1e-9)
    ours = H.fit_power_law(lam)
    if 1.5 < ours.alpha <= 3:
        assert ours.xmin == fit.xmin
        assert ours.alpha == pytest.approx(fit.alpha, rel=1e-10)
        assert ours.ks == pytest.approx(fit.D, rel=1e-9)
        assert ours.n_tail == fit.n_tail
    return ours


@pytest.mark.parametrize("alpha,seed", [(2.0, 0), (2.5, 1), (2.9, 2)])
def test_pareto_spectra_match_powerlaw(alpha, seed):
    # a bulk below 1 and a Pareto tail above, as in a heavy-tailed ESD
    rng = np.random.default_rng(seed + 100)
    lam = np.concatenate([rng.uniform(0.05, 0.9, size=150), pareto(300, alpha, seed)])
    ours = assert_matches_powerlaw(lam)
    assert ours.alpha == pytest.approx(alpha, abs=0.3)
    assert ours.xmin >= 0.5 and ours.n_tail >= 100


def test_mle_and_ks_by_hand():
    tail = np.array([1.0, 2.0, 4.0])
    a = 1 + 3 / (math.log(1) + math.log(2) + math.log(4))
    assert H.mle_alpha(tail, 1.0) == pytest.approx(a, rel=1e-14)
    f = [1 - (x / 1.0) ** (1 - a) for x in tail]
    d = max(abs(f[0] - 0), abs(f[1] - 1 / 3), abs(f[2] - 2 / 3))
    assert H.ks_distance(tail, 1.0, a) == pytest.approx(d, rel=1e-14)


def test_few_and_zero_eigenvalues():
    assert math.isnan(H.fit_spectrum(np.sqrt(pareto(9, 2.5, 3))).alpha)  # 9 < MIN_EIGENVALUES
    assert H.MIN_EIGENVALUES == 10
    assert math.isfinite(H.fit_spectrum(np.sqrt(pareto(10, 2.5, 3))).alpha)
    # numerically zero singular values (a rank-deficient matrix) are dropped, not fitted
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 12, generator=g, dtype=torch.float64) @ torch.randn(
        12, 60, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(w).numpy()
    assert (s[12:] < 1e-10 * s[0]).all()
    lam = H.eigenvalues(s, 60)
    assert lam.size == 12
    assert H.fit_spectrum(s, 60) == H.fit_power_law(s[:12] ** 2)
    assert math.isnan(H.fit_spectrum(np.zeros(30)).alpha)
    assert math.isnan(H.fit_spectrum(np.full(30, np.nan)).alpha)


def test_batched_metrics_equal_single_fits():
    rows = [np.sqrt(pareto(40, 2.5, 4)), np.sqrt(pareto(25, 3.5, 5))]
    sigma = torch.full((3, 40), math.nan, dtype=torch.float64)
    for i, r in enumerate(rows):
        sigma[i, : r.size] = torch.from_numpy(np.sort(r)[::-1].copy())
    # the tolerance fit_spectrum uses by default: k·eps·σ_1 (k the number of singular values)
    eps = np.finfo(np.float64).eps
    tol = torch.tensor([r.size * eps * r.max() for r in rows] + [0.0], dtype=torch.float64)
    a, ks, nt = H.alpha(sigma, tol), H.alpha_ks(sigma, tol), H.alpha_n_tail(sigma, tol)
    for i, r in enumerate(rows):
        fit = H.fit_spectrum(r)
        assert (a[i].item(), ks[i].item(), nt[i].item()) == (fit.alpha, fit.ks, fit.n_tail)
    assert math.isnan(a[2]) and math.isnan(ks[2]) and math.isnan(nt[2])


@pytest.fixture(scope="module")
def trained_weights():
    """A small PicoDecoder trained for 60 steps on tiny Shakespeare (characters)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    from dynlab.model import ModelConfig, PicoDecoder

    text = SHAKESPEARE.read_text()[:200_000]
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lookup[c] for c in text[:50_000]], dtype=torch.long)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = ModelConfig(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                      activation_hidden_dim=128, vocab_size=len(chars), max_seq_len=64)
    model = PicoDecoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        start = torch.randint(0, ids.numel() - 65, (8,), generator=g)
        batch = torch.stack([ids[s:s + 65] for s in start])
        logits = model(batch[:, :-1])
        logits = logits[0] if isinstance(logits, tuple) else logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return {k: v.detach().double() for k, v in model.state_dict().items() if v.ndim == 2}


@pytest.mark.slow
def test_real_weight_spectra_match_powerlaw(trained_weights):
    checked = 0
    for name in ("layers.0.swiglu.w_0.weight", "layers.0.swiglu.w_2.weight",
                 "layers.0.attention.q_proj.weight"):
        w = trained_weights[name]
        s = torch.linalg.svdvals(w).numpy()
        lam = H.eigenvalues(s, max(w.shape))
        assert lam.size == 64
        assert_matches_powerlaw(lam)
        checked += 1
    assert checked == 3
