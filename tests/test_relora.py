"""pico-relora: wrapping, merge-and-reset, moment pruning, paper-compat, schedules, the
gradient with respect to the effective weight, and the memory-efficient LoRA branch (values,
gradients, gradcheck, autocast, saved-activation memory)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from builders import tiny_model_config

from dynlab.model import ModelConfig, PicoDecoder
from dynlab.model.relora import (
    TARGET_MODULES,
    LoRABranch,
    ReLoRAConfig,
    ReLoRALinear,
    draw_dropout_seed,
    dropout_mask,
    effective_state_dict,
    lora_parameters,
    magnitude_prune_,
    merge_and_reset,
    relora_modules,
    unwrap,
    wrap_relora,
)
from dynlab.runs.config import reset_due
from dynlab.training.dynamics import learning_dynamics
from dynlab.training.schedules import (
    PAPER_COSINE_HORIZON,
    jagged_cosine,
    linear_warmup_decay,
    lr_multiplier,
)

CFG = tiny_model_config(vocab_size=29, max_seq_len=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(seed: int = 0, **kw) -> tuple[PicoDecoder, PicoDecoder]:
    """(plain decoder, relora-wrapped copy of it)."""
    torch.manual_seed(seed)
    plain = PicoDecoder(CFG)
    wrapped = wrap_relora(copy.deepcopy(plain), ReLoRAConfig(r=4, alpha=8.0, **kw))
    return plain, wrapped


def _ids(seed: int = 1, n: int = 3, t: int = 10) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))


def _train(model, steps: int = 3, lr: float = 1e-2) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        opt.zero_grad()
        _loss(model, _ids(10 + i)).backward()
        opt.step()
    return opt


def test_wraps_every_projection_and_freezes_only_them():
    _, model = _pair()
    mods = relora_modules(model)
    assert sorted(mods) == sorted(f"layers.{i}.{t}" for i in range(2) for t in TARGET_MODULES)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{m}.weight" for m in mods}
    assert {n for n in trainable if "lora" not in n} == {
        "embedding_proj.weight", "output_norm.weight", "de_embedding_proj.weight",
        *(f"layers.{i}.{n}_norm.weight" for i in range(2) for n in ("attention", "swiglu"))}
    q = mods["layers.0.attention.q_proj"]
    assert q.lora_A.shape == (4, 16) and q.lora_B.shape == (16, 4) and q.scale == 2.0
    # Kaiming-uniform(a=√5): bound = sqrt(6 / ((1 + 5) · fan_in)) = 1 / sqrt(fan_in)
    assert q.lora_A.abs().max() <= 1 / math.sqrt(16) and q.lora_A.abs().min() > 0
    assert q.lora_A.std() > 0.5 / math.sqrt(3 * 16)
    assert torch.count_nonzero(q.lora_B) == 0


def test_relora_at_init_computes_the_decoder_function_exactly():
    plain, model = _pair()
    ids = _ids()
    plain.eval()
    assert torch.equal(model.eval()(ids), plain(ids))
    model.train()  # dropout on the LoRA branch cannot matter while B = 0
    assert torch.equal(model(ids), plain(ids))


def test_merge_and_reset_keeps_function_and_resets_factors_and_moments():
    _, model = _pair(dropout=0.0, prune_ratio=0.5, prune_method="magnitude")
    opt = _train(model)
    model.eval()
    ids = _ids(3)
    before = model(ids).detach()
    mods = relora_modules(model)
    eff_before = {n: m.effective_weight().detach().clone() for n, m in mods.items()}
    A_before = {n: m.lora_A.detach().clone() for n, m in mods.items()}
    lora = lora_parameters(model)
    moments = {id(p): {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
               for p in model.parameters() if p.requires_grad}
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in mods.values())

    merge_and_reset(model, opt, model.relora_config)

    torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-6)
    for n, m in mods.items():
        torch.testing.assert_close(m.weight, eff_before[n], rtol=0, atol=1e-6)  # W ← W + s·BA
        assert torch.count_nonzero(m.lora_B) == 0
        assert not torch.equal(m.lora_A, A_before[n])
        assert m.lora_A.abs().max() <= 1 / math.sqrt(m.in_features)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = moments[id(p)][key], opt.state[p][key]
            if any(p is q for q in lora):  # magnitude 0.5: the smaller half zeroed, rest kept
                k = int(0.5 * old.numel())
                thr = old.abs().flatten().sort().values[k - 1]
                torch.testing.assert_close(new, torch.where(old.abs() > thr, old, 0.0))
            else:
                assert torch.equal(new, old)  # non-LoRA moments untouched


def test_random_pruning_keeps_about_one_minus_ratio():
    _, model = _pair(dropout=0.0)
    opt = _train(model, steps=2)
    torch.manual_seed(0)
    merge_and_reset(model, opt, model.relora_config)  # ratio 0.999 (default)
    kept = sum(int(torch.count_nonzero(opt.state[p]["exp_avg"])) for p in lora_parameters(model))
    total = sum(p.numel() for p in lora_parameters(model))
    assert kept <= 0.005 * total + 3  # expectation 0.001 · total (B's moments are dense)


def test_magnitude_prune_by_hand():
    t = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0])
    magnitude_prune_(t, 0.5)  # zero the 3 smallest |x|: 0.1, -0.2, 0.5
    assert torch.equal(t, torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0, 1.0]))


def test_merge_formula_by_hand_and_paper_compat_omits_scale():
    base = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
    A = torch.tensor([[1.0, 2.0, 3.0]])  # r = 1
    B = torch.tensor([[1.0], [-1.0]])
    BA = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])
    for paper, scale in ((False, 4.0), (True, 1.0)):
        m = ReLoRALinear(base, r=1, alpha=4.0)
        with torch.no_grad():
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
        m.merge_and_reinit(paper_compat=paper)
        assert torch.equal(m.weight, base.weight + scale * BA)


def test_paper_compat_leaves_wrapped_weights_unchanged_before_first_reset():
    plain, model = _pair(paper_compat=True)
    mods = relora_modules(model)
    assert all(torch.count_nonzero(m.lora_A) == 0 for m in mods.values())  # A = 0 at wrap
    W0 = {n: m.weight.detach().clone() for n, m in mods.items()}
    _train(model, steps=4, lr=1e-2)
    for n, m in mods.items():
        assert torch.equal(m.weight, W0[n])
        assert torch.count_nonzero(m.lora_A) == 0 and torch.count_nonzero(m.lora_B) == 0
        assert torch.equal(m.effective_weight(), W0[n])
    # ... while the full-rank parameters did learn
    assert not torch.equal(model.embedding_proj.weight, plain.embedding_proj.weight)
    # the first reset re-initialises A (Kaiming), so learning can begin
    merge_and_reset(model, None, model.relora_config)
    assert all(torch.count_nonzero(m.lora_A) > 0 for m in mods.values())


def test_effective_weight_gradient_equals_unwrapped_autograd():
    _, model = _pair(seed=3)
    with torch.no_grad():  # non-trivial factors
        for m in relora_modules(model).values():
            m.lora_B.normal_(0, 0.3)
    ids = _ids(5, n=4, t=12)
    grads, acts, loss = learning_dynamics(model, ids, torch.device("cpu"), activations=True,
                                          chunk_tokens=20)  # 2 chunks: tests accumulation
    plain = unwrap(model).eval()
    ref_loss = _loss(plain, ids)
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
    # factor gradients by the chain rule: dB = s·G·Aᵀ, dA = s·Bᵀ·G with G = dL/dW_eff
    for name, m in relora_modules(model).items():
        G = grads[f"{name}.weight"]
        torch.testing.assert_close(grads[f"{name}.lora_B"], m.scale * G @ m.lora_A.T.detach(),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads[f"{name}.lora_A"], m.scale * m.lora_B.T.detach() @ G,
                                   rtol=1e-4, atol=1e-6)
    # ... which equal autograd through the wrapped model itself (eval mode: no dropout)
    ref = copy.deepcopy(model).eval()
    _loss(ref, ids).backward()
    for name, m in relora_modules(ref).items():
        torch.testing.assert_close(grads[f"{name}.lora_A"], m.lora_A.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads[f"{name}.lora_B"], m.lora_B.grad, rtol=1e-4, atol=1e-6)
    # nothing of training state touched
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    # activations: each linear module's output at the last token of each sequence
    x = plain.embedding_proj(ids[:, :-1])
    h = plain.layers[0].attention_norm(x)
    torch.testing.assert_close(acts["layers.0.attention.q_proj"],
                               plain.layers[0].attention.q_proj(h)[:, -1].detach(),
                               rtol=1e-5, atol=1e-6)
    assert acts["de_embedding_proj"].shape == (4, CFG.vocab_size)


def test_effective_state_dict_layout():
    _, model = _pair()
    with torch.no_grad():
        for m in relora_modules(model).values():
            m.lora_B.normal_()
    state = effective_state_dict(model)
    m = relora_modules(model)["layers.1.swiglu.w_2"]
    torch.testing.assert_close(state["layers.1.swiglu.w_2.weight"],
                               m.weight + 2.0 * m.lora_B @ m.lora_A)
    assert state["layers.1.swiglu.w_2.lora_A"].shape == (4, 24)
    assert state["layers.1.swiglu.w_2.lora_B"].shape == (16, 4)
    plain_keys = {k for k in state if not k.endswith((".lora_A", ".lora_B"))}
    assert plain_keys == set(PicoDecoder(CFG).state_dict())


# ------------------------------------------------------------------ schedules (hand-computed)


def test_linear_warmup_decay_values():
    # warmup 10, total 110
    assert [linear_warmup_decay(t, 10, 110) for t in (0, 5, 10, 60, 110, 120)] == [
        0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


def test_jagged_cosine_values():
    f = lambda t: jagged_cosine(t, warmup=10, total=110, reset_every=50,  # noqa: E731
                                restart_warmup=5, min_lr_ratio=0.1)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)  # cosine starts at 1
    # t = 60: progress (60-10)/100 = 0.5 -> 0.1 + 0.9·0.5·(1 + cos(π/2)) = 0.55
    assert f(60) == pytest.approx(0.55)
    assert f(50) == 0.0 and f(100) == 0.0  # re-warmup starts from 0 at each reset
    # t = 52: 2/5 of the cosine at the end of the re-warmup (t = 55, progress 0.45):
    # 0.4 · (0.1 + 0.9 · 0.5 · (1 + cos(0.45π))) = 0.4 · (0.1 + 0.45 · 1.1564344650) = 0.2481582
    assert f(52) == pytest.approx(0.2481582, abs=1e-7)
    assert f(55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.45 * math.pi)))
    assert f(110) == pytest.approx(0.1)  # the floor at the end
    assert f(30) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)))


def test_paper_compat_horizon_and_reset_rule():
    kw = dict(kind="relora", warmup=10, total=110, reset_every=50, restart_warmup=5,
              min_lr_ratio=0.1)
    # dynlab: horizon = the run's steps; paper: 200 000 steps
    assert lr_multiplier(60, **kw) == pytest.approx(0.55)
    progress = (60 - 10) / (PAPER_COSINE_HORIZON - 10)
    assert lr_multiplier(60, paper_compat=True, **kw) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    assert lr_multiplier(60, kind="decoder", warmup=10, total=110) == 0.5
    dyn = [s for s in range(0, 111) if reset_due(s, 50, 10, 110, paper_compat=False)]
    paper = [s for s in range(0, 111) if reset_due(s, 50, 10, 110, paper_compat=True)]
    assert dyn == [50, 100]
    assert paper == [51, 101]
    assert [s for s in range(0, 30) if reset_due(s, 5, 12, 30, True)] == [16, 21, 26]


def test_bad_relora_config():
    with pytest.raises(ValueError, match="prune_method"):
        ReLoRAConfig(prune_method="top")
    with pytest.raises(ValueError, match="rank r"):
        ReLoRAConfig(r=0)
    with pytest.raises(ValueError, match="prune_ratio"):
        ReLoRAConfig(prune_ratio=1.5)


# ------------------------------------------------------------------ memory-efficient LoRA branch


def _lora_case(p: float, dtype: torch.dtype = torch.float64):
    """(ReLoRALinear 6 -> 5, r = 3, s = 2, with non-zero B; input x (2, 7, 6); cotangent w)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=False).to(dtype)
    m = ReLoRALinear(base, r=3, alpha=6.0, dropout=p)
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(5, 3, generator=gen, dtype=dtype))
    x = torch.randn(2, 7, 6, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 7, 5, generator=gen, dtype=dtype)
    return m, x, w


def _plain_reference(m: ReLoRALinear, x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor):
    """Plain autograd: W x + s · B A (mask ⊙ x); returns (y, d<y,w>/dx, /dA, /dB)."""
    xr, A, B = (t.detach().clone().requires_grad_() for t in (x, m.lora_A, m.lora_B))
    y = F.linear(xr, m.weight) + m.scale * F.linear(F.linear(xr * mask, A), B)
    return (y, *torch.autograd.grad((y * w).sum(), (xr, A, B)))


@pytest.mark.parametrize("mode", ["train", "p0", "eval"])
def test_lora_branch_equals_plain_autograd_with_the_same_mask(mode):
    """Dropout 0.1 in train mode (the mask regenerated from the seed the module drew), dropout
    0 in train mode, and eval mode: output and gradients (x, A, B) equal plain autograd."""
    p = 0.0 if mode == "p0" else 0.1
    m, x, w = _lora_case(p)
    m.train(mode != "eval")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    y = m(x)
    grads = torch.autograd.grad((y * w).sum(), (x, m.lora_A, m.lora_B))
    consumed = not torch.equal(torch.get_rng_state(), state)
    torch.set_rng_state(state)
    if mode == "train":
        mask = dropout_mask(x.shape, p, draw_dropout_seed(), x.device, x.dtype)
        values = set(mask.unique().tolist())
        assert values == {0.0, 1 / 0.9}  # inverted dropout, and both cases occur
    else:
        mask = torch.ones_like(x)
    assert consumed == (mode == "train")  # no mask, no RNG, with p = 0 or in eval mode
    ref = _plain_reference(m, x, mask, w)
    for got, want in zip((y, *grads), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if mode == "train":  # the mask mattered: without it the output differs
        no_mask = _plain_reference(m, x, torch.ones_like(x), w)[0]
        assert (y - no_mask).abs().max() > 1e-3


def test_dropout_mask_is_bernoulli_and_reproducible():
    p, n = 0.1, 200_000
    mask = dropout_mask(torch.Size([n]), p, 7, torch.device("cpu"), torch.float32)
    zeros = (mask == 0).float().mean().item()
    assert abs(zeros - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma
    assert torch.equal(mask[mask != 0], torch.full_like(mask[mask != 0], 1 / 0.9))
    again = dropout_mask(torch.Size([n]), p, 7, torch.device("cpu"), torch.float32)
    other = dropout_mask(torch.Size([n]), p, 8, torch.device("cpu"), torch.float32)
    assert torch.equal(mask, again) and not torch.equal(mask, other)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_branch_gradcheck(p):
    gen = torch.Generator().manual_seed(1)
    x, A, B = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
               for shape in ((2, 4, 5), (3, 5), (4, 3)))
    seed = 1234
    if p:  # the fixed seed gives a non-trivial mask
        assert (dropout_mask(x.shape, p, seed, x.device, x.dtype) == 0).any()
    assert torch.autograd.gradcheck(lambda x, A, B: LoRABranch.apply(x, A, B, 1.5, p, seed),
                                    (x, A, B))


def test_lora_branch_under_bf16_autocast():
    """Under autocast (here CPU bf16, standing in for the trainer's CUDA bf16) the branch
    returns bf16, gradients in the parameters' float32, equal to plain autograd under the
    same autocast with the same mask (forward bitwise, backward to bf16 precision)."""
    m, x, w = _lora_case(0.1, torch.float32)
    m.train()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    grads = torch.autograd.grad((y.float() * w).sum(), (x, m.lora_A, m.lora_B))
    torch.set_rng_state(state)
    mask = dropout_mask(x.shape, 0.1, draw_dropout_seed(), x.device, torch.float32)
    xr, A, B = (t.detach().clone().requires_grad_() for t in (x, m.lora_A, m.lora_B))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(xr, m.weight) + m.scale * F.linear(F.linear(xr * mask, A), B)
    ref_grads = torch.autograd.grad((ref.float() * w).sum(), (xr, A, B))
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    for got, want, t in zip(grads, ref_grads, (x, A, B), strict=True):
        assert got.dtype == t.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_relora_training_forward_is_deterministic_in_the_global_seed():
    _, model = _pair(dropout=0.1)
    with torch.no_grad():
        for m in relora_modules(model).values():
            m.lora_B.normal_()
    ids = _ids()
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(model(ids))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages (by data_ptr) autograd saves for backward in one
    training forward with the loss, parameters and buffers excluded."""
    constant = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in constant:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, ids)  # the graph (and every saved tensor) lives until return
    assert loss.requires_grad
    return sum(seen.values())


def test_relora_saves_no_more_activations_than_the_decoder():
    """With LoRA dropout 0.1 in train mode, relora keeps at most 2 % more bytes for backward
    than the decoder (the rank-r intermediates); plain autograd kept ~50 % more here (the
    dropout output and mask of every wrapped module)."""
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      activation_hidden_dim=128, vocab_size=29, max_seq_len=16)
    torch.manual_seed(0)
    plain = PicoDecoder(cfg)
    wrapped = wrap_relora(copy.deepcopy(plain), ReLoRAConfig(r=2, alpha=8.0, dropout=0.1))
    ids = _ids(n=2, t=17)
    decoder, relora = saved_activation_bytes(plain, ids), saved_activation_bytes(wrapped, ids)
    # the decoder keeps at least w_0 x and w_1 x (float32, 32 tokens, hidden 128) per layer
    assert decoder > 2 * 2 * 32 * 128 * 4
    assert relora <= 1.02 * decoder


@pytest.mark.slow
def test_relora_under_torch_compile_is_one_graph_and_matches_eager():
    """torch.compile traces the plain formulation: no graph break with LoRA dropout, and with
    dropout 0 the compiled output and gradients equal eager (the memory-efficient branch)."""
    _, model = _pair(dropout=0.1)
    ids = _ids()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    _, model = _pair(dropout=0.0)
    with torch.no_grad():
        for m in relora_modules(model).values():
            m.lora_B.normal_()
    params = [p for p in model.parameters() if p.requires_grad]
    outs = []
    for fn in (model, torch.compile(model, backend="aot_eager")):
        loss = _loss(fn, ids)
        outs.append((loss, *torch.autograd.grad(loss, params)))
    torch._dynamo.reset()
    for eager, compiled in zip(*outs, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
