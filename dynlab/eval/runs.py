"""Evaluate the checkpoints of a run on disk and store each result.

A checkpoint is a complete RUN/checkpoints/step_N (dynlab.runs.layout); the tokenizer is
RUN/tokenizer.json unless given. Each result is merged into step_N/eval.json
(dynlab.runs.files.store_eval), so evaluating only perplexity keeps an earlier BLiMP result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dynlab.data.tokenizer import load_tokenizer
from dynlab.devices import resolve_device
from dynlab.eval.core import EvalData, evaluate, load_eval_data
from dynlab.faults import fault_point
from dynlab.runs.files import read_json, store_eval
from dynlab.runs.layout import CheckpointError, checkpoints_of, step_of

#: what evaluating one checkpoint may raise for a checkpoint that cannot be evaluated
CHECKPOINT_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError, KeyError)


class CheckpointEvalError(Exception):
    """A checkpoint of a run failed under on_error="fail": `checkpoint`, the `error` it
    raised (also the cause), and the `results` of the checkpoints evaluated before it."""

    def __init__(self, checkpoint: Path, error: BaseException, results: list[dict]) -> None:
        super().__init__(f"{checkpoint}: {error}")
        self.checkpoint, self.error, self.results = checkpoint, error, results


def find_checkpoints(target: str | Path) -> list[Path]:
    """[target] for a checkpoint directory, else RUN's complete checkpoints sorted by step."""
    return checkpoints_of(target)


def checkpoint_step(ckpt: Path) -> int:
    """meta.json["step"], else the N of step_N."""
    try:
        return int(read_json(ckpt / "meta.json")["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return step_of(ckpt)


def tokenizer_path(ckpt: Path, override: str | Path | None = None) -> Path:
    """The tokenizer for a checkpoint: `override`, else RUN/tokenizer.json."""
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {path}: file not found")
        return path
    path = ckpt.parent.parent / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt}: no tokenizer at {path}; pass --tokenizer PATH")
    return path


def evaluate_checkpoint(ckpt: str | Path, data: EvalData, *, tokenizer: str | Path | None = None,
                        device: str = "cpu", batch_size: int = 32, stride: int | None = None,
                        on_error: str = "fail", write: bool = True,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """{"step": N, "perplexity": ..., "blimp": ...} of one checkpoint; written to eval.json."""
    from dynlab.model import load_checkpoint_model

    ckpt = Path(ckpt)
    tok = load_tokenizer(tokenizer_path(ckpt, tokenizer))
    model = load_checkpoint_model(ckpt, device=device)
    if tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"checkpoint {ckpt}: tokenizer has {tok.get_vocab_size()} tokens but the "
                         f"model only {model.config.vocab_size}; wrong --tokenizer?")
    result = evaluate(model, tok, data, device=device, batch_size=batch_size, stride=stride,
                      on_error=on_error, progress=progress)
    if write:
        store_eval(ckpt, result)
        fault_point("eval.stored")
    return {"step": checkpoint_step(ckpt), **result}


def evaluate_run(target: str | Path, ppl: str | Path | None = None,
                 blimp: str | Path | None = None, *, tokenizer: str | Path | None = None,
                 uid: str | None = None, limit: int | None = None, device: str = "cpu",
                 batch_size: int = 32, stride: int | None = None, on_error: str = "fail",
                 write: bool = True,
                 progress: Callable[[Path, int, int], None] | None = None,
                 finished: Callable[[Path], None] | None = None,
                 skipped: Callable[[Path, BaseException], None] | None = None) -> list[dict]:
    """Evaluate a checkpoint, or every complete checkpoint of a run, in step order; returns
    one result per checkpoint evaluated ({"step", "perplexity", "blimp"}), each stored in its
    eval.json unless write=False.

    The tokenizers are checked before any data is loaded or model evaluated. The data is
    `load_eval_data(ppl, blimp, uid_filter=uid, limit_per_uid=limit, on_error=on_error)`.
    A checkpoint that fails (`CHECKPOINT_ERRORS`) raises CheckpointEvalError under
    on_error="fail", and is reported to `skipped(ckpt, error)` and passed over under "skip".
    `progress(ckpt, done, total)` counts scored sequences; `finished(ckpt)` follows each
    checkpoint, evaluated or not."""
    ckpts = checkpoints_of(target)
    for c in ckpts:  # fail early on a missing tokenizer, before any work
        tokenizer_path(c, tokenizer)
    data = load_eval_data(ppl, blimp, uid_filter=uid, limit_per_uid=limit, on_error=on_error)
    dev = str(resolve_device(device))
    results: list[dict] = []
    for ckpt in ckpts:
        tick = None if progress is None else (
            lambda done, total, c=ckpt: progress(c, done, total))
        try:
            results.append(evaluate_checkpoint(ckpt, data, tokenizer=tokenizer, device=dev,
                                               batch_size=batch_size, stride=stride,
                                               on_error=on_error, write=write, progress=tick))
        except CHECKPOINT_ERRORS as err:
            if on_error == "fail":
                raise CheckpointEvalError(ckpt, err, results) from err
            if skipped is not None:
                skipped(ckpt, err)
        finally:
            if finished is not None:
                finished(ckpt)
    return results
