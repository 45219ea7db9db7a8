"""dynlab.sources.models: every source as a runnable causal LM, checked against the real
library's own forward (transformers) and against forwards computed by hand from the files."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import hf_fixtures as fx  # noqa: E402
from test_sources_pico import SPEC, write_pico_run  # noqa: E402

from dynlab.errors import InputError  # noqa: E402
from dynlab.sources import open_sources  # noqa: E402
from dynlab.sources.models import CausalLM, load_causal_lm  # noqa: E402

ARCHS = ("llama", "gpt_neox", "gpt2")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfm")
    for arch in ARCHS:
        fx.train_and_save(arch, root / arch, (0, 2))
        fx.save_tokenizer(root / arch)  # the run directory holds the tokenizer
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_checkpoint_logits_are_transformers_own(hf_dirs, arch):
    (run,) = open_sources([hf_dirs / arch])
    ckpt = run.checkpoints[-1]
    lm = load_causal_lm(run, ckpt)
    assert isinstance(lm, CausalLM)
    assert (lm.family, lm.vocab_size, lm.context_length) == (arch, fx.VOCAB, 64)
    assert lm.bos_id == 0  # the fixture tokenizer's EOS (it has no BOS)
    ids = fx.batch(7, n=3)
    ref = fx.load(ckpt.path)(input_ids=ids).logits  # float64, transformers' own
    got = lm.model(ids)
    assert got.shape == (3, fx.SEQ, fx.VOCAB) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    ref_loss = fx.load(ckpt.path)(input_ids=ids, labels=ids).loss
    ce = F.cross_entropy(got[:, :-1].reshape(-1, fx.VOCAB).double(), ids[:, 1:].reshape(-1))
    assert float(ce) == pytest.approx(float(ref_loss), abs=1e-5)
    assert lm.tokenizer.encode(["ab c"]) == [[3, 4, 2, 5]]  # CHARS at ids 2..


def test_hf_checkpoint_without_tokenizer_names_the_files(tmp_path):
    fx.train_and_save("gpt2", tmp_path / "g", (0,))
    (run,) = open_sources([tmp_path / "g"])
    with pytest.raises(InputError, match=r"no tokenizer: none of tokenizer\.json.*--tokenizer"):
        load_causal_lm(run, run.checkpoints[0])
    lm = load_causal_lm(run, run.checkpoints[0], need_tokenizer=False)
    assert lm.tokenizer is None
    fx.save_tokenizer(tmp_path / "tok")
    lm = load_causal_lm(run, run.checkpoints[0], tokenizer=tmp_path / "tok")
    assert lm.tokenizer.bos_id == 0


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    fx.train_and_save("llama", tmp_path / "l", (0,))
    vocab = {"<|endoftext|>": 0} | {f"t{i}": i + 1 for i in range(fx.VOCAB + 5)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.save(str(tmp_path / "big.json"))
    (run,) = open_sources([tmp_path / "l"])
    with pytest.raises(InputError, match=r"has 46 ids but the model .* only 40 outputs"):
        load_causal_lm(run, run.checkpoints[0], tokenizer=tmp_path / "big.json")


def by_hand_pico_logits(w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """pico-decoder's forward written out in float64 from the weights alone (RMSNorm eps
    1e-6, interleaved RoPE theta 10000, causal grouped-query attention, SwiGLU)."""
    w = {k: v.double() for k, v in w.items()}
    d, h, kv = SPEC.d_model, SPEC.n_heads, SPEC.n_kv_heads
    hd, t = d // h, ids.shape[1]

    def norm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * g

    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # (b, heads, t, hd), pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    x = w["embedding_proj.weight"][ids]
    mask = torch.full((t, t), -math.inf, dtype=torch.float64).triu(1)
    for i in range(SPEC.n_layers):
        p = f"layers.{i}."
        a = norm(x, w[p + "attention_norm.weight"])
        q = (a @ w[p + "attention.q_proj.weight"].T).view(*a.shape[:2], h, hd).transpose(1, 2)
        k = (a @ w[p + "attention.k_proj.weight"].T).view(*a.shape[:2], kv, hd).transpose(1, 2)
        v = (a @ w[p + "attention.v_proj.weight"].T).view(*a.shape[:2], kv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + att.transpose(1, 2).reshape(*a.shape[:2], d) @ w[p + "attention.o_proj.weight"].T
        m = norm(x, w[p + "swiglu_norm.weight"])
        gate = F.silu(m @ w[p + "swiglu.w_0.weight"].T) * (m @ w[p + "swiglu.w_1.weight"].T)
        x = x + gate @ w[p + "swiglu.w_2.weight"].T
    return norm(x, w["output_norm.weight"]) @ w["de_embedding_proj.weight"].T


@pytest.mark.parametrize("relora", [None, False, True])
def test_pico_and_relora_logits_by_hand(tmp_path, relora):
    cfg = None if relora is None else {"r": 2, "lora_alpha": 6, "trainable_scaling": relora}
    written = write_pico_run(tmp_path / "run", relora=cfg, steps=(0, 5))
    (run,) = open_sources([tmp_path / "run"])
    lm = load_causal_lm(run, run.checkpoints[1], need_tokenizer=False)
    assert (lm.family, lm.vocab_size, lm.context_length) == ("pico", SPEC.vocab_size, 32)
    stored = written[5]["stored"]
    w = {k.removeprefix("pico_decoder."): v for k, v in stored.items()
         if not k.endswith((".A_lora.weight", ".B_lora.weight", ".s"))}
    if cfg is not None:  # W + s·B·A formed by hand from the stored factors
        for k in [k for k in stored if k.endswith(".A_lora.weight")]:
            m = k.removeprefix("pico_decoder.").removesuffix(".A_lora.weight")
            s = (math.tanh(float(stored[f"pico_decoder.{m}.s"])) if relora else 6 / 2)
            a, b = stored[k].double(), stored[f"pico_decoder.{m}.B_lora.weight"].double()
            w[m + ".weight"] = w[m + ".weight"].double() + s * (b @ a)
    ids = torch.randint(0, SPEC.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = by_hand_pico_logits(w, ids)
    got = lm.model(ids).double()
    scale = float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * scale)


def test_dynlab_run_is_its_pico_decoder(tmp_path):
    """A dynlab run written by hand (run.json, tokenizer.json, step_N/weights.safetensors)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    from dynlab.model import ModelConfig

    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=24,
                      vocab_size=SPEC.vocab_size, max_seq_len=24)
    root = tmp_path / "drun"
    (root / "checkpoints" / "step_3").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"kind": "decoder", "model": cfg.to_dict(),
                                               "train": {}, "dynlab_version": "test"}))
    vocab = {"<|endoftext|>": 0} | {c: i + 1 for i, c in enumerate("abcdefgh")}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    tok.save(str(root / "tokenizer.json"))
    gen = torch.Generator().manual_seed(3)
    w = {k: torch.randn(*s, generator=gen) for k, s in SPEC.expected_shapes().items()}
    ckpt = root / "checkpoints" / "step_3"
    save_file(w, str(ckpt / "weights.safetensors"))
    (ckpt / "meta.json").write_text(json.dumps({"step": 3}))
    (run,) = open_sources([root])
    lm = load_causal_lm(run, run.checkpoints[0])
    assert (lm.family, lm.vocab_size, lm.context_length, lm.bos_id) == ("pico", 20, 24, 0)
    assert lm.tokenizer.encode(["abc"]) == [[1]]  # WordLevel without a pre-tokenizer: one word
    ids = torch.randint(0, SPEC.vocab_size, (2, 7), generator=gen)
    ref = by_hand_pico_logits(w, ids)
    torch.testing.assert_close(lm.model(ids).double(), ref, rtol=0,
                               atol=2e-5 * float(ref.abs().max()))


def test_pico_model_directory_without_context_is_refused(tmp_path):
    from safetensors.torch import save_file
    from test_sources_pico import pico_config, random_weights

    d = tmp_path / "pico-hf"
    d.mkdir()
    cfg = pico_config()
    del cfg["max_seq_len"]
    (d / "config.json").write_text(json.dumps(cfg))
    w = random_weights(torch.Generator().manual_seed(0))
    save_file({f"pico_decoder.{k}": v for k, v in w.items()}, str(d / "model.safetensors"))
    (run,) = open_sources([d])
    with pytest.raises(InputError, match="config.json has no max_seq_len"):
        load_causal_lm(run, run.checkpoints[0], need_tokenizer=False)
