"""A runnable causal language model for any checkpoint dynlab can read.

Contract (stable; evaluation and function-space analyses build on it):

    lm = load_causal_lm(run, ckpt, device="cpu", dtype=torch.float32, tokenizer=None)
    logits = lm.model(input_ids)        # (batch, time) int64 -> (batch, time, vocab) float
    ids = lm.tokenizer.encode(["some text", ...])   # token ids, no special tokens added
    lm.bos_id                           # the token a document is conditioned on

`CausalLM` fields:

    model           torch.nn.Module in eval mode on `device`, parameters in `dtype`;
                    forward(input_ids) -> logits (batch, time, vocab_size). Right padding is
                    harmless: attention is causal, so a real position never sees the padding.
    tokenizer       `TextTokenizer` (the checkpoint's own, or the `tokenizer` argument), or
                    None when loaded with `need_tokenizer=False`.
    vocab_size      logits width (the model's embedding rows; a tokenizer never has more ids).
    context_length  the longest input the model takes (its position table / max_seq_len).
    family          "pico" (PicoDecoder: dynlab, pico-train, relora-pico runs and pico models
                    in Hugging Face format) or the transformers family ("llama", "gpt_neox",
                    "gpt2").
    source          where it was loaded from (a checkpoint path or hf://ORG/NAME@REVISION).
    bos_id          the document-start token: a dynlab tokenizer's `<|endoftext|>`; for a
                    Hugging Face tokenizer its BOS token, else its EOS token (as
                    lm-evaluation-harness's HFLM prefix token).

Which class runs the checkpoint:

    dynlab run        dynlab.model.load_checkpoint_model (run.json's shape; a relora run's
                      weights.safetensors holds the effective W + s·B·A already)
    pico-train        PicoDecoder with the step's model.safetensors (norm_eps and rope theta
                      from its config.json)
    relora-pico       PicoDecoder with the effective weights W + s·B·A
                      (dynlab.sources.pico.compose_relora; s = tanh(s) or lora_alpha / r)
    Hugging Face      transformers' AutoModelForCausalLM from local files only
    (dir or hf://)    (`local_files_only=True`, `trust_remote_code=False`: only transformers'
                      own classes run, no code shipped with a checkpoint); a pico model in
                      Hugging Face format runs as a PicoDecoder.

Tokenizers: a dynlab run's RUN/tokenizer.json (the `tokenizers` library); for every other
source transformers' AutoTokenizer from the first of the checkpoint directory and the run
directory holding tokenizer files (`TOKENIZER_FILES`); for hf:// the revision's tokenizer
files. `tokenizer=PATH` overrides: a tokenizer.json file or a directory of Hugging Face
tokenizer files. A checkpoint without one raises `SourceError` naming the files and
directories looked in. A tokenizer with more ids than the model's vocabulary is refused.

Hub checkpoints are fetched through their reader (bounded disk); call
`dynlab.sources.release(run, ckpt)` once the model is loaded to let the download go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dynlab.errors import InputError
from dynlab.runs.checkpoints import Checkpoint, Run
from dynlab.sources.base import SourceError, SourceRun

#: files whose presence marks a directory as holding a Hugging Face tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
#: transformers families run by AutoModelForCausalLM
HF_FAMILIES = ("llama", "gpt_neox", "gpt2")


class TextTokenizer:
    """One interface over a `tokenizers.Tokenizer` (dynlab runs) and a transformers tokenizer:
    `encode(texts)` gives each text's ids with no special token added; `vocab_size` counts
    every id it can produce (added tokens included); `bos_id` is the document-start token.
    `native` is the wrapped object. `encode_batch` / `get_vocab_size` / `token_to_id` mirror
    the `tokenizers` API so that code written for dynlab's tokenizers takes either."""

    def __init__(self, native, bos_id: int | None, vocab_size: int, name: str) -> None:
        self.native, self.bos_id, self.vocab_size, self.name = native, bos_id, vocab_size, name

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if hasattr(self.native, "encode_batch") and not hasattr(self.native, "backend_tokenizer"):
            return [e.ids for e in self.native.encode_batch(list(texts),
                                                            add_special_tokens=False)]
        return [list(x) for x in self.native(list(texts), add_special_tokens=False)["input_ids"]]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list:
        if add_special_tokens:
            raise ValueError("TextTokenizer encodes without special tokens only")
        return [_Encoding(ids) for ids in self.encode(texts)]

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids (special tokens kept as text)."""
        if hasattr(self.native, "backend_tokenizer"):
            return self.native.decode(list(ids), skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
        return self.native.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> str:
        """A digest of the tokenizer's full definition (equal tokenizers, equal digests), for
        caching tokenised data once per tokenizer."""
        import hashlib

        backend = getattr(self.native, "backend_tokenizer", self.native)
        try:
            text = backend.to_str()
        except AttributeError:  # a slow transformers tokenizer: its vocabulary
            text = repr(sorted(self.native.get_vocab().items()))
        return hashlib.sha1(f"{text}|{self.bos_id}".encode()).hexdigest()

    def token_to_id(self, token: str) -> int | None:
        if hasattr(self.native, "token_to_id"):
            return self.native.token_to_id(token)
        idx = self.native.convert_tokens_to_ids(token)
        return None if idx is None or idx == self.native.unk_token_id else int(idx)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name}, vocab {self.vocab_size}, bos {self.bos_id})"


@dataclass(frozen=True)
class _Encoding:
    ids: list[int]


@dataclass
class CausalLM:
    """A checkpoint as a runnable causal LM (module docstring)."""

    model: nn.Module
    tokenizer: TextTokenizer | None
    vocab_size: int
    context_length: int
    family: str
    source: str

    @property
    def bos_id(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.bos_id


class HFLogits(nn.Module):
    """A transformers causal LM as forward(input_ids) -> logits; `hf` is the wrapped model
    (its config, modules and hooks stay reachable)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    @property
    def config(self):
        return self.hf.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


# ---- Hugging Face pieces (transformers' own classes and tokenizers, local files only)


def hf_model(model_dir: Path, what: str = "--activations-data",
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """transformers' AutoModelForCausalLM from a local checkpoint directory in `dtype`, eval
    mode (local files only; never remote code). `what` prefixes error messages."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise InputError(f"{what} for Hugging Face checkpoints needs transformers: "
                         "pip install 'dynlab[hf]'") from None
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False, dtype=dtype).eval()
    except (OSError, ValueError) as err:
        raise InputError(f"{what}: transformers cannot load {model_dir} as a causal LM of "
                         f"its own classes ({err})") from None


def hf_context(model: nn.Module) -> int:
    """The longest input of a transformers model (max_position_embeddings / n_positions)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 128


def hf_tokenizer(dirs: Sequence[Path], what: str = "--activations-data"):
    """The checkpoint's own transformers tokenizer (AutoTokenizer, local files only, no remote
    code) from the first of `dirs` holding tokenizer files; InputError naming the files looked
    for and the directories searched."""
    for d in dirs:
        if any((Path(d) / f).is_file() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(d, local_files_only=True,
                                                     trust_remote_code=False)
            except (OSError, ValueError) as err:
                raise InputError(f"{what}: the tokenizer in {d} cannot be loaded ({err})"
                                 ) from None
    raise InputError(f"{what}: the checkpoint has no tokenizer: none of "
                     f"{', '.join(TOKENIZER_FILES)} in {', '.join(str(d) for d in dirs)}")


def wrap_hf_tokenizer(tok, name: str) -> TextTokenizer:
    """A transformers tokenizer as a TextTokenizer (bos: its BOS token, else its EOS)."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return TextTokenizer(tok, None if bos is None else int(bos), len(tok), name)


def wrap_dynlab_tokenizer(path: Path) -> TextTokenizer:
    """A tokenizer.json (the `tokenizers` library) as a TextTokenizer; bos `<|endoftext|>`."""
    from dynlab.data.tokenizer import EOT, load_tokenizer

    tok = load_tokenizer(path)
    bos = tok.token_to_id(EOT)
    return TextTokenizer(tok, None if bos is None else int(bos), tok.get_vocab_size(),
                         str(path))


def tokenizer_from(path: Path, what: str = "--tokenizer") -> TextTokenizer:
    """`--tokenizer PATH`: a tokenizer.json file, or a directory of Hugging Face tokenizer
    files."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".json":
            raise InputError(f"{what} {path}: expected a tokenizer.json file or a directory "
                             f"holding one of {', '.join(TOKENIZER_FILES)}")
        try:
            return wrap_dynlab_tokenizer(path)
        except (ValueError, FileNotFoundError) as err:
            if "<|endoftext|>" not in str(err):
                raise InputError(f"{what} {path}: not a tokenizers JSON file ({err})") from None
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))  # no <|endoftext|>: no document-start token
            return TextTokenizer(tok, None, tok.get_vocab_size(), str(path))
    if path.is_dir():
        return wrap_hf_tokenizer(hf_tokenizer([path], what), str(path))
    raise InputError(f"{what} {path}: no such file or directory")


# ---- the loader


def pico_decoder(weights: dict[str, torch.Tensor], run: Run, context: int,
                 model_config: dict | None = None) -> nn.Module:
    """A PicoDecoder of the run's shape holding `weights` (dynlab's names; LoRA factors are
    dropped: the standard names hold the effective weights)."""
    from dynlab.model.pico_decoder import ModelConfig, PicoDecoder

    s, mc = run.spec, model_config or {}
    cfg = ModelConfig(s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.activation_hidden_dim,
                      int(weights["embedding_proj.weight"].shape[0]), int(context),
                      norm_eps=float(mc.get("norm_eps", 1e-6)),
                      rope_theta=float(mc.get("position_emb_theta", mc.get("rope_theta",
                                                                             10000.0))))
    model = PicoDecoder(cfg)
    state = {k: v.float() for k, v in weights.items() if not k.endswith((".lora_A", ".lora_B"))}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SourceError(f"{run.path}: weights do not fit a PicoDecoder of its config "
                          f"({str(err).splitlines()[0]})") from None
    return model.eval()


def pico_context(model_config: dict, path: object) -> int:
    for key in ("max_seq_len", "max_position_embeddings"):
        if model_config.get(key):
            return int(model_config[key])
    raise SourceError(f"{path}: config.json has no max_seq_len (the model's context)")


def load_causal_lm(run: Run, ckpt: Checkpoint, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None,
                   need_tokenizer: bool = True, what: str = "eval") -> CausalLM:
    """The checkpoint `ckpt` of `run` (from `dynlab.sources.open_sources`) as a `CausalLM`
    (module docstring) on `device` in `dtype`. `tokenizer` overrides the checkpoint's own;
    need_tokenizer=False loads none. `what` prefixes error messages. Raises SourceError /
    InputError (exit 2) naming the path for what cannot be loaded."""
    reader = run.reader if isinstance(run, SourceRun) else None
    fmt = getattr(reader, "format", "dynlab")
    if fmt == "grads-data":  # a run wrapped to recompute gradients: its inner run's model
        inner = reader.inner
        same = next(c for c in inner.checkpoints if c.step == ckpt.step)
        return load_causal_lm(inner, same, device=device, dtype=dtype, tokenizer=tokenizer,
                              need_tokenizer=need_tokenizer, what=what)
    tok_dirs: list[Path] = []
    if reader is None:
        from dynlab.model import load_checkpoint_model

        model: nn.Module = load_checkpoint_model(ckpt.path)
        family, context = "pico", int(model.config.max_seq_len)
        own_tok = run.path / "tokenizer.json"
    elif fmt in ("pico-train", "relora-pico"):
        mc = dict(reader.model_config)
        context = pico_context(mc, ckpt.path / "config.json")
        model, family = pico_decoder(reader.weights(ckpt), run, context, mc), "pico"
        own_tok, tok_dirs = None, [Path(ckpt.path), run.path]
    elif fmt in ("hf", "hf-hub"):
        from dynlab.sources.arch import ADAPTERS
        from dynlab.sources.hf import model_spec

        if fmt == "hf-hub":
            model_dir = Path(reader.fetch(ckpt.revision))
            if need_tokenizer and tokenizer is None:
                tok_dirs = [Path(reader.fetch_tokenizer(ckpt.revision))]
        else:
            model_dir = Path(ckpt.path)
            tok_dirs = [model_dir, run.path]
        family = ADAPTERS[reader.model_type].family
        own_tok = None
        if family == "pico":
            mc, _, _ = model_spec(model_dir)
            context = pico_context(mc, model_dir / "config.json")
            model = pico_decoder(reader.weights(ckpt), run, context, mc)
        else:
            model = HFLogits(hf_model(model_dir, what, dtype))
            context = hf_context(model.hf)
    else:
        raise SourceError(f"{what}: {run.name} is a {fmt} source, which has no model to run")
    model = model.to(device=device, dtype=dtype).eval()
    vocab = output_width(model)
    tok = None
    if tokenizer is not None:
        tok = tokenizer_from(Path(tokenizer))
    elif need_tokenizer:
        if own_tok is not None:
            if not own_tok.is_file():
                raise SourceError(f"{what}: {run.name} has no tokenizer: {own_tok} is missing; "
                                  "pass --tokenizer")
            tok = wrap_dynlab_tokenizer(own_tok)
        else:
            dirs = list(dict.fromkeys(tok_dirs))
            try:
                native = hf_tokenizer(dirs, what)
            except InputError as err:
                raise SourceError(f"{err}; pass --tokenizer") from None
            tok = wrap_hf_tokenizer(native, str(dirs[0]))
    if tok is not None and tok.vocab_size > vocab:
        raise SourceError(f"{what}: the tokenizer {tok.name} has {tok.vocab_size} ids but the "
                          f"model {ckpt.path} only {vocab} outputs; wrong --tokenizer?")
    return CausalLM(model, tok, vocab, int(context), family, str(ckpt.path))


def output_width(model: nn.Module) -> int:
    """The vocabulary size of a causal LM: its output embedding's rows."""
    if isinstance(model, HFLogits):
        return int(model.hf.get_output_embeddings().weight.shape[0])
    return int(model.de_embedding_proj.weight.shape[0])
