"""Evaluate the checkpoints of a run on disk (contracts §1) and store each result.

A checkpoint is RUN/checkpoints/step_N with meta.json present (complete); the tokenizer is
RUN/tokenizer.json unless given. Each result is written to step_N/eval.json atomically
(temporary file + rename), merged into what is already there so that evaluating only
perplexity keeps an earlier BLiMP result.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from dynlab.eval.core import EvalData, evaluate
from dynlab.faults import fault_point

STEP_DIR = re.compile(r"^step_(\d+)$")


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint directory: step_N with meta.json."""
    return path.is_dir() and bool(STEP_DIR.match(path.name)) and (path / "meta.json").is_file()


def find_checkpoints(target: str | Path) -> list[Path]:
    """[target] for a checkpoint directory, else RUN/checkpoints/step_N (complete ones) sorted
    by N numerically."""
    path = Path(target)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    if STEP_DIR.match(path.name) and path.is_dir():
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{path}: checkpoint is incomplete (no meta.json)")
        return [path]
    root = path / "checkpoints"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{path}: not a run directory (no checkpoints/) nor a checkpoint (step_N/meta.json)")
    found = [p for p in root.iterdir() if is_checkpoint(p)]
    if not found:
        raise FileNotFoundError(f"{root}: no complete checkpoints (step_N with meta.json)")
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def checkpoint_step(ckpt: Path) -> int:
    """meta.json["step"], else the N of step_N."""
    try:
        return int(json.loads((ckpt / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(STEP_DIR.match(ckpt.name).group(1))


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


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON to a temporary sibling and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_dict(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def store_eval(ckpt: Path, result: dict) -> Path:
    """Merge `result` ({"perplexity", "blimp"}) into ckpt/eval.json, atomically.

    eval.json starts from meta.json["eval"] (what training measured) and the previous
    eval.json, so a part that is not re-evaluated is kept: readers that let eval.json replace
    meta.json["eval"] lose nothing."""
    path = ckpt / "eval.json"
    merged: dict = {}
    meta_eval = _read_dict(ckpt / "meta.json").get("eval")
    if isinstance(meta_eval, dict):
        merged.update(meta_eval)
    if path.is_file():
        merged.update(_read_dict(path))  # an unreadable old file is replaced
    merged.update({k: v for k, v in result.items() if k in ("perplexity", "blimp")})
    write_json_atomic(path, merged)
    return path


def evaluate_checkpoint(ckpt: str | Path, data: EvalData, *, tokenizer: str | Path | None = None,
                        device: str = "cpu", batch_size: int = 32, stride: int | None = None,
                        on_error: str = "fail", write: bool = True,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """{"step": N, "perplexity": ..., "blimp": ...} of one checkpoint; written to eval.json."""
    from dynlab.model import load_checkpoint_model
    from dynlab.training.data import load_tokenizer

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
