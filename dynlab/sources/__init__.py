"""Where checkpoints come from: dynlab runs, pico-train and relora-pico runs, Hugging Face model
directories and runs of them, and Hugging Face Hub repositories (`hf://ORG/NAME`).

`open_sources(paths)` detects each path's format (or takes `fmt`) and gives one `Run` per run:
a dynlab run is the plain `dynlab.runs.checkpoints.Run` (its analysis is exactly as before); every
other source is a `SourceRun` whose `Reader` gives tensors under dynlab's names
(`dynlab.sources.arch` maps each architecture's names).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dynlab.runs.checkpoints import CheckpointError, Run, find_runs
from dynlab.sources.base import (
    Reader,
    SourceCheckpoint,
    SourceError,
    SourceRun,
    load_source_checkpoint,
    load_source_weights,
    release,
    run_grad_kinds,
)

FORMATS = ("dynlab", "pico-train", "relora-pico", "hf")


def detect_format(path: Path) -> str | None:
    """The format of a local path, or None when it is none of them (it may be a folder of
    runs)."""
    from dynlab.sources.pico import is_pico_run

    if (path / "run.json").is_file() or (
        path.name == "checkpoints" and (path.parent / "run.json").is_file()
    ):
        return "dynlab"
    if is_pico_run(path):
        return "pico-train"
    from dynlab.sources.hf import is_hf_run, looks_like_model_dir  # only when needed

    if looks_like_model_dir(path) or is_hf_run(path):
        return "hf"
    return None


def open_source(path: Path, fmt: str, name: str | None = None) -> Run:
    if fmt in ("pico-train", "relora-pico"):
        from dynlab.sources.pico import open_pico_run

        if not (path / "training_config.yaml").is_file():
            raise SourceError(f"{path}: --format {fmt} needs training_config.yaml and "
                              "checkpoints/step_<N>/")
        return open_pico_run(path, name, fmt=None if fmt == "pico-train" else fmt)
    if fmt == "hf":
        from dynlab.sources.hf import open_hf_run

        return open_hf_run(path, name)
    raise SourceError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def open_sources(paths: Sequence[str | Path], fmt: str | None = None, *,
                 revisions: str | None = None, keep_downloads: bool = False,
                 cache_dir: str | Path | None = None) -> list[Run]:
    """One Run per run named by `paths` (each a run, a model directory, a folder of runs, or
    `hf://ORG/NAME`). A dynlab run is read by `dynlab.runs.checkpoints.find_runs` as before."""
    if not paths:
        raise CheckpointError("no run given: expected RUN, RUN/checkpoints or several RUNs")
    if fmt is not None and fmt not in FORMATS:
        raise SourceError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if revisions is not None and not any(str(p).startswith("hf://") for p in paths):
        raise SourceError("--revisions applies to hf://ORG/NAME sources only")
    dynlab_paths: list[Path] = []
    others: list[Run] = []
    for raw in paths:
        if str(raw).startswith("hf://"):
            from dynlab.sources.hub import open_hub_run

            others.append(open_hub_run(str(raw), revisions, keep_downloads=keep_downloads,
                                       cache_dir=cache_dir))
            continue
        p = Path(raw)
        if not p.is_dir():
            dynlab_paths.append(p)  # find_runs names what is wrong
            continue
        kind = fmt or detect_format(p)
        if kind == "dynlab":
            dynlab_paths.append(p)
        elif kind is not None:
            others.append(open_source(p, kind))
        else:
            children = sorted(c for c in p.iterdir() if c.is_dir() and not c.is_symlink())
            found = [(c, detect_format(c)) for c in children]
            foreign = [(c, k) for c, k in found if k not in (None, "dynlab")]
            if foreign:
                others.extend(open_source(c, k) for c, k in foreign)
                dynlab_paths.extend(c for c, k in found if k == "dynlab")
            else:
                dynlab_paths.append(p)  # a folder of dynlab runs, or find_runs's message
    runs = list(find_runs(dynlab_paths)) if dynlab_paths else []
    runs += others
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SourceError(f"two runs are named {', '.join(dup)}: give them distinct folder names")
    return runs


__all__ = [
    "FORMATS", "Reader", "SourceCheckpoint", "SourceError", "SourceRun", "detect_format",
    "load_source_checkpoint", "load_source_weights", "open_source", "open_sources", "release",
    "run_grad_kinds",
]
