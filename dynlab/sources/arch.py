"""Architecture adapters: a checkpoint's parameter names -> dynlab's components.

Each adapter reads the model's shape from its config.json (`ModelSpec`) and renames (and, where
the checkpoint fuses or transposes them, splits and transposes) the matrices into dynlab's
names, which are the store's `matrix` coordinate:

| store name | pico / dynlab | Llama family | GPT-NeoX (Pythia) | GPT-2 |
| --- | --- | --- | --- | --- |
| attention.q_proj | attention.q_proj | self_attn.q_proj | query_key_value (Q) | c_attn (Q) |
| attention.k_proj | attention.k_proj | self_attn.k_proj | query_key_value (K) | c_attn (K) |
| attention.v_proj | attention.v_proj | self_attn.v_proj | query_key_value (V) | c_attn (V) |
| attention.o_proj | attention.o_proj | self_attn.o_proj | attention.dense | attn.c_proj |
| swiglu.w_0 (gate) | swiglu.w_0 | mlp.gate_proj | – | – |
| swiglu.w_1 (up) | swiglu.w_1 | mlp.up_proj | mlp.dense_h_to_4h | mlp.c_fc |
| swiglu.w_2 (down) | swiglu.w_2 | mlp.down_proj | mlp.dense_4h_to_h | mlp.c_proj |
| embedding_proj | embedding_proj | embed_tokens | embed_in | wte |
| de_embedding_proj | de_embedding_proj | lm_head (tied: embed_tokens) | embed_out | wte (tied) |

Every matrix is in Linear layout (out, in). Biases, norms and buffers are not analysed.
GPT-NeoX fuses Q, K, V in one (3·d, d) matrix interleaved per head, rows
[q_0 k_0 v_0 | q_1 k_1 v_1 | …], so W.view(n_heads, 3, hd, d)[:, j] is Q (j = 0), K (1), V (2);
GPT-2's Conv1D stores (in, out), so its weights are transposed, and c_attn holds [Q | K | V]
in blocks of d columns. Nothing shipped with a checkpoint is executed: only config.json is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dynlab.errors import quoted
from dynlab.runs.checkpoints import ModelSpec
from dynlab.sources.base import SourceError, Tensors

ATTN = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")


@dataclass(frozen=True)
class Adapter:
    """How one architecture family names its matrices (see the module docstring)."""

    family: str
    model_types: tuple[str, ...]
    spec: Callable[[Mapping, Path], ModelSpec]
    convert: Callable[[Mapping[str, torch.Tensor], ModelSpec, Path], Tensors]
    native: Mapping[str, str]  # store name -> the checkpoint's name (documentation, store)
    gated: bool = True


def _int(config: Mapping, path: Path, *keys: str, default: int | None = None) -> int:
    for k in keys:
        if config.get(k) is not None:
            try:
                return int(config[k])
            except (TypeError, ValueError):
                raise SourceError(f"{path}: {k} must be an integer, not {config[k]!r}") from None
    if default is not None:
        return default
    raise SourceError(f"{path}: missing {' or '.join(keys)}")


def _spec(path: Path, d: int, layers: int, heads: int, kv: int, hidden: int, vocab: int,
          head_dim: int | None = None) -> ModelSpec:
    if heads <= 0 or kv <= 0 or heads % kv:
        raise SourceError(f"{path}: the number of heads ({heads}) must be a multiple of the "
                          f"key/value heads ({kv})")
    if head_dim is None and d % heads:
        raise SourceError(f"{path}: hidden size {d} does not divide by {heads} heads")
    explicit = head_dim if head_dim is not None and head_dim != d // heads else None
    return ModelSpec(d, layers, heads, kv, hidden, vocab, explicit_head_dim=explicit)


def _prefix(tensors: Mapping[str, torch.Tensor], suffix: str, path: Path, family: str) -> str:
    """The prefix before `suffix` in the checkpoint's names ('model.', 'gpt_neox.', '')."""
    for k in tensors:
        if k.endswith(suffix) and (k == suffix or k[: -len(suffix)].endswith(".")):
            return k[: -len(suffix)]
    raise SourceError(f"{path}: no parameter named like '*{suffix}' (a {family} checkpoint "
                      "should have it)")


def _get(tensors: Mapping[str, torch.Tensor], name: str, path: Path) -> torch.Tensor:
    if name not in tensors:
        raise SourceError(f"{path}: missing parameter {name}")
    return tensors[name]


# ---- pico (dynlab, pico-train, relora-pico) ------------------------------------------------


def pico_spec(config: Mapping, path: Path) -> ModelSpec:
    """pico-train's config.json keys (d_model, n_layers, attention_n_heads, ...)."""
    heads = _int(config, path, "attention_n_heads", "n_heads")
    return _spec(path, _int(config, path, "d_model"), _int(config, path, "n_layers"), heads,
                 _int(config, path, "attention_n_kv_heads", "n_kv_heads", default=heads),
                 _int(config, path, "activation_hidden_dim"), _int(config, path, "vocab_size"))


def pico_convert(tensors: Mapping[str, torch.Tensor], spec: ModelSpec, path: Path) -> Tensors:
    """Drop the HF wrapper's prefix (`pico_decoder.` or `pico.`); names are otherwise dynlab's.
    The prefix is what precedes `layers.0.attention.q_proj.weight` — or, in a file read in
    part (`pico_keep`), any layer's or embedding's name."""
    try:
        prefix = _prefix(tensors, "layers.0.attention.q_proj.weight", path, "pico")
    except SourceError:
        found = {k[: len(k) - len(pico_name(k))] for k in tensors
                 if pico_name(k).startswith(PICO_ROOTS)}
        if len(found) != 1:
            raise
        prefix = found.pop()
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


#: where dynlab's part of a pico checkpoint's name starts
PICO_ROOTS = ("layers.", "embedding_proj.", "de_embedding_proj.")


def pico_name(name: str) -> str:
    """A pico checkpoint name without the wrapper's prefix: from its first `layers.` or
    embedding segment on (the name itself where it has none)."""
    if name.startswith(PICO_ROOTS):
        return name
    for root in PICO_ROOTS:
        at = name.find("." + root)
        if at >= 0:
            return name[at + 1:]
    return name


def pico_keep(keep: Callable[[str], bool]) -> Callable[[str], bool]:
    """`keep` (on dynlab's names) for the names of a pico model.safetensors."""
    return lambda name: keep(pico_name(name))


# ---- Llama family --------------------------------------------------------------------------


def llama_spec(config: Mapping, path: Path) -> ModelSpec:
    heads = _int(config, path, "num_attention_heads")
    return _spec(path, _int(config, path, "hidden_size"), _int(config, path, "num_hidden_layers"),
                 heads, _int(config, path, "num_key_value_heads", default=heads),
                 _int(config, path, "intermediate_size"), _int(config, path, "vocab_size"),
                 head_dim=config.get("head_dim"))


LLAMA_NAMES = {
    "attention.q_proj": "self_attn.q_proj", "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj", "attention.o_proj": "self_attn.o_proj",
    "swiglu.w_0": "mlp.gate_proj", "swiglu.w_1": "mlp.up_proj", "swiglu.w_2": "mlp.down_proj",
}


def llama_convert(tensors: Mapping[str, torch.Tensor], spec: ModelSpec, path: Path) -> Tensors:
    p = _prefix(tensors, "layers.0.self_attn.q_proj.weight", path, "Llama-family")
    out: Tensors = {}
    for i in range(spec.n_layers):
        for ours, theirs in LLAMA_NAMES.items():
            out[f"layers.{i}.{ours}.weight"] = _get(tensors, f"{p}layers.{i}.{theirs}.weight", path)
    embed = _get(tensors, f"{p}embed_tokens.weight", path)
    out["embedding_proj.weight"] = embed
    out["de_embedding_proj.weight"] = tensors.get("lm_head.weight", embed)
    return out


# ---- GPT-NeoX / Pythia ---------------------------------------------------------------------


def neox_spec(config: Mapping, path: Path) -> ModelSpec:
    heads = _int(config, path, "num_attention_heads")
    return _spec(path, _int(config, path, "hidden_size"), _int(config, path, "num_hidden_layers"),
                 heads, heads, _int(config, path, "intermediate_size"),
                 _int(config, path, "vocab_size"))


def split_neox_qkv(w: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, ...]:
    """Q, K, V from GPT-NeoX's fused query_key_value weight (3·d, d) or bias (3·d,), whose
    rows are interleaved per head: w.view(n_heads, 3, hd, ...)[:, j] for j = 0, 1, 2."""
    hd = w.shape[0] // (3 * n_heads)
    v = w.reshape(n_heads, 3, hd, *w.shape[1:])
    return tuple(v[:, j].reshape(n_heads * hd, *w.shape[1:]) for j in range(3))


def neox_convert(tensors: Mapping[str, torch.Tensor], spec: ModelSpec, path: Path) -> Tensors:
    p = _prefix(tensors, "layers.0.attention.query_key_value.weight", path, "GPT-NeoX")
    out: Tensors = {}
    for i in range(spec.n_layers):
        layer = f"{p}layers.{i}."
        qkv = _get(tensors, layer + "attention.query_key_value.weight", path)
        if qkv.shape[0] != 3 * spec.n_heads * spec.head_dim:
            raise SourceError(f"{path}: {layer}attention.query_key_value.weight has shape "
                              f"{tuple(qkv.shape)}, config.json implies "
                              f"{(3 * spec.d_model, spec.d_model)}")
        q, k, v = split_neox_qkv(qkv, spec.n_heads)
        out[f"layers.{i}.attention.q_proj.weight"] = q
        out[f"layers.{i}.attention.k_proj.weight"] = k
        out[f"layers.{i}.attention.v_proj.weight"] = v
        out[f"layers.{i}.attention.o_proj.weight"] = _get(tensors, layer + "attention.dense.weight",
                                                          path)
        out[f"layers.{i}.swiglu.w_1.weight"] = _get(tensors, layer + "mlp.dense_h_to_4h.weight",
                                                    path)
        out[f"layers.{i}.swiglu.w_2.weight"] = _get(tensors, layer + "mlp.dense_4h_to_h.weight",
                                                    path)
    embed = _get(tensors, f"{p}embed_in.weight", path)
    out["embedding_proj.weight"] = embed
    out["de_embedding_proj.weight"] = tensors.get("embed_out.weight", embed)
    return out


# ---- GPT-2 ---------------------------------------------------------------------------------


def gpt2_spec(config: Mapping, path: Path) -> ModelSpec:
    d = _int(config, path, "n_embd", "hidden_size")
    heads = _int(config, path, "n_head", "num_attention_heads")
    return _spec(path, d, _int(config, path, "n_layer", "num_hidden_layers"), heads, heads,
                 _int(config, path, "n_inner", default=4 * d), _int(config, path, "vocab_size"))


def split_gpt2_qkv(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q, K, V (each (d, d), Linear layout) from GPT-2's Conv1D c_attn weight (d, 3·d),
    stored (in, out) with [Q | K | V] in blocks of d output columns."""
    d = w.shape[0]
    return tuple(w[:, j * d:(j + 1) * d].t() for j in range(3))


def gpt2_convert(tensors: Mapping[str, torch.Tensor], spec: ModelSpec, path: Path) -> Tensors:
    p = _prefix(tensors, "h.0.attn.c_attn.weight", path, "GPT-2")
    out: Tensors = {}
    for i in range(spec.n_layers):
        layer = f"{p}h.{i}."
        q, k, v = split_gpt2_qkv(_get(tensors, layer + "attn.c_attn.weight", path))
        out[f"layers.{i}.attention.q_proj.weight"] = q
        out[f"layers.{i}.attention.k_proj.weight"] = k
        out[f"layers.{i}.attention.v_proj.weight"] = v
        out[f"layers.{i}.attention.o_proj.weight"] = _get(tensors, layer + "attn.c_proj.weight",
                                                          path).t()
        out[f"layers.{i}.swiglu.w_1.weight"] = _get(tensors, layer + "mlp.c_fc.weight", path).t()
        out[f"layers.{i}.swiglu.w_2.weight"] = _get(tensors, layer + "mlp.c_proj.weight", path).t()
    wte = _get(tensors, f"{p}wte.weight", path)
    out["embedding_proj.weight"] = wte
    out["de_embedding_proj.weight"] = tensors.get("lm_head.weight", wte)
    return out


PICO = Adapter("pico", ("pico_decoder", "pico", "pico_relora_decoder", "relora-pico"),
               pico_spec, pico_convert,
               {m: m for m in (*ATTN, "swiglu.w_0", "swiglu.w_1", "swiglu.w_2")})
LLAMA = Adapter("llama", ("llama", "mistral", "qwen2", "olmo", "olmo2"), llama_spec,
                llama_convert, LLAMA_NAMES)
NEOX = Adapter("gpt_neox", ("gpt_neox",), neox_spec, neox_convert, {
    "attention.q_proj": "attention.query_key_value (Q rows)",
    "attention.k_proj": "attention.query_key_value (K rows)",
    "attention.v_proj": "attention.query_key_value (V rows)",
    "attention.o_proj": "attention.dense", "swiglu.w_1": "mlp.dense_h_to_4h",
    "swiglu.w_2": "mlp.dense_4h_to_h"}, gated=False)
GPT2 = Adapter("gpt2", ("gpt2",), gpt2_spec, gpt2_convert, {
    "attention.q_proj": "attn.c_attn (Q block, transposed)",
    "attention.k_proj": "attn.c_attn (K block, transposed)",
    "attention.v_proj": "attn.c_attn (V block, transposed)",
    "attention.o_proj": "attn.c_proj (transposed)", "swiglu.w_1": "mlp.c_fc (transposed)",
    "swiglu.w_2": "mlp.c_proj (transposed)"}, gated=False)

ADAPTERS: dict[str, Adapter] = {t: a for a in (PICO, LLAMA, NEOX, GPT2) for t in a.model_types}


def adapter_for(config: Mapping, path: Path) -> Adapter:
    """The adapter for config.json's `model_type`; an unknown type is an error that lists the
    supported ones."""
    model_type = config.get("model_type")
    if model_type is None and "d_model" in config and "attention_n_heads" in config:
        model_type = "pico_decoder"  # pico-train's own config.json may carry no model_type
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        raise SourceError(
            f"{path}: model_type {quoted(model_type)} is not supported; supported: "
            f"{', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


# ---- activations: which module of a transformers model gives each of dynlab's sites ---------


def split_neox_qkv_output(out: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, ...]:
    """Q, K, V outputs (each (..., d)) of GPT-NeoX's fused query_key_value output (..., 3·d),
    interleaved per head as its weight's rows are (`split_neox_qkv`)."""
    hd = out.shape[-1] // (3 * n_heads)
    v = out.reshape(*out.shape[:-1], n_heads, 3, hd)
    return tuple(v[..., j, :].reshape(*out.shape[:-1], n_heads * hd) for j in range(3))


def split_gpt2_qkv_output(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q, K, V outputs (each (..., d)) of GPT-2's c_attn output (..., 3·d), [Q | K | V]."""
    d = out.shape[-1] // 3
    return tuple(out[..., j * d:(j + 1) * d] for j in range(3))


@dataclass(frozen=True)
class ActivationSites:
    """Where a transformers model of one family computes dynlab's activation sites: `blocks`,
    the attribute of `model.base_model` holding the decoder blocks (each block's output is the
    residual stream, site `residual`), and per block module (its name under the block) the
    sites its output gives: one site, or several from a fused output (`split`)."""

    blocks: str
    modules: Mapping[str, tuple[str, ...]]
    split: Mapping[str, str]  # block module -> "neox" | "gpt2" (fused Q, K, V output)


HF_ACTIVATION_SITES: dict[str, ActivationSites] = {
    "llama": ActivationSites("layers", {theirs: (ours,) for ours, theirs in LLAMA_NAMES.items()},
                             {}),
    "gpt_neox": ActivationSites("layers", {
        "attention.query_key_value": ATTN[:3], "attention.dense": ("attention.o_proj",),
        "mlp.dense_h_to_4h": ("swiglu.w_1",), "mlp.dense_4h_to_h": ("swiglu.w_2",)},
        {"attention.query_key_value": "neox"}),
    "gpt2": ActivationSites("h", {
        "attn.c_attn": ATTN[:3], "attn.c_proj": ("attention.o_proj",),
        "mlp.c_fc": ("swiglu.w_1",), "mlp.c_proj": ("swiglu.w_2",)},
        {"attn.c_attn": "gpt2"}),
}


def split_output(kind: str | None, out: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, ...]:
    """A block module's output as the outputs of its sites (`ActivationSites.split`)."""
    if kind == "neox":
        return split_neox_qkv_output(out, n_heads)
    if kind == "gpt2":
        return split_gpt2_qkv_output(out)
    return (out,)
