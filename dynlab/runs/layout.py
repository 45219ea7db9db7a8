"""Where a run keeps its checkpoints: step folders, completeness, cleaning.

A checkpoint is `RUN/checkpoints/step_<N>/`; it is complete once its `meta.json` exists
(`dynlab.runs.files.write_checkpoint` writes it last and renames the folder into place). A
writer's temporary files and folders start with `TMP_PREFIX`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
#: the files the trainer writes at the top of a run, in the order `remove_run_files` deletes them
RUN_FILES = ("metrics.jsonl", "ld_batch.safetensors", "tokenizer.json", "run.json")


class CheckpointError(ValueError):
    """A run or checkpoint on disk is not what dynlab expects; the message names the path."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """RUN/checkpoints/step_<step>."""
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def step_of(path: str | Path) -> int | None:
    """N for a folder named step_<N>, else None."""
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: str | Path) -> bool:
    """Whether `path` is a complete checkpoint: a step_<N> folder holding meta.json."""
    path = Path(path)
    return step_of(path) is not None and path.is_dir() and (path / "meta.json").is_file()


def unique_steps(found: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """`found` ((step, folder) pairs) sorted by step; CheckpointError naming both folders
    when two claim one step (`step_10` and `step_010`): which one holds the step's weights
    cannot be told, and keeping either silently would give a wrong answer."""
    found = sorted(found)
    for (a, pa), (b, pb) in zip(found, found[1:], strict=False):
        if a == b:
            raise CheckpointError(f"{pa} and {pb} both claim step {a}; keep one of them "
                                  "(move the other out of the run)")
    return found


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of a run, sorted by step ([] when none);
    CheckpointError when two folders claim one step (`unique_steps`)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return unique_steps([(step_of(p), p) for p in root.iterdir() if is_complete(p)])


def checkpoints_of(target: str | Path) -> list[Path]:
    """[target] for a complete checkpoint folder, else the complete checkpoints of the run
    `target`, sorted by step. FileNotFoundError naming the path when there are none."""
    path = Path(target)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    if step_of(path) is not None and path.is_dir():
        if not is_complete(path):
            raise FileNotFoundError(f"{path}: checkpoint is incomplete (no meta.json)")
        return [path]
    root = path / "checkpoints"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{path}: not a run directory (no checkpoints/) nor a checkpoint (step_N/meta.json)")
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{root}: no complete checkpoints (step_N with meta.json)")
    return [p for _, p in found]


def clean_incomplete(run_dir: str | Path, after_step: int | None = None) -> None:
    """Delete temporary and incomplete checkpoint folders (and, with after_step, complete
    ones beyond it, which a resumed run writes again)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for p in root.iterdir():
        step = step_of(p)
        stale = p.name.startswith(TMP_PREFIX)
        stale |= step is not None and not (p / "meta.json").is_file()
        stale |= step is not None and after_step is not None and step > after_step
        if stale and p.is_dir():
            shutil.rmtree(p)


def remove_run_files(run_dir: str | Path) -> None:
    """Delete what the trainer wrote in `run_dir` and nothing else: checkpoints/step_<N> and
    temporary `.tmp-*` entries (checkpoints/ itself once empty), then metrics.jsonl,
    ld_batch.safetensors, tokenizer.json and run.json last (an interrupted removal still looks
    like a dynlab run). Other files and directories, an analysis store for instance, are kept."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if (step_of(p) is not None or p.name.startswith(TMP_PREFIX)) and p.is_dir():
                shutil.rmtree(p)
        if not any(root.iterdir()):
            root.rmdir()
    for p in run_dir.glob(f"{TMP_PREFIX}*"):
        if p.is_file() and p.name[len(TMP_PREFIX):].rsplit("-", 1)[0] in RUN_FILES:
            p.unlink()
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
