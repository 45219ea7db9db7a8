"""How attention organises itself: per head, the mean entropy of its attention distributions
and its attention to the first token (attention sinks), and per layer the largest
residual-stream activation relative to the median (massive activations).

    entropy_h   = mean over sequences and query positions t ≥ 1 of −Σ_j A_h[t, j]·log A_h[t, j]
    sink_h      = mean over sequences and query positions t ≥ 1 of A_h[t, 0]
    sink rate   = share of a layer's heads with sink_h > ε, ε = 0.3  (Gu et al. 2024, "When
                  attention sink emerges in language models: an empirical view", §3)
    massive     = max |h| / median |h| over every entry of a layer's residual-stream output h
                  (Sun et al. 2024, "Massive activations in large language models")

A is a causal attention matrix (rows sum to 1 over j ≤ t). Query position 0 is left out of the
means: it can only attend to itself (entropy 0, sink score 1) whatever the head does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SINK_EPS = 0.3


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) attention probabilities -> (H,) mean entropy (nats) over sequences and
    query positions 1…T−1 (0·log 0 = 0); NaN for T = 1."""
    p = probs.double()[:, :, 1:, :]
    ent = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)
    return ent.mean(dim=(0, 2)) if p.shape[2] else torch.full((probs.shape[1],), torch.nan,
                                                                dtype=torch.float64)


def sink_scores(probs: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) -> (H,) mean attention to the first token over sequences and query
    positions 1…T−1; NaN for T = 1."""
    p = probs.double()[:, :, 1:, 0]
    return p.mean(dim=(0, 2)) if p.shape[2] else torch.full((probs.shape[1],), torch.nan,
                                                              dtype=torch.float64)


def sink_rate(scores: torch.Tensor, eps: float = SINK_EPS) -> float:
    """Share of heads whose sink score exceeds ε (NaN where any score is NaN)."""
    if bool(torch.isnan(scores).any()):
        return float("nan")
    return float((scores > eps).double().mean())


def massive_ratio(hidden: torch.Tensor) -> float:
    """max |h| / median |h| over all entries of a residual-stream tensor (float64; the median
    of an even count is the mean of the two middle values); inf when the median is 0 and the
    max is not, NaN for NaN input."""
    a = hidden.detach().double().abs().reshape(-1)
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    med = float(np.median(a.cpu().numpy()))
    top = float(a.max())
    return top / med if med > 0 else (float("inf") if top > 0 else float("nan"))


class AttentionStats:
    """Accumulates the per-head sums of entropy and sink score and each layer's residual
    statistics over chunks of a batch (so a (B, H, T, T) tensor is never held for the whole
    batch), then gives the means."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.entropy = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.sink = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.weight = torch.zeros(n_layers, dtype=torch.float64)
        self.residual: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def add_attention(self, layer: int, probs: torch.Tensor) -> None:
        n = probs.shape[0] * max(probs.shape[2] - 1, 0)
        if n == 0:
            return
        self.entropy[layer] += attention_entropy(probs).cpu() * n
        self.sink[layer] += sink_scores(probs).cpu() * n
        self.weight[layer] += n

    def add_residual(self, layer: int, hidden: torch.Tensor) -> None:
        self.residual[layer].append(hidden.detach().abs().float().cpu().reshape(-1))

    def result(self, eps: float = SINK_EPS) -> dict[str, torch.Tensor]:
        """attn_entropy, sink_score (layer, head); sink_rate, massive_ratio, massive_max
        (layer)."""
        w = self.weight[:, None]
        ent = torch.where(w > 0, self.entropy / w.clamp_min(1), torch.nan)
        sink = torch.where(w > 0, self.sink / w.clamp_min(1), torch.nan)
        ratio, top = [], []
        for parts in self.residual:
            if parts:
                h = torch.cat(parts)
                ratio.append(massive_ratio(h))
                top.append(float(h.max()) if bool(torch.isfinite(h).all()) else float("nan"))
            else:
                ratio.append(float("nan"))
                top.append(float("nan"))
        return {"attn_entropy": ent, "sink_score": sink,
                "sink_rate": torch.tensor([sink_rate(s, eps) for s in sink], dtype=torch.float64),
                "massive_ratio": torch.tensor(ratio, dtype=torch.float64),
                "massive_max": torch.tensor(top, dtype=torch.float64)}


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√hd + causal mask) in float32: q (B, H, T, hd), k (B, H, T, hd) ->
    (B, H, T, T), the weights `F.scaled_dot_product_attention(..., is_causal=True)` applies."""
    qf, kf = q.float(), k.float()
    scores = qf @ kf.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    t = q.shape[-2]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


@torch.no_grad()
def pico_attention_stats(model: torch.nn.Module, batch: torch.Tensor, chunk: int = 4,
                         eps: float = SINK_EPS) -> dict[str, torch.Tensor]:
    """Attention entropy and sink score per (layer, head), sink rate and massive activations
    per layer of a PicoDecoder (dynlab.model.pico_decoder) on token ids `batch` (B, T),
    chunk sequences at a time. Each layer's attention weights are recomputed from its q/k
    projections and RoPE exactly as its forward pass does (grouped-query heads expanded)."""
    from dynlab.model.pico_decoder import apply_rope

    layers: Sequence[torch.nn.Module] = model.layers
    stats = AttentionStats(len(layers), layers[0].attention.n_heads)
    hooks = []

    def on_attention(i: int):
        def hook(mod, args, _out):
            x, cos, sin = args
            bsz, seq, _ = x.shape
            q = mod.q_proj(x).view(bsz, seq, mod.n_heads, mod.head_dim).transpose(1, 2)
            k = mod.k_proj(x).view(bsz, seq, mod.n_kv_heads, mod.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = k.repeat_interleave(mod.n_heads // mod.n_kv_heads, dim=1)
            stats.add_attention(i, causal_attention_probs(q, k))
        return hook

    def on_block(i: int):
        def hook(_mod, _args, out):
            stats.add_residual(i, out)
        return hook

    for i, block in enumerate(layers):
        hooks.append(block.attention.register_forward_hook(on_attention(i)))
        hooks.append(block.register_forward_hook(on_block(i)))
    try:
        device = next(model.parameters()).device
        for start in range(0, batch.shape[0], chunk):
            model(batch[start:start + chunk].to(device))
    finally:
        for h in hooks:
            h.remove()
    return stats.result(eps)


@torch.no_grad()
def hf_attention_stats(model: torch.nn.Module, batch: torch.Tensor, chunk: int = 4,
                       eps: float = SINK_EPS) -> dict[str, torch.Tensor]:
    """The same statistics for a transformers causal LM, from its own `output_attentions`
    (the model must use eager attention) and `output_hidden_states` (hidden_states[i + 1] is
    the residual stream after block i; the last one is taken before any final norm where the
    model applies it inside the base model, as transformers reports it)."""
    device = next(model.parameters()).device
    stats = None
    for start in range(0, batch.shape[0], chunk):
        out = model(input_ids=batch[start:start + chunk].to(device), output_attentions=True,
                    output_hidden_states=True)
        if stats is None:
            stats = AttentionStats(len(out.attentions), out.attentions[0].shape[1])
        for i, a in enumerate(out.attentions):
            stats.add_attention(i, a)
            stats.add_residual(i, out.hidden_states[i + 1])
    if stats is None:
        raise ValueError("hf_attention_stats: an empty batch")
    return stats.result(eps)
