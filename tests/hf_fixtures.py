"""Hugging Face checkpoints written by transformers itself (tiny random models trained for a few
real optimizer steps), and the OV circuits that transformers' own attention modules compute."""

from __future__ import annotations

from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 40
SEQ = 12


def tiny_model(arch: str):
    """A tiny random model of `arch` (llama, gpt_neox, gpt2), float32, seeded."""
    torch.manual_seed({"llama": 1, "gpt_neox": 2, "gpt2": 3}[arch])
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "gpt_neox":  # Pythia's shape of config: partial rotary, parallel residual
        cfg = transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
            max_position_embeddings=64, tie_word_embeddings=False)
        return transformers.GPTNeoXForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4,
                                  n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def batch(seed: int = 0, n: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def train_and_save(arch: str, run_dir: Path, steps=(0, 2, 4), name: str = "step{}",
                   dtype: torch.dtype = torch.float32, **save_kwargs) -> dict[int, dict]:
    """Train with AdamW, saving with save_pretrained at `steps` into run_dir/name.format(N);
    returns each saved state dict (in the saved dtype)."""
    model = tiny_model(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    saved = {}
    done = 0
    for target in steps:
        while done < target:
            ids = batch(done)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
        out = run_dir / name.format(target)
        to_save = model if dtype == torch.float32 else _copy_as(model, arch, dtype)
        to_save.save_pretrained(out, **save_kwargs)
        saved[target] = {k: v.detach().clone() for k, v in to_save.state_dict().items()}
    return saved


def _copy_as(model, arch, dtype):
    m = tiny_model(arch)
    m.load_state_dict(model.state_dict())
    return m.to(dtype)


def load(model_dir: Path):
    """The model as transformers loads it (float64, eval mode)."""
    cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(model_dir, dtype=torch.float64).eval()


# ---- OV circuits through the modules' own V and O path, attention fixed to the identity


_HEAD: dict[str, int | None] = {"h": None}


def _fixed_attention(module, query, key, value, attention_mask, **kwargs):
    """Every position attends only to itself; only head _HEAD['h'] is kept (all when None).
    value: (b, n_kv, n, hd) -> output (b, n, n_heads, hd)."""
    n_heads = query.shape[1]
    v = value.repeat_interleave(n_heads // value.shape[1], dim=1)
    h = _HEAD["h"]
    if h is not None:
        mask = torch.zeros(n_heads, dtype=v.dtype)
        mask[h] = 1
        v = v * mask.view(1, -1, 1, 1)
    return v.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("dynlab_fixed_self", _fixed_attention)


def module_ov(model, arch: str, layer: int, head: int | None) -> torch.Tensor:
    """OV_h (d × d) as the attention module of `layer` computes it: the module's forward on
    the d basis vectors (and on zeros, to remove the biases), attention fixed to each token's
    own position, every head but `head` zeroed. out(e_i) − out(0) is column i of OV_h."""
    model.config._attn_implementation = "dynlab_fixed_self"
    d = model.config.hidden_size
    pos = torch.arange(d).unsqueeze(0)
    outs = []
    _HEAD["h"] = head
    try:
        for x in (torch.eye(d, dtype=torch.float64).unsqueeze(0),
                  torch.zeros(1, d, d, dtype=torch.float64)):
            with torch.no_grad():
                if arch == "llama":
                    attn = model.model.layers[layer].self_attn
                    pe = model.model.rotary_emb(x, pos)
                    out = attn(x, position_embeddings=pe, attention_mask=None)[0]
                elif arch == "gpt_neox":
                    attn = model.gpt_neox.layers[layer].attention
                    pe = model.gpt_neox.rotary_emb(x, pos)
                    out = attn(x, attention_mask=None, position_embeddings=pe)[0]
                else:
                    attn = model.transformer.h[layer].attn
                    out = attn(x)[0]
            outs.append(out[0])
    finally:
        _HEAD["h"] = None
    return (outs[0] - outs[1]).T


# ---- a checkpoint's own tokenizer, and text for --activations-data

CHARS = " abcdefghijklmnopqrstuvwxyz.,"


def save_tokenizer(model_dir: Path) -> None:
    """A character-level tokenizer (id 0 `<|endoftext|>`, the end-of-sequence token, then
    CHARS; fewer ids than VOCAB) saved with transformers' save_pretrained into model_dir."""
    from tokenizers import Tokenizer, models

    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(CHARS)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                unk_token="<unk>")
    fast.save_pretrained(model_dir)


def write_text(path: Path, n_docs: int = 20) -> Path:
    """Documents separated by blank lines (dynlab's .txt data format), from CHARS."""
    gen = torch.Generator().manual_seed(5)
    docs = []
    for _ in range(n_docs):
        idx = torch.randint(0, len(CHARS), (30,), generator=gen).tolist()
        docs.append("".join(CHARS[i] for i in idx).strip() or "a")
    path.write_text("\n\n".join(docs) + "\n")
    return path
