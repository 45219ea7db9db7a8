"""pico-decoder against a reference written here with plain loops (float64)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from builders import tiny_model_config

from dynlab.model import PRESETS, ModelConfig, PicoDecoder, load_checkpoint_model
from dynlab.model.pico_decoder import Attention, RMSNorm, SwiGLU, apply_rope, count_parameters

CFG = tiny_model_config(vocab_size=37, max_seq_len=12)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> PicoDecoder:
    torch.manual_seed(seed)
    m = PicoDecoder(CFG)
    with torch.no_grad():  # non-trivial norm gains so RMSNorm's weight is exercised
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m.eval()


# ------------------------------------------------------------------ reference (float64)


def ref_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        ms = sum(float(e) ** 2 for e in rows[r]) / rows.shape[1]
        out[r] = rows[r] / math.sqrt(ms + eps) * w
    return out.reshape(x.shape)


def ref_rope(v: torch.Tensor, t: int, theta: float) -> torch.Tensor:
    """Rotate consecutive pairs (v[2i], v[2i+1]) of one head vector at position t."""
    hd = v.shape[0]
    out = v.clone()
    for i in range(hd // 2):
        ang = t * theta ** (-2.0 * i / hd)
        a, b = float(v[2 * i]), float(v[2 * i + 1])
        out[2 * i] = a * math.cos(ang) - b * math.sin(ang)
        out[2 * i + 1] = a * math.sin(ang) + b * math.cos(ang)
    return out


def ref_attention(x: torch.Tensor, wq, wk, wv, wo, n_heads: int, n_kv: int, theta: float
                  ) -> torch.Tensor:
    """x: (T, d) one sequence. Causal softmax attention, head h reads kv head h // (H/Hkv)."""
    T, d = x.shape
    hd = d // n_heads
    group = n_heads // n_kv
    heads = []
    for h in range(n_heads):
        g = h // group
        q = [ref_rope(wq[h * hd:(h + 1) * hd] @ x[t], t, theta) for t in range(T)]
        k = [ref_rope(wk[g * hd:(g + 1) * hd] @ x[t], t, theta) for t in range(T)]
        v = [wv[g * hd:(g + 1) * hd] @ x[t] for t in range(T)]
        out_h = torch.zeros(T, hd, dtype=x.dtype)
        for t in range(T):
            scores = [float(q[t] @ k[s]) / math.sqrt(hd) for s in range(t + 1)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            z = sum(weights)
            for s in range(t + 1):
                out_h[t] += weights[s] / z * v[s]
        heads.append(out_h)
    return torch.cat(heads, dim=1) @ wo.T


def ref_swiglu(x: torch.Tensor, w0, w1, w2) -> torch.Tensor:
    a = x @ w0.T
    silu = a / (1.0 + torch.exp(-a))
    return (silu * (x @ w1.T)) @ w2.T


def ref_forward(model: PicoDecoder, ids: torch.Tensor) -> torch.Tensor:
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    eps, theta = model.config.norm_eps, model.config.rope_theta
    outs = []
    for seq in ids:
        x = P["embedding_proj.weight"][seq]
        for i in range(model.config.n_layers):
            p = f"layers.{i}."
            h = ref_rmsnorm(x, P[p + "attention_norm.weight"], eps)
            x = x + ref_attention(h, P[p + "attention.q_proj.weight"],
                                  P[p + "attention.k_proj.weight"],
                                  P[p + "attention.v_proj.weight"],
                                  P[p + "attention.o_proj.weight"],
                                  model.config.n_heads, model.config.n_kv_heads, theta)
            h = ref_rmsnorm(x, P[p + "swiglu_norm.weight"], eps)
            x = x + ref_swiglu(h, P[p + "swiglu.w_0.weight"], P[p + "swiglu.w_1.weight"],
                               P[p + "swiglu.w_2.weight"])
        x = ref_rmsnorm(x, P["output_norm.weight"], eps)
        outs.append(x @ P["de_embedding_proj.weight"].T)
    return torch.stack(outs)


# ------------------------------------------------------------------ tests


def test_rmsnorm_matches_reference():
    torch.manual_seed(1)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16) * 3
    expect = ref_rmsnorm(x.double(), norm.weight.detach().double(), 1e-6)
    torch.testing.assert_close(norm(x).double(), expect, rtol=1e-5, atol=1e-6)


def test_rope_matches_reference_pairs():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 7, 8)  # (B, H, T, hd)
    from dynlab.model.pico_decoder import rope_cos_sin

    cos, sin = rope_cos_sin(7, 8, 10000.0)
    got = apply_rope(x, cos, sin)
    for b in range(2):
        for h in range(3):
            for t in range(7):
                expect = ref_rope(x[b, h, t].double(), t, 10000.0)
                torch.testing.assert_close(got[b, h, t].double(), expect, rtol=1e-5, atol=1e-6)
    # position 0 is the identity, and rotations keep the norm of every pair
    torch.testing.assert_close(got[..., 0, :], x[..., 0, :])
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_gqa_attention_matches_reference():
    torch.manual_seed(3)
    attn = Attention(CFG).eval()
    from dynlab.model.pico_decoder import rope_cos_sin

    x = torch.randn(2, 6, 16)
    cos, sin = rope_cos_sin(6, CFG.head_dim)
    got = attn(x, cos, sin)
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    for b in range(2):
        expect = ref_attention(x[b].double(), W["q_proj.weight"], W["k_proj.weight"],
                               W["v_proj.weight"], W["o_proj.weight"], 4, 2, 10000.0)
        torch.testing.assert_close(got[b].double(), expect, rtol=1e-5, atol=1e-6)


def test_attention_is_causal_and_heads_share_kv_groups():
    torch.manual_seed(4)
    attn = Attention(CFG).eval()
    from dynlab.model.pico_decoder import rope_cos_sin

    cos, sin = rope_cos_sin(6, CFG.head_dim)
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] += torch.randn(1, 2, 16)  # change the future only
    torch.testing.assert_close(attn(x, cos, sin)[:, :4], attn(y, cos, sin)[:, :4])


def test_swiglu_matches_reference():
    torch.manual_seed(5)
    mlp = SwiGLU(CFG)
    x = torch.randn(4, 16)
    W = {n: p.detach().double() for n, p in mlp.named_parameters()}
    expect = ref_swiglu(x.double(), W["w_0.weight"], W["w_1.weight"], W["w_2.weight"])
    torch.testing.assert_close(mlp(x).double(), expect, rtol=1e-5, atol=1e-6)


def test_full_forward_matches_reference():
    model = _model()
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    got = model(ids)
    assert got.shape == (2, 9, CFG.vocab_size) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_forward(model, ids), rtol=1e-4, atol=1e-5)


def test_parameter_names_and_shapes_follow_the_contract():
    model = PicoDecoder(CFG)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    d, hd, V, h = 16, 4, 37, 24
    expect = {"embedding_proj.weight": (V, d), "output_norm.weight": (d,),
              "de_embedding_proj.weight": (V, d)}
    for i in range(2):
        p = f"layers.{i}."
        expect |= {p + "attention.q_proj.weight": (4 * hd, d),
                   p + "attention.k_proj.weight": (2 * hd, d),
                   p + "attention.v_proj.weight": (2 * hd, d),
                   p + "attention.o_proj.weight": (d, 4 * hd),
                   p + "swiglu.w_0.weight": (h, d), p + "swiglu.w_1.weight": (h, d),
                   p + "swiglu.w_2.weight": (d, h),
                   p + "attention_norm.weight": (d,), p + "swiglu_norm.weight": (d,)}
    assert shapes == expect
    assert set(model.state_dict()) == set(expect)  # RoPE tables are not saved


def test_preset_sizes():
    # tiny by hand: 2·50304·96 + 96 + 12·(96·8·(24 + 8) + 3·96·384 + 2·96) = 11,282,784
    assert count_parameters(PRESETS["tiny"]) == 11_282_784
    assert PicoDecoder(PRESETS["tiny"]).num_parameters() == 11_282_784
    # small: 2·50304·384 + 384 + 12·(384·32·(24 + 8) + 3·384·1536 + 2·384) = 64,595,328
    assert count_parameters(PRESETS["small"]) == 64_595_328
    assert (PRESETS["medium"].d_model, PRESETS["medium"].activation_hidden_dim) == (768, 3072)
    assert (PRESETS["large"].d_model, PRESETS["large"].activation_hidden_dim) == (1536, 6144)
    micro = PRESETS["micro"]
    assert (micro.d_model, micro.n_layers, micro.n_heads, micro.n_kv_heads,
            micro.activation_hidden_dim, micro.max_seq_len) == (64, 4, 4, 2, 256, 128)
    for name in ("tiny", "small", "medium", "large"):
        p = PRESETS[name]
        assert (p.n_layers, p.n_heads, p.n_kv_heads, p.max_seq_len, p.vocab_size) == (
            12, 12, 4, 2048, 50304)


@pytest.mark.parametrize("kw, msg", [
    (dict(n_heads=4, n_kv_heads=3), "n_heads (4) must be divisible by n_kv_heads (3)"),
    (dict(d_model=18, n_heads=4, n_kv_heads=2), "d_model (18) must be divisible by n_heads"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
])
def test_bad_model_config(kw, msg):
    base = dict(d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, activation_hidden_dim=8,
                vocab_size=10, max_seq_len=8)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**(base | kw))


def test_forward_rejects_sequences_beyond_max_seq_len():
    with pytest.raises(ValueError, match="exceeds max_seq_len 12"):
        _model()(torch.zeros(1, 13, dtype=torch.long))


def test_load_checkpoint_model_drops_lora_keys(tmp_path):
    from safetensors.torch import save_file

    model = _model(seed=7)
    ckpt = tmp_path / "run" / "checkpoints" / "step_5"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"kind": "relora",
                                                           "model": CFG.to_dict()}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layers.0.attention.q_proj.lora_A"] = torch.zeros(2, 16)
    state["layers.0.attention.q_proj.lora_B"] = torch.zeros(16, 2)
    save_file(state, str(ckpt / "weights.safetensors"))
    loaded = load_checkpoint_model(ckpt)
    assert not loaded.training
    ids = torch.randint(0, 37, (2, 5))
    assert torch.equal(loaded(ids), model(ids))
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        load_checkpoint_model(tmp_path / "run")


def test_one_model_config_for_training_and_analysis(tmp_path):
    """run.json["model"] is written and read by one class: the decoder's config is the
    analysis' ModelSpec, with the same keys both ways."""
    from dynlab.model import read_model_config
    from dynlab.runs.checkpoints import ModelSpec

    assert ModelSpec is ModelConfig
    cfg = ModelConfig(16, 1, 4, 2, 8, 11, 8)  # positional: the six shape fields, max_seq_len
    assert cfg.to_dict() == {"d_model": 16, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
                             "activation_hidden_dim": 8, "vocab_size": 11, "max_seq_len": 8,
                             "norm_eps": 1e-6, "rope_theta": 10000.0}
    (tmp_path / "run.json").write_text(json.dumps({"model": cfg.to_dict()}))
    assert read_model_config(tmp_path) == cfg
    assert ModelSpec.from_run_config({"model": cfg.to_dict()}, tmp_path / "run.json") == cfg
    # an analysis-only shape (no context length) is a ModelSpec but not a pico-decoder
    shape = ModelSpec(16, 1, 4, 2, 8, 11)
    assert shape.head_dim == 4 and shape.expected_shapes()["layers.0.swiglu.w_2.weight"] == (16, 8)
    with pytest.raises(ValueError, match="max_seq_len must be a positive integer, got None"):
        PicoDecoder(shape)
    with pytest.raises(ValueError, match="head dim d_model / n_heads = 3 must be even"):
        PicoDecoder(ModelConfig(12, 1, 4, 2, 8, 11, 8))
