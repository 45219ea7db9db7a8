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
    if final.exists():  # an older copy of this step (e.g. an overwritten resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_trainer_state(ckpt: Path) -> dict:
    """trainer_state.pt, loaded with weights_only=True (no arbitrary unpickling)."""
    path = Path(ckpt) / "trainer_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; this checkpoint cannot be resumed from")
    return torch.load(path, map_location="cpu", weights_only=True)


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per logged step, flushed line by line."""

    def __init__(self, path: Path, truncate_after: int | None = None) -> None:
        self.path = Path(path)
        if truncate_after is not None and self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash
                if isinstance(rec, dict) and rec.get("step", math.inf) <= truncate_after:
                    keep.append(line)
            self.path.write_text("".join(k + "\n" for k in keep))
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
