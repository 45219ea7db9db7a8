"""Follow live runs: analyse each checkpoint as soon as it is complete.

The sources say which checkpoints are complete (`dynlab.sources.follow`); this module repeats
the pipeline over them.

`follow(paths, out, ...)` repeats the ordinary, resumable analysis (`dynlab.analyze`) whenever
a run has a new complete checkpoint (dynlab: `meta.json` written; pico-train: config.json and a
whole model.safetensors; HF: config.json and whole weights) and stops once every run's last
step is analysed: `until`, or else the run's own last step (dynlab: run.json's train.steps;
pico-train: training_config.yaml's training.max_steps). A run with no known last step is
followed until interrupted (Ctrl-C: the store keeps every finished checkpoint, and rerunning
resumes). The first pass waits for two complete checkpoints (or the last one), so that the
store is made with the `updates` kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dynlab.sources.base import FOLLOWING, SourceError
from dynlab.sources.follow import finished, last_step, open_ready


def follow(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    until: int | None = None,
    poll: float = 2.0,
    fmt: str | None = None,
    on_pass: Callable[[Path], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **analyze_kwargs,
) -> Path | None:
    """Analyse `paths` into `out` as their checkpoints complete (see the module docstring);
    returns the store's path once every run's last step (or `until`) is analysed."""
    if any(str(p).startswith("hf://") for p in paths):
        raise SourceError("--follow applies to local runs; hf:// revisions are already complete")
    store: Path | None = None
    token = FOLLOWING.set({"until": until})
    try:
        while True:
            store = _one_pass(paths, out, until, fmt, on_pass, analyze_kwargs)
            if store is not None:
                return store
            sleep(poll)
    finally:
        FOLLOWING.reset(token)


def _one_pass(paths, out, until, fmt, on_pass, analyze_kwargs) -> Path | None:
    """Analyse what is complete when it is worth it; the store's path once every run is done,
    else None."""
    from dynlab.analysis.run import analyze
    from dynlab.analysis.selection import SelectionError

    runs = open_ready(paths, fmt)
    if runs is None:
        return None
    targets = [until if until is not None else last_step(r) for r in runs]
    ready = all(len(r.checkpoints) >= 2 or finished(r, t)
                for r, t in zip(runs, targets, strict=True))
    if not ready:
        return None
    try:
        store = analyze(paths, out, fmt=fmt, **analyze_kwargs)
    except SelectionError:  # --steps naming checkpoints not written yet: wait for them
        if all(finished(r, t) for r, t in zip(runs, targets, strict=True)):
            raise
        return None
    if on_pass is not None:
        on_pass(store)
    if all(finished(r, t) for r, t in zip(runs, targets, strict=True)):
        return store
    return None
