"""Training options: one flat dataclass, preset defaults, YAML files, validation.

Options left at None take their preset's default (`PRESET_TRAIN`). `micro` (the default) is
CPU-sized. `tiny` … `large` are pico-scale defaults: pico-train's global batch of 1024
sequences of 2048 tokens per update (`global_batch_size`, split into micro-batches by
`dynlab.training.batching`), 20 000 steps, lr 3e-4, ReLoRA resets every 2000 steps. They are
not the study's exact configuration (the decoder's 2500-step warmup and 200 000-step decay
horizon, relora-pico's behaviours, the pre-tokenised data): that is configs/study/*.yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dynlab.model.pico_decoder import PRESETS
from dynlab.runs.config import ModelConfig

KINDS = ("decoder", "relora")

# Per-preset training defaults. tiny and small: the pico-relora study's values (pico-train's
# lr 3e-4). micro: a default relora run makes 1200 updates, resets every 200 (5 resets) and
# writes 13 checkpoints (steps 0, 100, ..., 1200) in ~2 minutes on 2 CPU cores; its 0.4 M
# parameters take a 10x larger learning rate (measured: macro perplexity 25 vs 37 after 1200
# decoder updates) and one CPU thread: at this size a second thread gains little on an idle
# machine and costs 10-20x when other processes compete for the cores (measured).
# tiny ... large: pico-train's global batch (BATCH_SIZE 1024 sequences of MAX_SEQ_LEN 2048
# tokens per update) and relora-pico's schedule. `global_batch_size` is filled only when
# --batch-size is not given (an explicit --batch-size keeps the per-micro-batch meaning).
_STUDY = dict(lr=3e-4, steps=20_000, warmup_steps=2000, checkpoint_every=1000,
              reset_every=2000, restart_warmup_steps=100, global_batch_size=1024, seq_len=2048,
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
    "large": _STUDY | dict(ld_batch_size=32),
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
    # global batch (sequences per update, all processes and micro-batches together); when
    # set, batch_size and grad_accum are derived from it, the per-process micro-batch and the
    # number of processes (dynlab.training.batching.apply_batch)
    global_batch_size: int | None = None
    micro_batch_size: int | None = None  # per process; None: a CUDA memory probe, else 1/W
    schedule_horizon: int | None = None  # steps over which the lr decays (None: --steps)
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
    model_vocab_size: int | None = None  # embedding rows (None: the tokenizer's size)
    n_documents: int | None = None  # documents drawn from the default corpus / HF dataset
    # output and checkpoints
    out: str | None = None  # default runs/<kind>-<preset>
    checkpoint_every: int | None = None
    ld_batch_size: int | None = None  # sequences in the fixed learning-dynamics batch
    save_activations: bool = False
    activation_positions: str = "last"  # last | all | sample:N (dynlab.analysis.activations)
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
    log: str | None = None  # live logging: "tensorboard" or "wandb" (dynlab.training.livelog)
    # relora
    lora_rank: int = 16  # the LoRA rank r (run.json: "rank")
    lora_alpha: float = 32.0  # s = lora_alpha / lora_rank (run.json: "alpha")
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
        check_types(self)
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: unknown preset; choose one of "
                             f"{', '.join(PRESETS)}")
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: expected one of {KINDS}")
        defaults = dict(PRESET_TRAIN[self.preset])
        if self.batch_size is not None:  # an explicit micro-batch keeps its own meaning
            defaults.pop("global_batch_size", None)
        if "global_batch_size" in defaults or self.global_batch_size is not None:
            defaults.setdefault("batch_size", 1)  # derived below by apply_batch
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.vocab_size is None:
            updates["vocab_size"] = PRESETS[self.preset].vocab_size
        if self.out is None:
            updates["out"] = str(Path("runs") / f"{self.kind}-{self.preset}")
        cfg = dataclasses.replace(self, **updates)
        if cfg.eval_every is None:
            cfg = dataclasses.replace(cfg, eval_every=cfg.checkpoint_every)
        from dynlab.training.batching import apply_batch

        cfg = apply_batch(cfg, 1)  # one process; the trainer re-derives for its world size
        validate(cfg)
        return cfg

    def to_dict(self) -> dict:
        """run.json["train"]: every option, under its stored name (`STORED_NAMES`)."""
        return {STORED_NAMES.get(k, k): v for k, v in asdict(self).items()}

    @classmethod
    def from_stored(cls, stored: dict) -> TrainConfig:
        """The options of a run.json["train"]; stored names are mapped back to the fields
        (`option_name`), unknown keys ignored."""
        known = set(option_names())
        options = {option_name(k): v for k, v in stored.items()}
        return cls(**{k: v for k, v in options.items() if k in known})


#: fields stored in run.json under another name: the names runs have always used
STORED_NAMES = {"lora_rank": "rank", "lora_alpha": "alpha"}
#: older or shorter names of options, accepted wherever options are read (YAML files, Python
#: keyword arguments, run.json["train"]) and mapped to the field
ALIASES = {"rank": "lora_rank", "alpha": "lora_alpha", "r": "lora_rank", "rank_r": "lora_rank"}


def option_name(key: str) -> str:
    """The TrainConfig field that an option name means: dashes as underscores, `ALIASES`
    mapped (the LoRA rank's old names `rank`, `r`, `rank_r`; `alpha`)."""
    name = str(key).replace("-", "_")
    return ALIASES.get(name, name)


_TEXT = ("kind", "preset", "data", "device", "prune_method")
_OPTIONAL_TEXT = ("tokenizer", "out", "eval_ppl", "eval_blimp", "warm_start", "log")
_SWITCHES = ("save_activations", "resume", "overwrite", "compile", "progress", "paper_compat")


def check_types(cfg: TrainConfig) -> None:
    """ValueError naming the option whose value (from a YAML file, say) has the wrong type:
    text options need a string, switches true/false, --seed an integer."""
    def wrong(name: str, what: str, value: object) -> ValueError:
        return ValueError(f"--{name.replace('_', '-')}: expected {what}, got {value!r}")

    for name in _TEXT + _OPTIONAL_TEXT:
        value = getattr(cfg, name)
        if not isinstance(value, str) and not (value is None and name in _OPTIONAL_TEXT):
            raise wrong(name, "a string", value)
    for name in _SWITCHES:
        if not isinstance(getattr(cfg, name), bool):
            raise wrong(name, "true or false", getattr(cfg, name))
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise wrong("seed", "an integer", cfg.seed)


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
    if cfg.log not in (None, "tensorboard", "wandb"):
        raise ValueError(f"--log: expected tensorboard or wandb, got {cfg.log!r}")
    for name in ("lr", "min_lr_ratio", "weight_decay", "lora_alpha", "lora_dropout",
                 "prune_ratio"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"--{name.replace('_', '-')}: expected a number, got {value!r}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr: expected a positive learning rate, got {cfg.lr!r}")
    for name in ("eval_ppl_docs", "eval_pairs_per_uid"):
        _positive(cfg, name)
    if cfg.threads is not None:
        _positive(cfg, "threads")
    for name in ("global_batch_size", "micro_batch_size", "schedule_horizon",
                 "model_vocab_size"):
        if getattr(cfg, name) is not None:
            _positive(cfg, name)
    if cfg.schedule_horizon is not None and cfg.schedule_horizon < cfg.steps:
        raise ValueError(f"--schedule-horizon {cfg.schedule_horizon}: expected at least --steps "
                         f"({cfg.steps}); the learning rate must not reach 0 before the end")
    # validates the shape (heads, dims)
    mcfg = model_config(cfg, cfg.model_vocab_size or cfg.vocab_size)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds max_seq_len {mcfg.max_seq_len} of "
                         f"preset {cfg.preset!r}")
    if cfg.stop_at is not None and not 0 < cfg.stop_at <= cfg.steps:
        raise ValueError(f"--stop-at: expected 1..{cfg.steps}, got {cfg.stop_at}")
    from dynlab.analysis.activations import parse_positions

    parse_positions(cfg.activation_positions)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if cfg.kind == "relora":
        _positive(cfg, "reset_every")
        _positive(cfg, "restart_warmup_steps", allow_zero=True)
        _positive(cfg, "lora_rank")
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
        return dataclasses.replace(PRESETS[cfg.preset], vocab_size=vocab_size,
                                   **overrides).check_decoder()
    except ValueError as err:
        raise ValueError(f"preset {cfg.preset!r} with {overrides or 'no overrides'}: {err}"
                         ) from err


def relora_config(cfg: TrainConfig):  # -> ReLoRAConfig
    """The ReLoRAConfig a relora run uses."""
    from dynlab.model.relora import ReLoRAConfig

    return ReLoRAConfig(r=cfg.lora_rank, alpha=float(cfg.lora_alpha),
                        dropout=float(cfg.lora_dropout),
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
        name = option_name(key)
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
    merged.update({option_name(k): v for k, v in options.items() if v is not None})
    if merged.get("global_batch_size") is not None:
        both = [k for k in ("batch_size", "grad_accum") if merged.get(k) is not None]
        if both:
            raise ValueError(
                f"--global-batch-size with --{both[0].replace('_', '-')}: give the global batch "
                "(and optionally --micro-batch-size), or --batch-size and --grad-accum, not both")
    unknown = set(merged) - set(option_names())
    if unknown:
        raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
    merged.pop("kind", None)
    return TrainConfig(kind=kind, **merged)
