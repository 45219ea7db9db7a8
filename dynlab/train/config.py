"""Training options: one flat dataclass, preset defaults, YAML files, validation.

Options left at None take their preset's default (`PRESET_TRAIN`), so `--preset tiny`
alone gives the study's schedule (2000-step resets, 100-step restart warmup,
1000-step checkpoints) and `micro` (the default) a CPU-sized one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dynlab.model.pico_decoder import PRESETS, ModelConfig

KINDS = ("decoder", "relora")

# Per-preset training defaults. tiny and small: the pico-relora study's values (pico-train's
# lr 3e-4). micro: a default relora run makes 1200 updates, resets every 200 (5 resets) and
# writes 13 checkpoints (steps 0, 100, ..., 1200) in ~2 minutes on 2 CPU cores; its 0.4 M
# parameters take a 10x larger learning rate (measured: macro perplexity 25 vs 37 after 1200
# decoder updates) and one CPU thread: at this size a second thread gains little on an idle
# machine and costs 10-20x when other processes compete for the cores (measured).
_STUDY = dict(lr=3e-4, steps=20_000, warmup_steps=2000, checkpoint_every=1000,
              reset_every=2000, restart_warmup_steps=100, batch_size=32, seq_len=2048,
              ld_batch_size=128, log_every=10, n_documents=200_000, eval_ppl_docs=200,
              eval_pairs_per_uid=50)
PRESET_TRAIN: dict[str, dict[str, Any]] = {
    "micro": dict(lr=3e-3, steps=1200, warmup_steps=50, checkpoint_every=100, reset_every=200,
                  restart_warmup_steps=20, batch_size=8, seq_len=128, ld_batch_size=16,
                  log_every=10, n_documents=20_000, eval_ppl_docs=50, eval_pairs_per_uid=25,
                  threads=1),
    "tiny": dict(_STUDY),
    "small": dict(_STUDY),
    "medium": _STUDY | dict(ld_batch_size=64),
    "large": _STUDY | dict(batch_size=16, ld_batch_size=32),
}


@dataclass
class TrainConfig:
    """Every option of `dynlab train decoder|relora` (None: the preset's default)."""

    kind: str = "decoder"
    preset: str = "micro"
    # schedule and optimisation (AdamW as pico-train: lr 3e-4, torch's betas/eps/weight decay)
    steps: int | None = None
    warmup_steps: int | None = None
    lr: float | None = None  # peak learning rate: pico-train's 3e-4; micro 3e-3
    min_lr_ratio: float = 0.1  # relora's jagged cosine floor
    weight_decay: float = 0.01
    batch_size: int | None = None  # sequences per micro-batch, GLOBAL: W processes take 1/W each
    grad_accum: int = 1
    seq_len: int | None = None
    seed: int = 0
    # model shape overrides (None: the preset's value)
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    activation_hidden_dim: int | None = None
    max_seq_len: int | None = None
    # data
    data: str = "default"
    tokenizer: str | None = None  # a tokenizer.json; else BPE trained on the data and cached
    vocab_size: int | None = None  # BPE target size (default: the preset's vocab_size)
    n_documents: int | None = None  # documents drawn from the default corpus / HF dataset
    # output and checkpoints
    out: str | None = None  # default runs/<kind>-<preset>
    checkpoint_every: int | None = None
    ld_batch_size: int | None = None  # sequences in the fixed learning-dynamics batch
    save_activations: bool = False
    activation_positions: str = "last"  # last | all | sample:N (dynlab.activations)
    log_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    stop_at: int | None = None  # stop after this step without a final checkpoint (as a crash)
    # evaluation hook
    eval_every: int | None = None  # default the checkpoint interval; 0 disables
    eval_ppl: str | None = None
    eval_blimp: str | None = None
    eval_batch_size: int = 32
    eval_ppl_docs: int | None = None  # default eval data size (dynlab.eval.default_eval_data)
    eval_pairs_per_uid: int | None = None
    # hardware
    device: str = "auto"
    threads: int | None = None  # CPU threads (torch.set_num_threads); micro 1, else torch's
    compile: bool = False
    progress: bool = True
    # relora
    rank: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.1
    reset_every: int | None = None
    restart_warmup_steps: int | None = None
    prune_ratio: float = 0.999
    prune_method: str = "random"
    paper_compat: bool = False
    warm_start: str | None = None
    extra: dict = field(default_factory=dict)  # free-form notes stored in run.json

    def resolved(self) -> TrainConfig:
        """A copy with every None default filled from the preset, validated."""
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: unknown preset; choose one of "
                             f"{', '.join(PRESETS)}")
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: expected one of {KINDS}")
        defaults = PRESET_TRAIN[self.preset]
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.vocab_size is None:
            updates["vocab_size"] = PRESETS[self.preset].vocab_size
        if self.out is None:
            updates["out"] = str(Path("runs") / f"{self.kind}-{self.preset}")
        cfg = dataclasses.replace(self, **updates)
        if cfg.eval_every is None:
            cfg = dataclasses.replace(cfg, eval_every=cfg.checkpoint_every)
        validate(cfg)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def _positive(cfg: TrainConfig, name: str, flag: str | None = None, allow_zero: bool = False
              ) -> None:
    value = getattr(cfg, name)
    flag = flag or "--" + name.replace("_", "-")
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{flag}: expected {what} integer, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Clear errors before training for option values that cannot work."""
    for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "grad_accum",
                 "ld_batch_size", "log_every", "vocab_size", "n_documents", "eval_batch_size"):
        _positive(cfg, name)
    for name in ("warmup_steps", "eval_every"):
        _positive(cfg, name, allow_zero=True)
    if not cfg.lr > 0:
        raise ValueError(f"--lr: expected a positive learning rate, got {cfg.lr!r}")
    for name in ("eval_ppl_docs", "eval_pairs_per_uid"):
        _positive(cfg, name)
    if cfg.threads is not None:
        _positive(cfg, "threads")
    mcfg = model_config(cfg, cfg.vocab_size)  # validates the shape (heads, dims)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds max_seq_len {mcfg.max_seq_len} of "
                         f"preset {cfg.preset!r}")
    if cfg.stop_at is not None and not 0 < cfg.stop_at <= cfg.steps:
        raise ValueError(f"--stop-at: expected 1..{cfg.steps}, got {cfg.stop_at}")
    from dynlab.activations import parse_positions

    parse_positions(cfg.activation_positions)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if cfg.kind == "relora":
        _positive(cfg, "reset_every")
        _positive(cfg, "restart_warmup_steps", allow_zero=True)
        _positive(cfg, "rank")
        if not 0 < cfg.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio: expected a value in (0, 1], got {cfg.min_lr_ratio}")
        relora_config(cfg)  # validates the ReLoRA fields
    elif cfg.warm_start or cfg.paper_compat:
        raise ValueError("--warm-start and --paper-compat apply to `dynlab train relora` only")


MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "activation_hidden_dim",
                "max_seq_len")


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The preset's ModelConfig with the run's shape overrides and vocabulary size."""
    overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS if getattr(cfg, k) is not None}
    try:
        return dataclasses.replace(PRESETS[cfg.preset], vocab_size=vocab_size, **overrides)
    except ValueError as err:
        raise ValueError(f"preset {cfg.preset!r} with {overrides or 'no overrides'}: {err}"
                         ) from err


def relora_config(cfg: TrainConfig):  # -> ReLoRAConfig
    """The ReLoRAConfig a relora run uses."""
    from dynlab.model.relora import ReLoRAConfig

    return ReLoRAConfig(r=cfg.rank, alpha=float(cfg.alpha), dropout=float(cfg.lora_dropout),
                        reset_every=cfg.reset_every,
                        restart_warmup_steps=cfg.restart_warmup_steps,
                        prune_ratio=float(cfg.prune_ratio), prune_method=cfg.prune_method,
                        paper_compat=bool(cfg.paper_compat))


def option_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def load_yaml_options(path: str | Path) -> dict[str, Any]:
    """Options from a YAML mapping; keys as the CLI flags (`reset-every` or `reset_every`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value")
    known = set(option_names()) - {"extra"}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "rank_r" or name == "r":
            name = "rank"
        if name not in known:
            raise ValueError(f"--config {path}: unknown option {key!r}; known: "
                             f"{', '.join(sorted(known))}")
        out[name] = value
    return out


def make_config(kind: str, options: dict[str, Any], config_file: str | Path | None = None
                ) -> TrainConfig:
    """TrainConfig from a YAML file overlaid by explicit options (explicit wins)."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(load_yaml_options(config_file))
    merged.update({k: v for k, v in options.items() if v is not None})
    unknown = set(merged) - set(option_names())
    if unknown:
        raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
    merged.pop("kind", None)
    return TrainConfig(kind=kind, **merged)
