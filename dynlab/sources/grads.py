"""Gradients recomputed per checkpoint on a fixed batch (`dynlab analyze --grads-data`).

The batch is made as dynlab's trainer makes its learning-dynamics batch: the documents of a
`.txt` (blank-line separated) or `.jsonl` (`text` field) file encoded as
`<|endoftext|> doc₁ <|endoftext|> doc₂ …` (or a pre-tokenised `.npy`/`.bin` stream), and its
first `batch_size` windows of `seq_len + 1` tokens. The gradient is the trainer's own
(`dynlab.training.dynamics.learning_dynamics`): of the mean next-token cross-entropy, float32,
eval mode, by torch.autograd.grad. The model is transformers' own class for a Hugging Face
architecture (chosen from transformers' built-in registry by model_type: never remote code),
or dynlab's PicoDecoder for pico-train, relora-pico and dynlab checkpoints. The gradients are
the store's kind `grads` (replacing a source's stored ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynlab.runs.checkpoints import Keep, Run
from dynlab.sources.base import (
    Grads,
    Reader,
    SourceCheckpoint,
    SourceError,
    SourceRun,
    Tensors,
    load_source_weights,
)


@dataclass(frozen=True)
class GradsData:
    path: Path
    batch_size: int = 8
    seq_len: int = 64
    tokenizer: Path | None = None


def make_batch(tokens: np.ndarray, batch_size: int, seq_len: int, source: str) -> torch.Tensor:
    """The first batch_size windows of seq_len + 1 tokens, (batch_size, seq_len + 1)."""
    need = batch_size * (seq_len + 1)
    if len(tokens) < need:
        raise SourceError(f"--grads-data {source}: only {len(tokens)} tokens; a batch of "
                          f"{batch_size} × {seq_len + 1} needs {need}")
    return torch.from_numpy(np.asarray(tokens[:need], dtype=np.int64).copy()).view(
        batch_size, seq_len + 1)


def read_batch(data: GradsData, tokenizer: Path | None) -> torch.Tensor:
    from dynlab.data.documents import (
        TEXT_SUFFIXES,
        TOKEN_SUFFIXES,
        read_text_documents,
        read_token_file,
    )
    from dynlab.data.tokenizer import encode_documents, load_tokenizer

    path = Path(data.path)
    if not path.is_file():
        raise SourceError(f"--grads-data {path}: no such file")
    if path.suffix in TOKEN_SUFFIXES:
        tokens = read_token_file(path)
    elif path.suffix in TEXT_SUFFIXES:
        tok = data.tokenizer or tokenizer
        if tok is None:
            raise SourceError(f"--grads-data {path}: text needs a tokenizer: pass "
                              "--grads-tokenizer tokenizer.json, or a tokenised .npy")
        tokens = encode_documents(load_tokenizer(tok), read_text_documents(path))
    else:
        raise SourceError(f"--grads-data {path}: expected .txt, .jsonl, .npy or .bin")
    return make_batch(tokens, data.batch_size, data.seq_len, str(path))


class _Logits(nn.Module):
    """A transformers causal LM as a module mapping token ids to logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def hf_model(model_dir: Path, model_type: str) -> nn.Module:
    """transformers' built-in class for `model_type`, loaded from a local model directory in
    float32 (no remote code: the class comes from transformers' own registry)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        raise SourceError("--grads-data for Hugging Face models needs transformers: "
                          "pip install 'dynlab[hf]'") from None
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise SourceError(f"{model_dir}: transformers has no causal LM class for {model_type!r}")
    cls = getattr(transformers, name)
    return cls.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False,
                               use_safetensors=None).eval()


def pico_model(weights: Tensors, run: Run, seq_len: int) -> nn.Module:
    from dynlab.model.pico_decoder import ModelConfig, PicoDecoder

    s = run.spec
    model = PicoDecoder(ModelConfig(s.d_model, s.n_layers, s.n_heads, s.n_kv_heads,
                                    s.activation_hidden_dim,
                                    int(weights["embedding_proj.weight"].shape[0]),
                                    max(seq_len, 1)))
    state = {k: v.float() for k, v in weights.items() if not k.endswith((".lora_A", ".lora_B"))}
    model.load_state_dict(state, strict=True)
    return model.eval()


def gradients(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The trainer's learning-dynamics gradient of `model` on `batch` (name -> gradient)."""
    from dynlab.model.dynamics import learning_dynamics

    grads, _, _ = learning_dynamics(model, batch, torch.device("cpu"))
    return grads


@dataclass(frozen=True)
class RecomputedGrads(Reader):
    """Wraps a run: same checkpoints and weights, gradients recomputed on a fixed batch."""

    inner: Run
    batch: torch.Tensor = field(compare=False, repr=False)
    data: GradsData | None = None
    format: str = "grads-data"

    def checkpoints(self, run_name: str) -> list[SourceCheckpoint]:
        return [SourceCheckpoint(run_name, c.step, c.path, reader=self,
                                 revision=getattr(c, "revision", None))
                for c in self.inner.checkpoints]

    def _inner_ckpt(self, ckpt: SourceCheckpoint):
        for c in self.inner.checkpoints:
            if c.step == ckpt.step:
                return c
        raise SourceError(f"{ckpt.path}: not a checkpoint of {self.inner.name}")

    def weights(self, ckpt: SourceCheckpoint, keep: Keep = None) -> Tensors:
        """Every weight, whatever `keep` says: the gradients are computed through the whole
        model."""
        return load_source_weights(self.inner, self._inner_ckpt(ckpt))

    def grad_kinds(self) -> tuple[str, ...]:
        inner = self.inner.reader.grad_kinds() if isinstance(self.inner, SourceRun) else ()
        return ("grads",) + tuple(k for k in inner if k == "train_grads")

    def grads(self, ckpt: SourceCheckpoint, weights: Tensors,
              kinds: tuple[str, ...] = ("grads", "train_grads")) -> Grads:
        inner_ckpt = self._inner_ckpt(ckpt)
        reader = self.inner.reader if isinstance(self.inner, SourceRun) else None
        seq_len = self.batch.shape[1] - 1
        if reader is not None and reader.format in ("hf", "hf-hub"):
            model_dir = (reader.fetch(inner_ckpt.revision) if reader.format == "hf-hub"
                         else inner_ckpt.path)
            model = _Logits(hf_model(model_dir, reader.model_type))
            raw = {k.removeprefix("model."): v for k, v in gradients(model, self.batch).items()}
            adapter = reader.adapter if reader.format == "hf" else _adapter(reader.model_type)
            g = adapter.convert(raw, self.inner.spec, model_dir)
        else:
            g = gradients(pico_model(weights, self.inner, seq_len), self.batch)
        train = None
        if reader is not None and "train_grads" in kinds and "train_grads" in reader.grad_kinds():
            train = reader.grads(inner_ckpt, weights, ("train_grads",)).train_grads
        return Grads(dict(g), train)

    def meta(self, ckpt: SourceCheckpoint) -> dict:
        return self._inner_ckpt(ckpt).meta()

    def release(self, ckpt: SourceCheckpoint) -> None:
        if isinstance(self.inner, SourceRun):
            self.inner.reader.release(self._inner_ckpt(ckpt))

    @property
    def lora_scale(self) -> float | None:
        return self.inner.lora_scale


def _adapter(model_type: str):
    from dynlab.sources.arch import ADAPTERS

    return ADAPTERS[model_type]


def default_tokenizer(run: Run) -> Path | None:
    """A tokenizer.json that belongs to the run: RUN/tokenizer.json (dynlab), or in the
    model directory or run directory of a local Hugging Face run."""
    candidates = [run.path / "tokenizer.json"]
    if run.checkpoints:
        candidates.append(Path(run.checkpoints[0].path) / "tokenizer.json")
    return next((c for c in candidates if c.is_file()), None)


def with_recomputed_grads(run: Run, data: GradsData) -> SourceRun:
    batch = read_batch(data, default_tokenizer(run))
    vocab = run.spec.vocab_size
    if int(batch.max()) >= vocab or int(batch.min()) < 0:
        raise SourceError(f"--grads-data {data.path}: token ids up to {int(batch.max())} do "
                          f"not fit the vocabulary of {run.name} ({vocab})")
    reader = RecomputedGrads(run, batch, data)
    config = dict(run.config)
    config["grads_data"] = {"path": str(data.path), "batch_size": data.batch_size,
                            "seq_len": data.seq_len}
    return SourceRun(run.name, run.path, config, run.spec,
                     tuple(reader.checkpoints(run.name)), reader=reader)
