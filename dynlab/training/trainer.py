"""The bundled trainer: pico-decoder or pico-relora with learning-dynamics checkpoints.

    run_dir = train("relora", steps=600, out="runs/relora")

One optimizer update ("step") is `grad_accum` micro-batches of `batch_size` windows of
`seq_len + 1` tokens. At step 0, every `checkpoint_every` steps and at the last step the
trainer writes a checkpoint (weights, learning-dynamics gradients, optional activations,
resume state, meta.json last).

Under torchrun (WORLD_SIZE > 1) the same loop trains with DistributedDataParallel:
`batch_size` stays the global micro-batch, split across processes, and only rank 0 writes;
see `dynlab.training.ddp` for the rules (data sharding, loss averaging, ReLoRA resets kept in
step, resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dynlab.errors import DynlabFailure, InputError
from dynlab.faults import fault_point
from dynlab.model.pico_decoder import ModelConfig, PicoDecoder
from dynlab.model.relora import (
    ReLoRALinear,
    capture_effective_weights,
    effective_state_dict,
    relora_modules,
    unwrap,
    wrap_relora,
)
from dynlab.training import batching, ddp
from dynlab.training import data as D
from dynlab.training import pretokenized as P
from dynlab.training.checkpointing import (
    MetricsLog,
    clean_incomplete,
    complete_checkpoints,
    metrics_record,
    read_trainer_state,
    remove_run_files,
    write_checkpoint,
    write_json,
)
from dynlab.training.config import (
    MODEL_FIELDS,
    TrainConfig,
    make_config,
    model_config,
    relora_config,
)
from dynlab.training.schedules import lr_multiplier, reset_due


class TrainingDiverged(DynlabFailure):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------- process / device


def dist_info() -> tuple[int, int]:
    """(rank, world_size): (0, 1) unless torch.distributed is initialised."""
    if ddp.initialized():
        return ddp.world()
    return 0, 1


def is_main() -> bool:
    """Only rank 0 logs and writes files."""
    return dist_info()[0] == 0


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: not a torch device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA, plain float32 elsewhere (as pico-train)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def capture_rng(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Run a block without disturbing the training RNG streams."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


# ---------------------------------------------------------------- loss and training step


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
            ) -> torch.Tensor:
    """Next-token cross-entropy: -mean_t log softmax(logits_t)[target_t]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction=reduction)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[torch.Tensor], lr: float, device: torch.device, *,
               no_sync=None) -> float:
    """One update: mean loss over the micro-batches, gradients accumulated, AdamW step.

    Under DDP, `no_sync` (DistributedDataParallel.no_sync) skips the gradient all-reduce of
    every micro-batch but the last, and the returned loss is the mean over ranks, so every
    rank takes the same decision. Returns the mean loss; when it is not finite no update is
    made (the caller stops)."""
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        defer = no_sync is not None and i < len(micro_batches) - 1
        with no_sync() if defer else contextlib.nullcontext():
            with autocast(device):
                logits = model(batch[:, :-1])
            loss = lm_loss(logits, batch[:, 1:]) / len(micro_batches)
            loss.backward()
        total += loss.item()
    total = ddp.mean_over_ranks(total, device)
    if math.isfinite(total):
        optimizer.step()
    return total


# ---------------------------------------------------------------- learning dynamics


def learning_dynamics(model: nn.Module, ld_batch: torch.Tensor, device: torch.device, *,
                      activations: bool = False, chunk_tokens: int = 16_384,
                      positions: str = "last", seed: int = 0,
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, float]:
    """Gradients of the mean next-token loss on the fixed batch, apart from training.

    The model runs in eval mode (no dropout) and float32, the batch in chunks; gradients
    come from torch.autograd.grad, so parameters' .grad, the optimizer and the RNG are
    untouched. For relora the gradient with respect to each effective weight
    W_eff = W + s·B A is stored under the standard name `<module>.weight` (the gradient
    an unwrapped model holding W_eff would get); the factors' gradients under
    `<module>.lora_A` / `.lora_B`. Returns (grads, activations or None, mean loss), where
    activations hold, at the kept token `positions` (`last`, `all` or `sample:N` drawn with
    `seed`; dynlab.analysis.activations), each linear module's output and each block's output (the
    residual stream, `layers.<i>`), plus `token_positions` and `batch_tokens`
    (dynlab.analysis.activations).
    """
    from dynlab.analysis.activations import Recorder, recorded_modules, select_positions

    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wrapped = relora_modules(model)
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for name, m in wrapped.items():
        grads[f"{name}.weight"] = torch.zeros_like(m.weight, dtype=torch.float32)
    recorder = None
    if activations:
        kept = select_positions(positions, ld_batch.shape[0], ld_batch.shape[1] - 1, seed)
        recorder = Recorder(recorded_modules(model, (nn.Linear, ReLoRALinear)), kept)
    n_seq, width = ld_batch.shape
    total_tokens = n_seq * (width - 1)
    chunk = max(1, chunk_tokens // max(1, width - 1))
    loss_sum = 0.0
    try:
        with preserved_rng(device), capture_effective_weights(model) as captured:
            for start in range(0, n_seq, chunk):
                for lst in captured.values():
                    lst.clear()
                batch = ld_batch[start:start + chunk].to(device)
                if recorder is not None:
                    recorder.start, recorder.stop = start, start + batch.shape[0]
                logits = model(batch[:, :-1])
                loss = lm_loss(logits, batch[:, 1:], reduction="sum") / total_tokens
                names = list(params) + [f"{n}.weight" for n in wrapped]
                inputs = list(params.values()) + [captured[n][0] for n in wrapped]
                for name, g in zip(names, torch.autograd.grad(loss, inputs, allow_unused=True),
                                   strict=True):
                    if g is not None:
                        grads[name] += g.float()
                loss_sum += loss.item()
    finally:
        if recorder is not None:
            recorder.remove()
        model.train(was_training)
    out_acts = recorder.result(ld_batch) if recorder is not None else None
    return grads, out_acts, loss_sum


@torch.no_grad()
def batch_loss(model: nn.Module, batch: torch.Tensor, device: torch.device) -> float:
    """Mean next-token loss of a batch in eval mode (no dropout), RNG untouched."""
    was_training = model.training
    model.eval()
    try:
        with preserved_rng(device):
            batch = batch.to(device)
            return lm_loss(model(batch[:, :-1]), batch[:, 1:]).item()
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- evaluation hook


class EvalHook:
    """Calls dynlab.eval.evaluate at evaluation steps; data loaded once, lazily."""

    def __init__(self, cfg: TrainConfig, tokenizer, device: torch.device, say) -> None:
        self.cfg, self.tokenizer, self.device, self.say = cfg, tokenizer, device, say
        self.enabled = cfg.eval_every > 0
        self._data = None

    def due(self, step: int, last: bool) -> bool:
        return self.enabled and (step % self.cfg.eval_every == 0 or last)

    def _load(self):
        try:
            import dynlab.eval as E
        except ImportError as err:
            warnings.warn(f"evaluation disabled: dynlab.eval is not importable ({err})",
                          stacklevel=2)
            self.enabled = False
            return None
        cfg = self.cfg
        if cfg.eval_ppl or cfg.eval_blimp:
            return E.load_eval_data(cfg.eval_ppl, cfg.eval_blimp)
        if cfg.data == D.DEFAULT_DATA:
            return E.default_eval_data(cfg.eval_ppl_docs, cfg.eval_pairs_per_uid)
        self.say("evaluation off: custom --data without --eval-ppl/--eval-blimp")
        self.enabled = False
        return None

    def __call__(self, model: nn.Module) -> dict | None:
        """The evaluation of `model`; loading the data, unwrapping a relora model and
        evaluating all run inside `preserved_rng`, so the training RNG never moves."""
        with preserved_rng(self.device):
            if self._data is None:
                self._data = self._load()
            if not self.enabled or self._data is None:
                return None
            from dynlab.eval import evaluate

            plain = unwrap(model) if relora_modules(model) else model
            return evaluate(plain, self.tokenizer, self._data, device=str(self.device),
                            batch_size=self.cfg.eval_batch_size, max_seq_len=self.cfg.seq_len)


# ---------------------------------------------------------------- data and model


def _is_local_spec(spec: str) -> bool:
    p = Path(spec).expanduser()
    return (p.exists() or p.suffix in D.TEXT_SUFFIXES + D.TOKEN_SUFFIXES + P.ROW_SUFFIXES
            or spec.startswith((".", "/", "~")))


def load_data(cfg: TrainConfig, tokenizer_path: Path | None) -> tuple[object, D.TokenData]:
    """(tokenizer, TokenData) for cfg.data; tokenizer_path (resume / warm start / --tokenizer)
    overrides training a BPE tokenizer on the documents."""
    spec = cfg.data
    tokens = None
    documents: list[str] = []
    rows = P.open_rows(spec) if spec != D.DEFAULT_DATA else None
    if rows is not None:  # pre-tokenised rows of seq_len + 1 ids, used as they are
        if tokenizer_path is None:
            raise ValueError(f"--data {spec}: pre-tokenised data needs --tokenizer (the one its "
                             "ids come from: a tokenizer.json, a directory holding one, or a "
                             "Hugging Face model name)")
        tokenizer = D.load_tokenizer(tokenizer_path)
        return tokenizer, P.load_rows(rows, cfg.seq_len, cfg.ld_batch_size, tokenizer,
                                      cfg.model_vocab_size, spec)
    if spec == D.DEFAULT_DATA:
        documents = D.default_documents(cfg.n_documents)
    elif _is_local_spec(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--data {spec}: file not found (expected 'default', a "
                                    ".txt/.jsonl/.npy/.bin/.parquet/.arrow file or directory, "
                                    "or a Hugging Face dataset name)")
        files = ([path] if path.is_file() else
                 sorted(p for p in path.iterdir()
                        if p.suffix in D.TEXT_SUFFIXES + D.TOKEN_SUFFIXES))
        if not files:
            raise ValueError(f"--data {spec}: no .txt/.jsonl/.npy/.bin files in the directory")
        kinds = {f.suffix in D.TOKEN_SUFFIXES for f in files}
        if len(kinds) > 1:
            raise ValueError(f"--data {spec}: mixes text and pre-tokenised files")
        for f in files:
            if f.suffix not in D.TEXT_SUFFIXES + D.TOKEN_SUFFIXES:
                raise ValueError(f"--data {f}: unsupported file type {f.suffix!r} (expected "
                                 ".txt, .jsonl, .npy or .bin)")
        if kinds == {True}:
            if tokenizer_path is None:
                raise ValueError(f"--data {spec}: pre-tokenised data needs --tokenizer "
                                 "(the tokenizer.json its ids come from)")
            tokens = torch.cat([torch.from_numpy(D.read_token_file(f)) for f in files]).numpy()
        else:
            for f in files:
                documents += D.read_text_documents(f)
    else:
        documents = D.hf_documents(spec, cfg.n_documents)
    if tokens is None and not documents:
        raise ValueError(f"--data {spec}: no documents (the data is empty)")
    if tokenizer_path is not None:
        tokenizer = D.load_tokenizer(tokenizer_path)
    else:
        tokenizer = D.get_tokenizer(documents, cfg.vocab_size)
    if tokens is None:
        tokens = D.encode_documents(tokenizer, documents)
    elif len(tokens) and int(tokens.max()) >= tokenizer.get_vocab_size():
        raise ValueError(f"--data {spec}: token id {int(tokens.max())} is outside the "
                         f"tokenizer's vocabulary ({tokenizer.get_vocab_size()})")
    return tokenizer, D.split_stream(tokens, cfg.seq_len, cfg.ld_batch_size, f"--data {spec}")


def warm_start_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest complete checkpoint of a run directory."""
    p = Path(path).expanduser()
    if (p / "weights.safetensors").is_file():
        return p
    found = complete_checkpoints(p)
    if not found:
        raise FileNotFoundError(f"--warm-start {path}: neither a checkpoint directory nor a "
                                "run with complete checkpoints")
    return found[-1][1]


def build_model(cfg: TrainConfig, mcfg: ModelConfig, warm_ckpt: Path | None) -> PicoDecoder:
    """PicoDecoder (seeded init or warm start), wrapped for relora runs."""
    torch.manual_seed(cfg.seed)
    model = PicoDecoder(mcfg)
    if warm_ckpt is not None:
        from dynlab.model import load_checkpoint_model, read_model_config

        src = read_model_config(warm_ckpt.parent.parent)
        if dataclasses.asdict(src) != dataclasses.asdict(mcfg):
            raise ValueError(f"--warm-start {warm_ckpt}: model {dataclasses.asdict(src)} "
                             f"differs from this run's {dataclasses.asdict(mcfg)}")
        model.load_state_dict(load_checkpoint_model(warm_ckpt).state_dict())
    if cfg.kind == "relora":
        wrap_relora(model, relora_config(cfg))
    return model


def make_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device
                   ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (torch's betas and eps; fused kernels on CUDA)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=True if device.type == "cuda" else None)


# ---------------------------------------------------------------- run directory


RESUME_MUTABLE = {"resume", "overwrite", "stop_at", "device", "threads", "progress", "compile",
                  "eval_every", "eval_ppl", "eval_blimp", "eval_batch_size", "save_activations",
                  "activation_positions",
                  "log_every", "out", "micro_batch_size"}
MODEL_DEFINING = {"kind", "preset", "rank", "alpha", "paper_compat", "vocab_size", "tokenizer",
                  *MODEL_FIELDS}


def resume_config(cfg: TrainConfig, explicit: set[str], run_dir: Path) -> TrainConfig:
    """The stored run's options, with the explicitly given mutable ones applied."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} has no run.json (nothing to resume)")
    try:
        stored = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"--resume: {path} is not valid JSON ({err})") from err
    if not isinstance(stored, dict) or not isinstance(stored.get("train", {}), dict):
        raise InputError(f"--resume: {path}: expected an object with a 'train' object")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in stored.get("train", {}).items() if k in known})
    try:
        base.resolved()
    except (ValueError, TypeError) as err:
        raise InputError(f"--resume: {path} holds options that cannot train: {err}") from err
    given = dataclasses.asdict(cfg)
    for name in sorted(explicit | {"kind"}):
        if name in RESUME_MUTABLE or name not in given:
            continue
        if given[name] != getattr(base, name):
            what = "a run of another model" if name in MODEL_DEFINING else "a run whose option"
            raise ValueError(
                f"--resume into {what}: {run_dir} has {name}={getattr(base, name)!r}, "
                f"given {given[name]!r}"
            )
    mutable = {"stop_at": None}  # an interruption of the stored run is not carried over
    mutable |= {k: given[k] for k in explicit if k in RESUME_MUTABLE and k in given}
    mutable |= {"resume": True, "overwrite": False}
    return dataclasses.replace(base, **mutable)


def check_out_dir(cfg: TrainConfig) -> Path:
    """Errors for an --out that cannot be used; changes nothing on disk."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    if cfg.resume:
        return out
    if nonempty and not cfg.overwrite:
        raise FileExistsError(f"--out {out}: exists and is not empty; pass --resume to continue "
                              "that run or --overwrite to replace it")
    if nonempty and not (out / "run.json").is_file():
        raise FileExistsError(f"--out {out}: --overwrite refuses to delete a directory that "
                              "is not a dynlab run (no run.json)")
    return out


def interrupted_run(cfg: TrainConfig) -> bool:
    """Whether --out holds an unfinished run of exactly these options (all but those a resume
    may change, RESUME_MUTABLE): then rerunning the command that was interrupted continues
    that run, which an exact resume makes the same as starting it again."""
    if cfg.resume or cfg.overwrite or cfg.stop_at is not None:
        return False
    out = Path(cfg.out).expanduser()
    try:
        stored = json.loads((out / "run.json").read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(stored, dict):
        return False
    given = cfg.to_dict()
    if any(stored.get(k) != v for k, v in given.items() if k not in RESUME_MUTABLE | {"extra"}):
        return False
    return not any(step >= cfg.steps for step, _ in complete_checkpoints(out))


def continue_interrupted(cfg: TrainConfig) -> TrainConfig:
    """cfg with --resume set when --out holds its interrupted run (interrupted_run), said on
    the console; else cfg."""
    if not interrupted_run(cfg):
        return cfg
    warnings.warn(f"--out {cfg.out}: holds an unfinished run of these options; continuing it "
                  "(as --resume; --overwrite starts it again)", stacklevel=2)
    return dataclasses.replace(cfg, resume=True)


# ---------------------------------------------------------------- the training loop


@dataclass
class TrainState:
    step: int = 0
    data_position: int = 0
    relora_cycle: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    train_loss: float = math.nan
    device_seconds: float = 0.0  # wall-clock × processes, summed over sessions


def _progress(enabled: bool, console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                   "{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
        console=console,
    )


def run_training(cfg: TrainConfig, explicit: set[str] | None = None) -> Path:
    """Train according to cfg; returns the run directory. Under torchrun (WORLD_SIZE > 1)
    every process calls this and joins the process group (dynlab.training.ddp)."""
    threads_before = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        try:
            return _run_training(cfg, set(explicit or ()), stack)
        finally:
            torch.set_num_threads(threads_before)


def _run_training(cfg: TrainConfig, explicit: set[str], stack: contextlib.ExitStack) -> Path:
    cfg = continue_interrupted(cfg.resolved())
    run_dir = check_out_dir(cfg)
    resume_ckpt: Path | None = None
    if cfg.resume:
        cfg = resume_config(cfg, explicit, run_dir).resolved()
        found = complete_checkpoints(run_dir)
        resume_ckpt = found[-1][1] if found else None
    cfg = batching.apply_batch(cfg, ddp.world()[1])  # the global batch over W processes
    # checks every process makes identically before any of them joins the process group
    local_batch = ddp.check_batch_size(cfg.batch_size, ddp.world()[1])
    device = ddp.process_device(resolve_device(cfg.device), ddp.world()[1])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = stack.enter_context(ddp.process_group(device))
    main = rank == 0

    from rich.console import Console

    console = Console(stderr=True, quiet=not (cfg.progress and main))
    say = console.print

    # tokenizer and data (errors here leave --out untouched)
    warm_ckpt = (warm_start_checkpoint(cfg.warm_start)
                 if cfg.warm_start and resume_ckpt is None else None)
    if cfg.resume and (run_dir / "tokenizer.json").is_file():
        tok_path: Path | None = run_dir / "tokenizer.json"
    elif cfg.tokenizer:
        tok_path = Path(cfg.tokenizer).expanduser()
    elif warm_ckpt is not None:
        tok_path = warm_ckpt.parent.parent / "tokenizer.json"
    else:
        tok_path = None

    def prepare(tok_path: Path | None):
        tokenizer, data = load_data(cfg, tok_path)
        mcfg = model_config(cfg, P.model_vocab(tokenizer, cfg.model_vocab_size))
        return tokenizer, data, mcfg, build_model(cfg, mcfg, warm_ckpt).to(device)

    # rank 0 first (it trains or loads the tokenizer and sets up --out), then the others,
    # who read its tokenizer.json: all ranks see the same vocabulary
    ddp.barrier()  # every rank has inspected --out before rank 0 changes it
    if main:
        tokenizer, data, mcfg, model = prepare(tok_path)
        if resume_ckpt is not None:
            clean_incomplete(run_dir, after_step=int(resume_ckpt.name.split("_")[1]))
        else:
            if cfg.overwrite and run_dir.exists():
                remove_run_files(run_dir)  # only what dynlab wrote (check_out_dir)
            elif cfg.resume:
                warnings.warn(f"--resume: {run_dir} has no complete checkpoint; starting the "
                              "run at step 0 (nothing but dynlab's unfinished checkpoints is "
                              "deleted)", stacklevel=2)
                clean_incomplete(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "run.json", run_record(cfg, mcfg, model, data, world,
                                                        ddp.backend(device)))
            tmp = run_dir / f".tmp-tokenizer.json-{os.getpid()}"  # atomic, as write_json
            tokenizer.save(str(tmp))
            os.replace(tmp, run_dir / "tokenizer.json")
    ddp.barrier()
    if not main:
        tokenizer, data, mcfg, model = prepare(run_dir / "tokenizer.json")
        # rank 0 keeps the single-process RNG stream; the others draw their own dropout
        torch.manual_seed(ddp.rank_seed(cfg.seed, rank))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.global_batch_size and cfg.micro_batch_size is None and device.type == "cuda":
        # the largest micro-batch that fits, agreed by all processes (AdamW state counted)
        micro = batching.agree_min(batching.probe_micro_batch(
            model, cfg.seq_len, cfg.global_batch_size // world, device,
            extra_bytes=8 * sum(p.numel() for p in trainable)), device)
        cfg = batching.apply_batch(cfg, world, micro)
        local_batch = cfg.batch_size // world
        say(f"micro-batch {micro} per process (memory probe), {cfg.grad_accum} accumulation "
            f"steps: {cfg.global_batch_size} sequences per update")
        if main and resume_ckpt is None:
            write_json(run_dir / "run.json", run_record(cfg, mcfg, model, data, world,
                                                        ddp.backend(device)))
    optimizer = make_optimizer(cfg, model, device)
    rcfg = relora_config(cfg) if cfg.kind == "relora" else None
    state = TrainState()

    if resume_ckpt is not None:
        try:
            restore(model, optimizer, state, resume_ckpt, device, rank=rank, world_size=world,
                    seed=cfg.seed)
        except InputError as err:
            raise InputError(f"--resume: {err}. The checkpoints are left as they are; to "
                             f"resume from an earlier one, move {resume_ckpt} out of the run"
                             ) from err
        say(f"resuming {run_dir} from step {state.step}")
    metrics = MetricsLog(run_dir / "metrics.jsonl",
                         truncate_after=state.step if resume_ckpt is not None else -1,
                         run_dir=run_dir) if main else None

    n_params = sum(p.numel() for p in model.parameters())
    procs = f", {world} processes ({ddp.backend(device)})" if world > 1 else ""
    n_tokens = data.n_train_tokens
    say(f"[bold]{cfg.kind}[/] preset {cfg.preset}: {n_params:,} parameters "
        f"({sum(p.numel() for p in trainable):,} trainable), vocab {mcfg.vocab_size}, "
        f"{'streamed' if n_tokens is None else f'{n_tokens:,}'} training tokens, "
        f"device {device}{procs}, out {run_dir}")

    ddp_model = ddp.wrap(model, device) if world > 1 else model
    no_sync = ddp_model.no_sync if world > 1 else None
    train_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    evaluator = EvalHook(cfg, tokenizer, device, say)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len  # global
    sched = dict(kind=cfg.kind, warmup=cfg.warmup_steps, total=cfg.schedule_horizon or cfg.steps,
                 reset_every=cfg.reset_every or 0,
                 restart_warmup=cfg.restart_warmup_steps or 0,
                 min_lr_ratio=cfg.min_lr_ratio, paper_compat=cfg.paper_compat)
    session_start = time.perf_counter()
    wall_before = state.wall_seconds

    def lr_of(step: int) -> float:
        """The learning rate of update number `step` (step 0: of the first update)."""
        return cfg.lr * lr_multiplier(max(step - 1, 0), **sched)

    def wall() -> float:
        return wall_before + time.perf_counter() - session_start

    device_before = state.device_seconds
    checkpointed_hours: dict[int, float] = {}  # step -> the gpu_hours its checkpoint holds

    def gpu_hours(step: int | None = None) -> float:
        """Device-hours: wall-clock × processes (GPUs on CUDA), summed over sessions from the
        checkpoint each resumed; a checkpointed step logs its checkpoint's value."""
        if step in checkpointed_hours:
            return checkpointed_hours[step]
        return (device_before + (time.perf_counter() - session_start) * world) / 3600.0

    def checkpoint(step: int, last: bool) -> dict | None:
        rng = capture_rng(device)
        due = main and evaluator.due(step, last)
        if step % cfg.checkpoint_every and not last:
            return evaluator(model) if due else None
        rngs = None
        if world > 1:  # collectives: every rank takes part
            n_differ, differ = ddp.out_of_step(ddp.state_tensors(model, optimizer))
            if n_differ:
                raise RuntimeError(f"step {step}: {n_differ} parameter/optimizer tensors differ "
                                   f"between ranks (rank {rank}: {differ[:4]}); this is a bug")
            rngs = ddp.gather_rng(rng)
        if not main:
            return None
        result = evaluator(model) if due else None
        grads, acts, ld_loss = learning_dynamics(model, data.ld_batch, device,
                                                 activations=bool(cfg.save_activations),
                                                 positions=cfg.activation_positions,
                                                 seed=cfg.seed)
        meta = {"step": step, "tokens": state.tokens, "train_loss": state.train_loss,
                "lr": lr_of(step), "wall_seconds": wall(), "ld_loss": ld_loss,
                "gpu_hours": gpu_hours()}
        state.device_seconds = meta["gpu_hours"] * 3600.0
        checkpointed_hours.clear()
        checkpointed_hours[step] = meta["gpu_hours"]
        if rcfg is not None:
            meta["relora_cycle"] = state.relora_cycle
        if world > 1:
            meta |= {"world_size": world, "ranks_in_step": True}
        if result is not None:
            meta["eval"] = result
        write_checkpoint(run_dir, step, weights=effective_state_dict(model), grads=grads,
                         activations=acts, meta=meta,
                         trainer_state=trainer_state(model, optimizer, state, rng, rngs))
        return result

    def log(step: int, result: dict | None) -> None:
        if metrics is None:
            return
        rate = (state.tokens - tokens_at_start) / max(1e-9, wall() - wall_before)
        metrics.write(metrics_record(
            step, loss=state.train_loss, lr=lr_of(step), tokens=state.tokens,
            wall_seconds=wall(), tokens_per_second=rate,
            relora_cycle=state.relora_cycle if rcfg is not None else None,
            gpu_hours=gpu_hours(step),
            eval_result=result))

    tokens_at_start = state.tokens
    batches = D.iter_batches(data, state.data_position, local_batch, cfg.seed, rank, world)
    try:
        if resume_ckpt is None:
            first = D.first_batch(data, cfg.batch_size, cfg.seed, rank, world)
            state.train_loss = ddp.mean_over_ranks(batch_loss(model, first, device), device)
            log(0, checkpoint(0, last=cfg.steps == 0))
        with _progress(cfg.progress and main, console) as bar:
            task = bar.add_task(f"{cfg.kind}", total=cfg.steps, completed=state.step,
                                loss=state.train_loss, lr=lr_of(state.step + 1), tps=0.0)
            while state.step < cfg.steps:
                # a reset due after update N runs here, after checkpoint N: checkpoints hold
                # each cycle's learned factors, and a resumed run replays the reset
                if rcfg is not None and reset_due(state.step, rcfg.reset_every,
                                                  cfg.warmup_steps, cfg.steps,
                                                  rcfg.paper_compat):
                    ddp.relora_reset(model, optimizer, rcfg)
                    state.relora_cycle += 1
                micro = []
                for _ in range(cfg.grad_accum):
                    position, batch = next(batches)
                    micro.append(batch)
                loss = train_step(train_model, optimizer, micro, lr_of(state.step + 1), device,
                                  no_sync=no_sync)
                if not math.isfinite(loss):
                    last_good = complete_checkpoints(run_dir)
                    raise TrainingDiverged(
                        f"training loss is {loss} at step {state.step + 1}; stopped without "
                        "updating. Last good checkpoint: "
                        f"{last_good[-1][1] if last_good else 'none'}. Try a lower --lr."
                    )
                state.step += 1
                state.data_position = position
                state.tokens += tokens_per_step
                state.train_loss = loss
                fault_point("train.step")
                last = state.step == cfg.steps
                result = None
                if state.step % cfg.checkpoint_every == 0 or last or evaluator.due(
                        state.step, last):
                    result = checkpoint(state.step, last)
                if state.step % cfg.log_every == 0 or last or result is not None or (
                        state.step % cfg.checkpoint_every == 0):
                    log(state.step, result)
                rate = (state.tokens - tokens_at_start) / max(1e-9, wall() - wall_before)
                bar.update(task, advance=1, loss=loss, lr=lr_of(state.step), tps=rate)
                if cfg.stop_at is not None and state.step >= cfg.stop_at:
                    break
    finally:
        if metrics is not None:
            metrics.close()
    ddp.barrier()  # the run is complete on disk when any rank returns
    say(f"done: step {state.step}, loss {state.train_loss:.4f}, {wall():.1f} s -> {run_dir}")
    return run_dir


# ---------------------------------------------------------------- state records


def run_record(cfg: TrainConfig, mcfg: ModelConfig, model: nn.Module, data: D.TokenData,
               world_size: int = 1, backend: str | None = None) -> dict:
    """run.json (contracts.md §1); "distributed" records the processes it started with."""
    import dynlab

    rec = {"kind": cfg.kind, "model": mcfg.to_dict()}
    if cfg.kind == "relora":
        rec["relora"] = relora_config(cfg).to_dict()
    rec["train"] = cfg.to_dict()
    rec["data"] = {"train_tokens": data.n_train_tokens, "train_windows": data.n_windows,
                   "ld_batch_size": int(data.ld_batch.shape[0]),
                   "ld_seq_len": int(data.ld_batch.shape[1] - 1)}
    rec["parameters"] = {"total": sum(p.numel() for p in model.parameters()),
                         "trainable": sum(p.numel() for p in model.parameters()
                                          if p.requires_grad)}
    rec["distributed"] = {"world_size": world_size,
                          "backend": backend if world_size > 1 else None,
                          "batch_size_per_process": cfg.batch_size // world_size}
    rec["dynlab_version"] = dynlab.__version__
    return rec


def trainer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                  rng: dict, rng_by_rank: list[dict] | None = None) -> dict:
    """What resuming needs besides weights.safetensors (loadable with weights_only=True).

    `rng` is rank 0's RNG state; under DDP `rng_by_rank` holds every rank's."""
    frozen = {f"{n}.weight": m.weight.detach().cpu().clone()
              for n, m in relora_modules(model).items()}
    out = {"state": dataclasses.asdict(state), "optimizer": optimizer.state_dict(),
           "rng": rng, "frozen_weights": frozen}
    if rng_by_rank is not None:
        out["rng_by_rank"] = rng_by_rank
    return out


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; InputError naming it when it is truncated or not a
    safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: missing; this checkpoint cannot be resumed from")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise InputError(f"{path}: truncated or not a safetensors file ({err}); this "
                         "checkpoint cannot be resumed from") from err


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
            ckpt: Path, device: torch.device, *, rank: int = 0, world_size: int = 1,
            seed: int = 0) -> None:
    """Load model, optimizer, counters and RNG from a complete checkpoint.

    Every rank loads the same state. Rank r takes its own saved RNG state when the checkpoint
    was written by as many processes; otherwise rank 0 takes rank 0's and rank r > 0 starts
    a fresh stream (ddp.rank_seed(seed, r, step))."""
    ts = read_trainer_state(ckpt)
    weights = read_weights(ckpt / "weights.safetensors")
    weights.update(ts["frozen_weights"])  # relora: raw frozen W, not the effective weight
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"--resume: {ckpt} does not match the model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    optimizer.load_state_dict(ts["optimizer"])
    for k, v in ts["state"].items():
        setattr(state, k, v)
    by_rank = ts.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == world_size:
        restore_rng(by_rank[rank], device)
    elif rank == 0:
        restore_rng(ts["rng"], device)
    else:
        torch.manual_seed(ddp.rank_seed(seed, rank, state.step))


# ---------------------------------------------------------------- Python API


def check_launch(kind: str, nproc: int, *, config: str | Path | None = None, **options
                 ) -> TrainConfig:
    """The checks `dynlab train --nproc N` makes before starting N processes: the options
    resolve (on --resume, against the stored run), N divides --batch-size, and on CUDA there
    are N devices. Returns the resolved config."""
    from dynlab.training.config import load_yaml_options

    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: expected a positive number of processes")
    cfg = continue_interrupted(make_config(kind, options, config).resolved())
    if cfg.resume:
        explicit = {k for k, v in options.items() if v is not None}
        if config is not None:
            explicit |= set(load_yaml_options(config))
        cfg = resume_config(cfg, explicit, check_out_dir(cfg)).resolved()
    else:
        check_out_dir(cfg)
    cfg = batching.apply_batch(cfg, nproc)
    ddp.check_batch_size(cfg.batch_size, nproc)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc}: only {torch.cuda.device_count()} CUDA devices "
                         "(one process per GPU)")
    return cfg



def train(kind: str = "decoder", *, config: str | Path | None = None, **options) -> Path:
    """Train a pico-decoder (kind="decoder") or pico-relora (kind="relora").

    Options are those of `dynlab train` with underscores (steps=..., batch_size=...,
    reset_every=..., paper_compat=True, out=...); `config` is a YAML file holding any of
    them (explicit options win). Returns the run directory.
    """
    from dynlab.training.config import load_yaml_options

    cfg = make_config(kind, options, config)
    explicit = {k for k, v in options.items() if v is not None}
    if config is not None:
        explicit |= set(load_yaml_options(config))
    return run_training(cfg, explicit)
