"""pico-decoder: a small Llama-style decoder, parameter for parameter as pico-train.

    x = embedding_proj(ids)
    for each layer:  h = x + attention(attention_norm(x));  x = h + swiglu(swiglu_norm(h))
    logits = de_embedding_proj(output_norm(x))                       (untied, float32)

Attention is causal, grouped-query (n_kv_heads key/value heads shared by
n_heads / n_kv_heads query heads each), with rotary position embeddings (RoPE,
theta 10000, interleaved pairs as in Meta's Llama / pico-train), computed by
`F.scaled_dot_product_attention`. No biases, no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynlab.runs.config import ModelConfig

__all__ = ["PRESETS", "ModelConfig", "PicoDecoder"]


def _preset(d_model: int, hidden: int, **kw: int) -> ModelConfig:
    base = dict(n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=50304, max_seq_len=2048)
    base.update(kw)
    return ModelConfig(d_model=d_model, activation_hidden_dim=hidden, **base)


# vocab_size is the *target* size of the BPE tokenizer trained for a preset; a run's
# model always takes the vocabulary size of its tokenizer.
PRESETS: dict[str, ModelConfig] = {
    "micro": _preset(64, 256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048,
                     max_seq_len=128),
    "tiny": _preset(96, 384),
    "small": _preset(384, 1536),
    "medium": _preset(768, 3072),
    "large": _preset(1536, 6144),
}


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight, normalised in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float = 10000.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle(t, i) = t * theta^(-2i / head_dim), shape (seq_len, head_dim / 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) by angle(t, i):  x' = (a cos - b sin, a sin + b cos).

    x: (B, H, T, hd); cos/sin: (T, hd / 2). Computed in float32, returned in x's dtype.
    """
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE (pico-train's `Attention`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.n_heads // self.n_kv_heads
        if group > 1:  # query head h reads key/value head h // group
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """SwiGLU(x) = w_2(silu(w_0 x) * w_1 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_0 = nn.Linear(cfg.d_model, cfg.activation_hidden_dim, bias=False)
        self.w_1 = nn.Linear(cfg.d_model, cfg.activation_hidden_dim, bias=False)
        self.w_2 = nn.Linear(cfg.activation_hidden_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


class PicoDecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + swiglu(norm(h))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.swiglu_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.swiglu = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.swiglu(self.swiglu_norm(h))


class PicoDecoder(nn.Module):
    """pico-decoder: (B, T) token ids -> (B, T, vocab) float32 logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.check_decoder()
        self.config = cfg
        self.embedding_proj = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(PicoDecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.output_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.de_embedding_proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq} exceeds max_seq_len {self.config.max_seq_len}"
            )
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embedding_proj(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.de_embedding_proj(self.output_norm(x)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters = 2·V·d + d + L·(d·hd·(2·H + 2·H_kv) + 3·d·h + 2·d)  (h: hidden dim)."""
    hd = cfg.head_dim
    attn = cfg.d_model * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.d_model * cfg.activation_hidden_dim
    block = attn + mlp + 2 * cfg.d_model
    return 2 * cfg.vocab_size * cfg.d_model + cfg.d_model + cfg.n_layers * block

