"""RUN/metrics.jsonl: one JSON object per logged step, appended and flushed line by line.

A line holds step, loss, lr, tokens, wall_seconds, tokens_per_second, then relora_cycle,
gpu_hours and eval when the run has them (`metrics_record`). A resumed run keeps the lines up
to the checkpoint it resumes from, rebuilding from meta.json the line of any checkpoint a
crash lost (`repaired_metrics`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dynlab.faults import fault_point
from dynlab.runs.files import json_safe
from dynlab.runs.layout import TMP_PREFIX, complete_checkpoints


def metrics_record(step: int, *, loss: float, lr: float, tokens: int, wall_seconds: float,
                   tokens_per_second: float, relora_cycle: int | None = None,
                   gpu_hours: float | None = None, eval_result: dict | None = None) -> dict:
    """One metrics.jsonl line, keys in this order (the order readers of the file rely on)."""
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
            kept.append((step, json.dumps(json_safe(record_from_meta(meta)))))
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
        self._fh.write(json.dumps(json_safe(record)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
