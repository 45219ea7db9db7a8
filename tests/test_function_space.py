"""dynlab.function_space against independent references: numpy's eigvalsh of dense Hessians
built column by column with autograd, quadratics with known spectra and barriers, per-example
gradients taken one at a time, attention weights computed by hand and transformers' own
output_attentions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import tiny_model_config

from dynlab.analysis import dynamics as D
from dynlab.function_space import attention as A
from dynlab.function_space import curvature as C
from dynlab.function_space import landscape as L
from dynlab.function_space import noise as N
from dynlab.function_space import updates as U
from dynlab.model.pico_decoder import PicoDecoder


def known_spectrum(eigs, seed=0):
    """A symmetric matrix Q·diag(eigs)·Qᵀ (float64, Q random orthogonal)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


def matvec_of(h: np.ndarray):
    ht = torch.from_numpy(h)
    return lambda v: ht @ v.double()


def micro_model(seed=0, vocab=6, **kw) -> PicoDecoder:
    """A PicoDecoder small enough for a dense Hessian (156 parameters), in float64."""
    torch.manual_seed(seed)
    cfg = tiny_model_config(vocab_size=vocab, max_seq_len=16, d_model=4, n_layers=1,
                            n_heads=2, n_kv_heads=1, activation_hidden_dim=4) \
        if not kw else tiny_model_config(vocab_size=vocab, max_seq_len=16, **kw)
    return PicoDecoder(cfg).double().eval()


def tokens(n=3, t=7, vocab=6, seed=1):
    return torch.randint(0, vocab, (n, t + 1), generator=torch.Generator().manual_seed(seed))


def dense_hessian(loss_fn, params) -> np.ndarray:
    """The Hessian column by column: ∂(∂L/∂θ_i)/∂θ by autograd for every i (no HVP)."""
    loss = loss_fn()
    g = C.flatten(torch.autograd.grad(loss, params, create_graph=True))
    rows = [C.flatten(torch.autograd.grad(g[i], params, retain_graph=True)).numpy()
            for i in range(g.numel())]
    return np.asarray(rows)


# ---------------------------------------------------------------------------- Lanczos


@pytest.mark.parametrize("eigs", [
    [5.0, 3.0, 2.0, 1.0, 0.5, -0.2, -4.0, 0.0],       # indefinite, with a zero
    [1e6, 1e2, 1.0, 1e-3, 1e-6, 0.0],                  # huge condition number
    [2.0, 2.0, 2.0, 1.0, 0.0, 0.0],                    # repeated and rank-deficient
])
def test_lanczos_full_space_equals_eigvalsh(eigs):
    h = known_spectrum(eigs)
    res = C.lanczos(matvec_of(h), len(eigs), k=3, iters=len(eigs), seed=3, dtype=torch.float64)
    want = np.linalg.eigvalsh(h)[::-1][:3]
    distinct = len(set(eigs)) < len(eigs)
    if distinct:  # a Krylov space holds one vector per distinct eigenvalue: the top ones
        assert res.eigenvalues[0].item() == pytest.approx(want[0], rel=1e-10)
    else:
        np.testing.assert_allclose(res.eigenvalues.numpy(), want, rtol=1e-9, atol=1e-9 * max(
            abs(e) for e in eigs))


def test_lanczos_edges():
    zero = C.lanczos(lambda v: torch.zeros_like(v), 5, k=2, dtype=torch.float64)
    assert zero.eigenvalues[0].item() == 0.0 and zero.iterations == 1
    one = C.lanczos(lambda v: 7.0 * v, 1, k=2, dtype=torch.float64)
    assert one.eigenvalues[0].item() == pytest.approx(7.0)
    assert math.isnan(one.eigenvalues[1].item())  # fewer eigenvalues than asked: NaN
    nan = C.lanczos(lambda v: v * float("nan"), 4, k=1, dtype=torch.float64)
    assert math.isnan(nan.eigenvalues[0].item())
    a = C.lanczos(matvec_of(known_spectrum([3, 2, 1, 0.5])), 4, k=2, seed=5, iters=3)
    b = C.lanczos(matvec_of(known_spectrum([3, 2, 1, 0.5])), 4, k=2, seed=5, iters=3)
    assert torch.equal(a.eigenvalues, b.eigenvalues)  # same seed, same bits


@pytest.fixture(scope="module")
def hessian_case():
    """A tiny model, a batch and its dense Hessian (column by column)."""
    model, batch = micro_model(seed=2), tokens(seed=4)
    with D.math_attention():
        h = dense_hessian(lambda: D.lm_loss(model, batch), list(model.parameters()))
    return model, batch, h


def test_lanczos_on_a_model_hessian_equals_dense_eigvalsh(hessian_case):
    model, batch, h = hessian_case
    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    with D.math_attention():
        mv = C.hvp_operator(lambda: D.lm_loss(model, batch), params)
        res = C.lanczos(mv, dim, k=4, iters=80, seed=0, dtype=torch.float64)
    np.testing.assert_allclose(h, h.T, atol=1e-6)
    want = np.linalg.eigvalsh((h + h.T) / 2)[::-1][:4]
    np.testing.assert_allclose(res.eigenvalues.numpy(), want, rtol=1e-5)


def test_layer_sharpness_equals_dense_block(hessian_case):
    model, batch, h = hessian_case
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    cols = np.concatenate([[n.startswith("layers.0.")] * s for n, s in zip(names, sizes,
                                                                          strict=True)])
    block = h[np.ix_(cols, cols)]
    opt = D.DynamicsOptions(iters=int(cols.sum()), layer_sharpness=True)
    with D.math_attention():
        got = D.layer_sharpness(model, batch, opt)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(np.linalg.eigvalsh((block + block.T) / 2)[-1], rel=1e-6)


def test_preconditioned_sharpness_equals_dense(hessian_case):
    model, batch, h = hessian_case
    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    v = torch.rand(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 4
    p = C.adam_preconditioner(v * 1e-4, step=7, betas=(0.9, 0.999), eps=1e-8)
    with D.math_attention():
        mv = C.hvp_operator(lambda: D.lm_loss(model, batch), params)
        res = C.lanczos(C.preconditioned(mv, p), dim, k=1, iters=120, dtype=torch.float64)
    s = 1 / np.sqrt(p.numpy())
    want = np.linalg.eigvalsh(s[:, None] * ((h + h.T) / 2) * s[None, :])[-1]
    assert res.eigenvalues[0].item() == pytest.approx(want, rel=1e-6)
    # and the eigenvalues of P⁻¹H itself (non-symmetric) by numpy: the same top one
    assert np.max(np.linalg.eigvals(h / p.numpy()[:, None]).real) == pytest.approx(want,
                                                                                    rel=1e-6)


def test_adam_preconditioner_and_threshold():
    v = torch.tensor([4e-6, 0.0])
    p = C.adam_preconditioner(v, step=1, betas=(0.9, 0.999), eps=1e-8)
    # v̂ = v / (1 − 0.999), P = (1 − 0.9²)·(√v̂ + ε)
    np.testing.assert_allclose(p.numpy(), 0.19 * (np.sqrt(v.double().numpy() / 0.001) + 1e-8))
    assert C.adaptive_eos_threshold(1e-3, 0.9) == pytest.approx(38_000.0)
    assert C.adaptive_eos_threshold(0.1, 0.0) == pytest.approx(20.0)  # 2/η: plain GD's 2/η
    assert math.isnan(C.adaptive_eos_threshold(0.0, 0.9))


# ---------------------------------------------------------------------------- Hutchinson


def test_hutchinson_within_its_standard_error_and_converging():
    h = known_spectrum([4.0, 3.0, -1.0, 0.5, 2.0, 0.0, 1.0, -2.0], seed=3)
    few = C.hutchinson(matvec_of(h), 8, probes=16, seed=1, dtype=torch.float64)
    many = C.hutchinson(matvec_of(h), 8, probes=1024, seed=1, dtype=torch.float64)
    tr = float(np.trace(h))
    assert abs(few.trace - tr) <= 3 * few.stderr
    assert abs(many.trace - tr) <= 3 * many.stderr
    assert many.stderr < few.stderr / 4  # ≈ 1/√n: 8× fewer at 64× the probes
    # Var(zᵀHz) = 2·Σ_{i≠j} H_ij² for Rademacher z: the SE estimates it
    sd = math.sqrt(2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2)))
    assert many.stderr * math.sqrt(1024) == pytest.approx(sd, rel=0.1)
    diag = C.hutchinson(matvec_of(np.diag([1.0, -2.0, 5.0])), 3, probes=4, dtype=torch.float64)
    assert diag.trace == 4.0 and diag.stderr == 0.0  # exact for a diagonal H
    one = C.hutchinson(matvec_of(np.eye(2)), 2, probes=1, dtype=torch.float64)
    assert one.trace == 2.0 and math.isnan(one.stderr)


def test_hutchinson_on_a_model_hessian(hessian_case):
    model, batch, h = hessian_case
    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    tr = float(np.trace(h))
    with D.math_attention():
        mv = C.hvp_operator(lambda: D.lm_loss(model, batch), params)
        est = C.hutchinson(mv, dim, probes=64, seed=2, dtype=torch.float64)
    assert abs(est.trace - tr) <= 3 * est.stderr


# ---------------------------------------------------------------------------- barrier


def test_barrier_of_a_quadratic_is_closed_form():
    # L(θ) = ½(θ − c)ᵀM(θ − c): along θ(α) = a + α·d, L − chord = −½·α(1 − α)·dᵀMd, so the
    # barrier is max(0, −dᵀMd / 8) (at α = ½, on the 11-point grid)
    m = known_spectrum([3.0, -2.0, 1.0, -5.0], seed=7)
    c = np.array([0.3, -1.0, 2.0, 0.5])

    def loss_at(p):
        x = p["w"].double().numpy() - c
        return 0.5 * x @ m @ x

    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.standard_normal(4), rng.standard_normal(4)
        alphas = L.alpha_grid(11)
        losses = L.line_losses(loss_at, {"w": torch.from_numpy(a)}, {"w": torch.from_numpy(b)},
                               alphas)
        d = b - a
        assert L.barrier(losses, alphas) == pytest.approx(max(0.0, -(d @ m @ d) / 8),
                                                          abs=1e-12)
        mid = losses[5] - 0.5 * (losses[0] + losses[-1])
        assert mid == pytest.approx(-(d @ m @ d) / 8, abs=1e-12)


def test_barrier_edges():
    al = L.alpha_grid(3)
    assert math.isnan(L.barrier([1.0, float("nan"), 2.0], al))
    assert math.isnan(L.barrier([1.0, float("inf"), 2.0], al))
    assert L.barrier([1.0, 1.5, 2.0], al) == 0.0
    with pytest.raises(ValueError):
        L.barrier([1.0, 2.0], [0.0, 0.5])
    with pytest.raises(ValueError):
        L.alpha_grid(1)
    with pytest.raises(ValueError):
        L.interpolate({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, 0.5)
    bf = L.interpolate({"w": torch.ones(2, dtype=torch.bfloat16)},
                       {"w": torch.full((2,), 3.0, dtype=torch.bfloat16)}, 0.25)
    assert bf["w"].dtype == torch.float32 and bf["w"].tolist() == [1.5, 1.5]


def test_line_between_two_models_ends_at_their_losses():
    a, b, batch = micro_model(seed=1), micro_model(seed=2), tokens(seed=3)
    out = D.line(a, batch, a.state_dict(), b.state_dict(), 5)
    mid = {k: (a.state_dict()[k] + b.state_dict()[k]) / 2 for k in a.state_dict()}
    c = micro_model()
    c.load_state_dict(mid)
    with torch.no_grad():
        want = [float(D.lm_loss(m, batch)) for m in (a, c, b)]
    # (the model's logits are float32 whatever its dtype: equal to float32 rounding)
    np.testing.assert_allclose(out["line_loss"][[0, 2, 4]], want, rtol=1e-6)


# ---------------------------------------------------------------------------- noise scale


def per_example_grads(model, batch) -> np.ndarray:
    """(n, dim) gradients of each sequence's mean loss, one sequence at a time."""
    rows = []
    for row in batch:
        model.zero_grad()
        loss = F.cross_entropy(model(row[None, :-1])[0], row[1:])
        loss.backward()
        rows.append(np.concatenate([p.grad.reshape(-1).numpy() for p in model.parameters()]))
    return np.asarray(rows)


def test_b_simple_against_per_example_gradients():
    model, batch = micro_model(seed=3), tokens(n=6, seed=9)
    g = per_example_grads(model, batch)
    n = g.shape[0]
    mean = g.mean(0)
    trace_sigma = np.sum((g - mean) ** 2) / (n - 1)  # unbiased covariance trace
    grad_sq = mean @ mean - trace_sigma / n  # unbiased |G|²: E|Ḡ|² = |G|² + tr Σ / n
    out = D.gradient_noise(model, batch, 1)
    assert out["gns_trace_sigma"] == pytest.approx(trace_sigma, rel=1e-10)
    assert out["gns_grad_sq"] == pytest.approx(grad_sq, rel=1e-10)
    assert out["gns_b_simple"] == pytest.approx(trace_sigma / grad_sq, rel=1e-10)
    names = [nm for nm, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    cols = np.concatenate([[nm.startswith("layers.0.")] * s for nm, s in zip(names, sizes,
                                                                            strict=True)])
    gl = g[:, cols]
    tl = np.sum((gl - gl.mean(0)) ** 2) / (n - 1)
    ml = gl.mean(0)
    assert out["layer_gns_b_simple"][0] == pytest.approx(tl / (ml @ ml - tl / n), rel=1e-10)


def test_noise_scale_from_two_batch_sizes():
    # micro-batches of 2 examples: |G_small|² mean over micro-batches, |G_big|² of their mean
    rng = np.random.default_rng(0)
    g = rng.standard_normal((8, 5)) + np.array([1.0, 0, 0, 2.0, 0])
    micro = [{"w": torch.from_numpy(g[2 * i: 2 * i + 2].mean(0))} for i in range(4)]
    res = N.micro_batch_noise(micro, 2, {"all": ["w"]})["all"]
    small = np.mean([np.sum(g[2 * i: 2 * i + 2].mean(0) ** 2) for i in range(4)])
    big = np.sum(g.mean(0) ** 2)
    g2 = (8 * big - 2 * small) / 6
    s = (small - big) / (1 / 2 - 1 / 8)
    assert res.grad_sq == pytest.approx(g2) and res.trace_sigma == pytest.approx(s)
    assert res.b_simple == pytest.approx(s / g2)
    with pytest.raises(ValueError):
        N.noise_scale(1.0, 1.0, 4, 4)
    with pytest.raises(ValueError):
        N.micro_batch_noise(micro[:1], 2, {"all": ["w"]})
    zero = N.noise_scale(2.0, 1.0, 1, 2)  # |G|² estimate 0, tr Σ 2: B_simple infinite
    assert zero.grad_sq == 0.0 and zero.trace_sigma == 2.0 and zero.b_simple == math.inf


# ---------------------------------------------------------------------------- attention


def attention_by_hand(model: PicoDecoder, ids: torch.Tensor) -> list[np.ndarray]:
    """Each layer's attention weights (B, H, T, T) in float64 numpy, written out: RMSNorm,
    RoPE on consecutive pairs as complex rotations, q·k/√hd, causal softmax."""
    cfg = model.config
    hd = cfg.head_dim
    out = []
    x = model.embedding_proj.weight.detach().double().numpy()[ids.numpy()]
    t = ids.shape[1]
    angles = np.arange(t)[:, None] * cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)
    rot = np.exp(1j * angles)
    for block in model.layers:
        w = {n: p.detach().double().numpy() for n, p in block.named_parameters()}
        h = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * w[
            "attention_norm.weight"]
        q = (h @ w["attention.q_proj.weight"].T).reshape(*h.shape[:2], cfg.n_heads, hd)
        k = (h @ w["attention.k_proj.weight"].T).reshape(*h.shape[:2], cfg.n_kv_heads, hd)
        qc = (q[..., 0::2] + 1j * q[..., 1::2]) * rot[None, :, None, :]
        kc = (k[..., 0::2] + 1j * k[..., 1::2]) * rot[None, :, None, :]
        group = cfg.n_heads // cfg.n_kv_heads
        probs = np.zeros((ids.shape[0], cfg.n_heads, t, t))
        for hh in range(cfg.n_heads):
            qh, kh = qc[:, :, hh], kc[:, :, hh // group]
            s = (qh.real @ kh.real.transpose(0, 2, 1) + qh.imag @ kh.imag.transpose(0, 2, 1))
            s = s / np.sqrt(hd) + np.triu(np.full((t, t), -np.inf), 1)
            e = np.exp(s - s.max(-1, keepdims=True))
            probs[:, hh] = e / e.sum(-1, keepdims=True)
        out.append(probs)
        with torch.no_grad():
            cos, sin = model.rope_cos[:t], model.rope_sin[:t]
            x = block(torch.from_numpy(x), cos, sin).numpy()
    return out


def entropy_ref(p):
    with np.errstate(divide="ignore", invalid="ignore"):
        e = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return e[:, :, 1:].mean(axis=(0, 2))


def test_pico_attention_against_hand_computation():
    model = micro_model(seed=4, vocab=6, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                        activation_hidden_dim=24)
    ids = tokens(n=5, t=9, seed=2)[:, :-1]
    ref = attention_by_hand(model, ids)
    stats = A.pico_attention_stats(model, ids, chunk=2)
    for layer, p in enumerate(ref):
        np.testing.assert_allclose(stats["attn_entropy"][layer].numpy(), entropy_ref(p),
                                   rtol=1e-5)
        sink = p[:, :, 1:, 0].mean(axis=(0, 2))
        np.testing.assert_allclose(stats["sink_score"][layer].numpy(), sink, rtol=1e-5)
        assert stats["sink_rate"][layer].item() == np.mean(sink > 0.3)
    hidden = []
    hooks = [b.register_forward_hook(lambda m, a, o: hidden.append(o.abs().reshape(-1)))
             for b in model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for layer, h in enumerate(hidden):
        a = h.numpy()
        assert stats["massive_ratio"][layer].item() == pytest.approx(
            a.max() / np.median(a), rel=1e-6)


def test_attention_reductions_edges():
    p = torch.zeros(1, 2, 3, 3)
    p[0, :, :, 0] = 1.0  # every query attends to the first token only
    assert A.attention_entropy(p).tolist() == [0.0, 0.0]
    assert A.sink_scores(p).tolist() == [1.0, 1.0]
    u = torch.tril(torch.ones(3, 3)) / torch.arange(1, 4)[:, None]
    e = A.attention_entropy(u[None, None])
    assert e.item() == pytest.approx((math.log(2) + math.log(3)) / 2)
    assert A.sink_rate(torch.tensor([0.31, 0.3, 0.1, 0.9])) == 0.5
    assert math.isnan(A.sink_rate(torch.tensor([float("nan"), 1.0])))
    assert math.isnan(A.attention_entropy(torch.ones(1, 1, 1, 1)).item())  # T = 1
    assert A.massive_ratio(torch.tensor([1.0, -2.0, 100.0])) == 50.0
    assert A.massive_ratio(torch.zeros(4)) != A.massive_ratio(torch.zeros(4))  # NaN
    assert A.massive_ratio(torch.tensor([0.0, 0.0, 3.0])) == math.inf
    assert math.isnan(A.massive_ratio(torch.tensor([1.0, float("nan")])))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_hf_attention_against_output_attentions(arch):
    hf = pytest.importorskip("hf_fixtures")
    model = hf.tiny_model(arch).eval()
    model.config._attn_implementation = "eager"
    ids = hf.batch(seed=1, n=3)
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    stats = A.hf_attention_stats(model, ids, chunk=2)
    for layer, a in enumerate(out.attentions):
        p = a.double().numpy()
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(stats["attn_entropy"][layer].numpy(), entropy_ref(p),
                                   rtol=1e-5)
        np.testing.assert_allclose(stats["sink_score"][layer].numpy(),
                                   p[:, :, 1:, 0].mean(axis=(0, 2)), rtol=1e-5)
        h = out.hidden_states[layer + 1].abs().numpy()
        assert stats["massive_ratio"][layer].item() == pytest.approx(h.max() / np.median(h),
                                                                     rel=1e-6)


# ---------------------------------------------------------------------------- updates


def test_update_ratio():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    want = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert U.update_ratio(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(want)
    assert U.update_ratio(torch.zeros(2), torch.ones(2)) == math.inf
    assert math.isnan(U.update_ratio(torch.zeros(2), torch.zeros(2)))
    got = U.ratio_from_norms(np.array([1.0, 2.0, np.nan]), np.array([4.0, 0.0, 1.0]))
    assert got[0] == 0.25 and np.isnan(got[1]) and np.isnan(got[2])
