"""What run.json says about a run's model and its ReLoRA resets.

`ModelConfig` is the one description of a model's shape: the pico-decoder builds from it,
the trainer stores it as run.json["model"], and the analysis reads its parameter shapes
from it (`dynlab.runs.checkpoints.ModelSpec` is this class). Shapes of other models
(Hugging Face, pico-train) fill only the six shape fields, with `explicit_head_dim` where the
head width is not d_model / n_heads.

ReLoRA resets: the trainer records the updates that a reset follows as
run.json["relora"]["reset_steps"]; `reset_steps` reads them, and derives them by the
trainer's rule (`reset_due`) for runs written before the key existed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from dynlab.runs.layout import CheckpointError

#: the fields every model description needs (run.json["model"] must hold them)
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "activation_hidden_dim",
                "vocab_size")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class ModelConfig:
    """A decoder's shape, names as in pico-train's model config.

    The six shape fields describe any Llama-style decoder; a pico-decoder also needs
    `max_seq_len` (its context) and uses `norm_eps` and `rope_theta` (`check_decoder`)."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    activation_hidden_dim: int
    vocab_size: int
    max_seq_len: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    #: the attention head width where it is not d_model / n_heads (some Llama-family configs)
    explicit_head_dim: int | None = None

    def __post_init__(self) -> None:
        for name in SHAPE_FIELDS:
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"model config: {name} must be a positive integer, got "
                                 f"{getattr(self, name)!r}")
        for name in ("max_seq_len", "explicit_head_dim"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"model config: {name} must be a positive integer, got "
                                 f"{value!r}")
        if self.explicit_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model config: d_model ({self.d_model}) must be divisible by "
                             f"n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model config: n_heads ({self.n_heads}) must be divisible by "
                             f"n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.d_model // self.n_heads

    def check_decoder(self) -> ModelConfig:
        """self, or ValueError naming the field when it cannot describe a pico-decoder (no
        max_seq_len, an explicit head width, an odd head width for rotary embeddings)."""
        if self.max_seq_len is None:
            raise ValueError("model config: max_seq_len must be a positive integer, got None")
        if self.explicit_head_dim is not None:
            raise ValueError("model config: a pico-decoder's head width is d_model / n_heads "
                             f"(got explicit_head_dim {self.explicit_head_dim})")
        if self.head_dim % 2:
            raise ValueError(f"model config: head dim d_model / n_heads = {self.head_dim} must "
                             "be even for rotary embeddings")
        return self

    def to_dict(self) -> dict:
        """run.json["model"]: every field, `explicit_head_dim` only when set."""
        out = asdict(self)
        if out["explicit_head_dim"] is None:
            del out["explicit_head_dim"]
        return out

    @classmethod
    def from_dict(cls, model: Mapping) -> ModelConfig:
        """From a mapping such as run.json["model"]; keys that are not fields are ignored.
        ValueError / TypeError for a missing or invalid field."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in model.items() if k in names})

    @classmethod
    def from_run_config(cls, config: Mapping, path: Path) -> ModelConfig:
        """The model of a run.json (`config`, read from `path`); CheckpointError naming the
        path when its "model" object lacks a shape field or holds an invalid value."""
        model = config.get("model")
        if not isinstance(model, Mapping) or any(k not in model for k in SHAPE_FIELDS):
            raise CheckpointError(f"{path}: run.json needs a 'model' object with "
                                  f"{', '.join(SHAPE_FIELDS)}")
        for k in SHAPE_FIELDS:
            if not _positive_int(model[k]):
                raise CheckpointError(f"{path}: run.json's model.{k} must be a positive "
                                      f"integer, got {model[k]!r}")
        try:
            return cls.from_dict(model)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: run.json's {err}") from None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape, as pico-train names them (Linear weights are (out, in))."""
        d, hd, h = self.d_model, self.head_dim, self.activation_hidden_dim
        shapes: dict[str, tuple[int, ...]] = {
            "embedding_proj.weight": (self.vocab_size, d),
            "de_embedding_proj.weight": (self.vocab_size, d),
            "output_norm.weight": (d,),
        }
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes[p + "attention.q_proj.weight"] = (self.n_heads * hd, d)
            shapes[p + "attention.k_proj.weight"] = (self.n_kv_heads * hd, d)
            shapes[p + "attention.v_proj.weight"] = (self.n_kv_heads * hd, d)
            shapes[p + "attention.o_proj.weight"] = (d, self.n_heads * hd)
            shapes[p + "swiglu.w_0.weight"] = (h, d)
            shapes[p + "swiglu.w_1.weight"] = (h, d)
            shapes[p + "swiglu.w_2.weight"] = (d, h)
            shapes[p + "attention_norm.weight"] = (d,)
            shapes[p + "swiglu_norm.weight"] = (d,)
        return shapes


# ---------------------------------------------------------------- ReLoRA resets


def reset_due(step: int, reset_every: int, warmup: int, total: int, paper_compat: bool) -> bool:
    """Whether a ReLoRA reset follows update number `step` (1-based).

    dynlab: every reset_every updates (step mod reset_every = 0), never after the last one,
    so the re-warmup of the jagged cosine (dynlab.training.schedules) starts right after the
    reset. paper_compat (relora-pico): step > warmup and step mod reset_every = 1, so the
    reset follows the zero-lr update that opens each re-warmup.
    """
    if paper_compat:
        return step > warmup and step % reset_every == 1
    return 0 < step < total and step % reset_every == 0


def planned_reset_steps(steps: int, reset_every: int, warmup: int, paper_compat: bool
                        ) -> list[int]:
    """The updates t that a reset follows in a run of `steps` updates (`reset_due`; a reset
    happens only before a further update, so t < steps)."""
    return [t for t in range(1, steps)
            if reset_due(t, reset_every, warmup, steps, paper_compat)]


def reset_steps(config: Mapping, last_step: float | None = None) -> list[int]:
    """The updates of a ReLoRA run that a reset follows, up to `last_step` (all when None),
    from its run.json (`config`); [] for a run without resets.

    run.json["relora"]["reset_steps"] when recorded; for runs written before that key, the
    trainer's rule applied to run.json's "relora" and "train" sections."""
    relora = config.get("relora") or {}
    if not isinstance(relora, Mapping):
        return []
    if last_step is not None and not math.isfinite(last_step):
        return []
    limit = math.inf if last_step is None else last_step
    recorded = relora.get("reset_steps")
    if isinstance(recorded, list):
        return [int(t) for t in recorded if t <= limit]
    every = relora.get("reset_every")
    if not every:
        return []
    train = config.get("train") or {}
    horizon = train.get("steps") or (None if last_step is None else int(last_step) + 1)
    if horizon is None:
        return []
    steps = planned_reset_steps(int(horizon), int(every), int(train.get("warmup_steps") or 0),
                                bool(relora.get("paper_compat") or train.get("paper_compat")))
    return [t for t in steps if t <= limit]
