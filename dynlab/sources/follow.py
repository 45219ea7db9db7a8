"""Live runs, as a source sees them: which checkpoints are complete, and where a run ends.

A run being written is read like any other (dynlab: a checkpoint is complete once `meta.json`
is written; pico-train: config.json and a whole model.safetensors; HF: config.json and whole
weights). `open_ready` opens the runs, or says they are not there yet; `last_step` is a run's
final step where its configuration says it (dynlab: run.json's train.steps; pico-train:
training_config.yaml's training.max_steps); `finished` says whether a run has reached it.
Analysing them as they grow is the pipeline's job (`dynlab.analysis.follow`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dynlab.runs.checkpoints import CheckpointError, Run
from dynlab.sources.base import SourceRun


def last_step(run: Run) -> int | None:
    """The step of a run's final checkpoint, where its configuration says it."""
    if isinstance(run, SourceRun):
        fn = getattr(run.reader, "last_step", None)
        return fn() if fn is not None else None
    steps = (run.config.get("train") or {}).get("steps")
    return int(steps) if steps is not None else None


def open_ready(paths: Sequence[str | Path], fmt: str | None) -> list[Run] | None:
    """The runs, or None while one has no complete checkpoint yet (or does not exist yet)."""
    from dynlab.sources import open_sources

    try:
        return open_sources(paths, fmt)
    except CheckpointError as e:
        msg = str(e)
        if any(s in msg for s in ("no complete", "no such directory", "no step_<N>",
                                  "no run.json here", "run.json: missing")):
            return None
        raise


def finished(run: Run, target: int | None) -> bool:
    """Whether `run` holds a checkpoint at or past `target` (never, for an unknown target)."""
    return target is not None and bool(run.checkpoints) and run.checkpoints[-1].step >= target
