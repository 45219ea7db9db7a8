"""Run directory and checkpoint I/O (rank 0 only); the layout of contracts.md §1.

    RUN/run.json, RUN/tokenizer.json, RUN/metrics.jsonl
    RUN/checkpoints/step_<N>/{weights,grads,activations}.safetensors, trainer_state.pt,
                             meta.json (written last)

A checkpoint is assembled in a hidden sibling directory `.tmp-step_<N>-<pid>` and renamed
into place, so `step_<N>` either does not exist or is complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dynlab.errors import InputError
from dynlab.faults import fault_point

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats by None so the files are strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and an atomic rename."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (meta.json present), sorted by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def clean_incomplete(run_dir: Path, after_step: int | None = None) -> None:
    """Delete temporary and incomplete checkpoint directories (and, with after_step, complete
    ones beyond it, which a resumed run will write again)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        stale = p.name.startswith(TMP_PREFIX)
        stale |= bool(m) and not (p / "meta.json").is_file()
        stale |= bool(m) and after_step is not None and int(m.group(1)) > after_step
        if stale and p.is_dir():
            shutil.rmtree(p)


RUN_FILES = ("metrics.jsonl", "tokenizer.json", "run.json")  # removed in this order


def remove_run_files(run_dir: Path) -> None:
    """Delete what the trainer wrote in `run_dir` and nothing else: checkpoints/step_<N> and
    temporary `.tmp-*` entries (checkpoints/ itself once empty), then metrics.jsonl,
    tokenizer.json and run.json last (an interrupted removal still looks like a dynlab run).
    Other files and directories, an analysis store for instance, are kept."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if (STEP_DIR.match(p.name) or p.name.startswith(TMP_PREFIX)) and p.is_dir():
                shutil.rmtree(p)
        if not any(root.iterdir()):
            root.rmdir()
    for p in run_dir.glob(f"{TMP_PREFIX}*"):
        if p.is_file() and p.name[len(TMP_PREFIX):].rsplit("-", 1)[0] in RUN_FILES:
            p.unlink()
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def write_checkpoint(run_dir: Path, step: int, *, weights: dict[str, torch.Tensor],
                     grads: dict[str, torch.Tensor], meta: dict,
                     trainer_state: dict | None = None,
                     activations: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoints/step_<step>/ atomically: tensors first, meta.json last, then rename."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    def _save(tensors: dict[str, torch.Tensor], name: str) -> None:
        flat = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        save_file(flat, str(tmp / name), metadata={"step": str(step)})

    _save(weights, "weights.safetensors")
    _save(grads, "grads.safetensors")
    if activations is not None:
        _save(activations, "activations.safetensors")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps(_json_safe(meta), indent=2) + "\n")
    fault_point("checkpoint.before-rename")
    old = None
    if final.exists():  # an older copy of this step: moved aside (never lost), then deleted
        old = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)
    fault_point("checkpoint.renamed")
    return final


def read_trainer_state(ckpt: Path) -> dict:
    """trainer_state.pt, loaded with weights_only=True (no arbitrary unpickling).

    A file that is not a dynlab trainer state (torch refuses to unpickle what it holds) or is
    truncated raises InputError naming it; it is never unpickled."""
    import pickle
    import zipfile

    path = Path(ckpt) / "trainer_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; this checkpoint cannot be resumed from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"{path}: not a dynlab trainer state (it holds objects other than "
                         "tensors and plain values) or corrupt; it was not loaded") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: truncated or corrupt ({type(err).__name__}); this "
                         "checkpoint cannot be resumed from") from err
    keys = ("state", "optimizer", "rng", "frozen_weights")
    if not isinstance(state, dict) or not set(keys) <= set(state):
        raise InputError(f"{path}: not a dynlab trainer state (expected a mapping with "
                         f"{', '.join(map(repr, keys))})")
    return state


def metrics_record(step: int, *, loss: float, lr: float, tokens: int, wall_seconds: float,
                   tokens_per_second: float, relora_cycle: int | None = None,
                   gpu_hours: float | None = None, eval_result: dict | None = None) -> dict:
    """One metrics.jsonl line (README, run layout), keys in their documented order."""
    rec = {"step": step, "loss": loss, "lr": lr, "tokens": tokens,
           "wall_seconds": wall_seconds, "tokens_per_second": tokens_per_second}
    if relora_cycle is not None:
        rec["relora_cycle"] = relora_cycle
    if gpu_hours is not None:
        rec["gpu_hours"] = gpu_hours
    if eval_result is not None:
        rec["eval"] = eval_result
    return rec


def record_from_meta(meta: dict) -> dict:
    """The metrics line of a checkpoint, rebuilt from its meta.json (for a line lost in a
    crash between the checkpoint's rename and the line's write). tokens_per_second is the
    run's mean rate up to the checkpoint, tokens / wall_seconds."""
    wall = meta.get("wall_seconds")
    tokens = meta.get("tokens")
    rate = tokens / wall if isinstance(wall, int | float) and wall and tokens else 0.0
    loss = meta.get("train_loss")
    return metrics_record(int(meta["step"]), loss=math.nan if loss is None else loss,
                          lr=meta.get("lr"), tokens=tokens, wall_seconds=wall,
                          tokens_per_second=rate, relora_cycle=meta.get("relora_cycle"),
                          gpu_hours=meta.get("gpu_hours"), eval_result=meta.get("eval"))


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(step, line) of every whole JSON record of a metrics.jsonl (a torn line is dropped)."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a crash
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append((rec["step"], line))
    return out


def repaired_metrics(lines: list[tuple[int, str]], keep_through: int,
                     checkpoint_metas: list[dict]) -> list[str]:
    """The lines a resumed log keeps: those of steps <= keep_through, plus, for every
    complete checkpoint up to keep_through that has no line, the line rebuilt from its
    meta.json, all in step order (a stable sort: lines of one step keep their order)."""
    kept = [(s, line) for s, line in lines if s <= keep_through]
    have = {s for s, _ in kept}
    for meta in checkpoint_metas:
        step = int(meta["step"])
        if step <= keep_through and step not in have:
            kept.append((step, json.dumps(_json_safe(record_from_meta(meta)))))
    kept.sort(key=lambda item: item[0])
    return [line for _, line in kept]


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per logged step, appended and flushed line by line.

    With `truncate_after` (a resume from that step, or -1 for a fresh start) the file is
    first replaced atomically (temporary file, fsync, rename) by its lines up to that step,
    with the lines of the complete checkpoints in `run_dir` that a crash lost rebuilt from
    their meta.json; it is never truncated in place, so an interruption at any moment leaves
    the old or the new file whole."""

    def __init__(self, path: Path, truncate_after: int | None = None,
                 run_dir: Path | None = None) -> None:
        self.path = Path(path)
        if truncate_after is not None and (self.path.is_file() or run_dir is not None):
            metas = []
            for _, ckpt in complete_checkpoints(run_dir) if run_dir is not None else []:
                try:
                    metas.append(json.loads((ckpt / "meta.json").read_text()))
                except (OSError, ValueError):
                    continue
            lines = repaired_metrics(_read_lines(self.path), truncate_after,
                                     [m for m in metas
                                      if isinstance(m, dict) and isinstance(m.get("step"), int)])
            tmp = self.path.with_name(f"{TMP_PREFIX}{self.path.name}-{os.getpid()}")
            with tmp.open("w") as fh:
                fh.write("".join(line + "\n" for line in lines))
                fh.flush()
                os.fsync(fh.fileno())
            fault_point("metrics.before-replace")
            os.replace(tmp, self.path)
        self._fh = self.path.open("a")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(_json_safe(record)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
