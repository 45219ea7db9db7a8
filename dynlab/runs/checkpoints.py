"""Find runs and checkpoints on disk and stream them as name -> tensor.

A run is a directory with `run.json` and `checkpoints/step_<N>/`; a checkpoint is complete
once its `meta.json` exists (the trainer writes it last). Tensors are read with safetensors
(memory-mapped, never unpickled).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynlab.runs.config import ModelConfig
from dynlab.runs.files import read_json, read_meta, read_run_json
from dynlab.runs.layout import CheckpointError, complete_checkpoints

__all__ = ["Checkpoint", "CheckpointError", "Keep", "LoadedCheckpoint", "MADV_DONTNEED",
           "MADV_WILLNEED", "ModelSpec", "PAGE", "Run", "advise_willneed", "check_floating",
           "check_shapes", "find_runs", "load_checkpoint", "load_run", "load_tensors", "madvise",
           "prefetch", "read_ahead", "read_json"]

#: which tensors (by name) a reader is asked for: those `keep(name)` is true for; a reader
#: may leave the others out (None: every one)
Keep = Callable[[str], bool] | None

#: the model shape the analysis reads from run.json["model"]: the same class as the one the
#: pico-decoder is built from (one key list, one validation), under the name the analysis uses
ModelSpec = ModelConfig


@dataclass(frozen=True)
class Checkpoint:
    run: str
    step: int
    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def meta(self) -> dict:
        """meta.json, with eval.json as its "eval" entry (dynlab.runs.files.read_meta)."""
        return read_meta(self.path)


@dataclass(frozen=True)
class Run:
    name: str
    path: Path
    config: dict
    spec: ModelSpec
    checkpoints: tuple[Checkpoint, ...] = field(default_factory=tuple)

    @property
    def lora_scale(self) -> float | None:
        relora = self.config.get("relora")
        if self.config.get("kind") != "relora" or not isinstance(relora, Mapping):
            return None
        return float(relora["alpha"]) / float(relora["r"])


def _run_root(path: Path) -> Path:
    """RUN or RUN/checkpoints -> RUN."""
    if path.name == "checkpoints" and (path.parent / "run.json").exists():
        return path.parent
    return path


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Runs named by `paths`: each a RUN, a RUN/checkpoints, or a folder whose sub-folders are
    runs. Only complete checkpoints (meta.json present) are listed, sorted by step."""
    if not paths:
        raise CheckpointError("no run given: expected RUN, RUN/checkpoints or several RUNs")
    roots: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CheckpointError(f"{p}: no such directory (expected a run directory)")
        if not p.is_dir():
            raise CheckpointError(f"{p}: not a directory (expected a run directory)")
        root = _run_root(p)
        if (root / "run.json").exists() or (root / "checkpoints").is_dir():
            roots.append(root)
            continue
        children = sorted(c for c in root.iterdir() if (c / "run.json").is_file())
        if not children:
            raise CheckpointError(
                f"{p}: no run.json here and no run directories inside "
                "(expected RUN/run.json and RUN/checkpoints/step_<N>/)"
            )
        roots.extend(children)
    names = [r.name for r in roots]
    runs = []
    for root in roots:
        name = root.name if names.count(root.name) == 1 else f"{root.parent.name}/{root.name}"
        runs.append(load_run(root, name=name))
    if len({r.name for r in runs}) != len(runs):
        raise CheckpointError("the same run was given twice: " + ", ".join(sorted(names)))
    return runs


def load_run(root: Path, name: str | None = None) -> Run:
    config_path = root / "run.json"
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: missing (every run directory needs run.json)")
    config = read_run_json(root)
    spec = ModelSpec.from_run_config(config, config_path)
    name = name or root.name
    ckpt_dir = root / "checkpoints"
    found = [Checkpoint(name, step, path) for step, path in complete_checkpoints(root)]
    if not found:
        raise CheckpointError(
            f"{ckpt_dir}: no complete checkpoint (expected step_<N>/ folders with meta.json)"
        )
    return Run(name, root, config, spec, tuple(found))


def load_tensors(path: Path, names: Sequence[str] | None = None, keep: Keep = None
                 ) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file (all, or `names`; of those, the ones `keep`
    keeps), with errors naming the file.

    safetensors maps the file and hands out tensors over the mapping (no copy), so bytes are
    only read when first touched. A file read whole is read through once first
    (`read_ahead`), so the disk read happens in the caller — the background prefetch thread —
    and not during the computation that first touches the tensors; of a file read in part,
    only the pages of the tensors read are asked for ahead (`advise_willneed`)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            available = list(f.keys())
            keys = available if names is None else list(names)
            present = set(available)
            missing = [k for k in keys if k not in present]
            if missing:
                raise CheckpointError(f"{path}: missing tensors {', '.join(missing[:5])}")
            if keep is not None:
                keys = [k for k in keys if keep(k)]
            tensors = {k: f.get_tensor(k) for k in keys}
        if len(keys) == len(available):
            read_ahead(path)
        else:
            advise_willneed(tensors)
        return tensors
    except SafetensorError as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt"
        ) from None
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: could not be read as safetensors ({e})") from None


def read_ahead(path: Path, chunk: int = 16 << 20) -> int:
    """Read a file sequentially (into a small reused buffer) so its pages are in memory;
    returns the bytes read. The GIL is released during the reads."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total


def _libc_madvise() -> Callable | None:
    try:
        fn = ctypes.CDLL("libc.so.6").madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _libc_madvise()
#: the memory page size, and madvise(2)'s advice values (Linux)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MADV_WILLNEED, MADV_DONTNEED = 3, 4


def madvise(start: int, end: int, advice: int) -> bool:
    """madvise(2) on the addresses [start, end) (`start` page-aligned); whether it was taken
    (False without glibc, or where the kernel refuses)."""
    return _MADVISE is not None and end > start and _MADVISE(start, end - start, advice) == 0


def advise_willneed(tensors: Mapping[str, torch.Tensor]) -> None:
    """Ask the kernel to read ahead the pages of these tensors (MADV_WILLNEED on each one's
    pages: asynchronous, nothing copied, nothing added to the resident set). For tensors
    mapped from a file this starts their disk reads now; anywhere else, or without glibc, it
    does nothing."""
    for t in tensors.values():
        if t.device.type == "cpu" and t.numel():
            start = t.data_ptr() // PAGE * PAGE
            madvise(start, t.data_ptr() + t.numel() * t.element_size(), MADV_WILLNEED)


def check_floating(name: str, tensor: torch.Tensor, path: object) -> None:
    """CheckpointError naming `path` and `name` unless the tensor holds floating-point
    numbers (fp32, fp16, bf16, fp64, ...): weights stored as integers or booleans are not a
    model's parameters."""
    if not tensor.dtype.is_floating_point:
        raise CheckpointError(f"{path}: {name} is stored as {str(tensor.dtype).split('.')[-1]}; "
                              "expected floating-point weights (float32, float16 or bfloat16)")


def check_shapes(tensors: Mapping[str, torch.Tensor], spec: ModelSpec, path: Path,
                 keep: Keep = None) -> None:
    """Every expected parameter (that `keep` keeps) is present, floating point, with the
    shape run.json implies."""
    for name, shape in spec.expected_shapes().items():
        if keep is not None and not keep(name):
            continue
        if name not in tensors:
            raise CheckpointError(f"{path}: missing parameter {name} (run.json implies it)")
        check_floating(name, tensors[name], path)
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, but run.json "
                f"implies {shape}"
            )


@dataclass
class LoadedCheckpoint:
    checkpoint: Checkpoint
    weights: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] | None
    meta: dict
    #: gradients of the training batch (pico-train runs' `train_gradients`), kind `train_grads`
    train_grads: dict[str, torch.Tensor] | None = None


def load_checkpoint(ckpt: Checkpoint, spec: ModelSpec, *, grads: bool = True,
                    keep: Keep = None) -> LoadedCheckpoint:
    """A dynlab checkpoint's weights (and gradients): only the tensors `keep` keeps."""
    weights = load_tensors(ckpt.file("weights.safetensors"), keep=keep)
    check_shapes(weights, spec, ckpt.file("weights.safetensors"), keep)
    g = None
    if grads and ckpt.has("grads.safetensors"):
        g = load_tensors(ckpt.file("grads.safetensors"), keep=keep)
        check_shapes(g, spec, ckpt.file("grads.safetensors"), keep)
    return LoadedCheckpoint(ckpt, weights, g, ckpt.meta())


def prefetch(items: Sequence, load, depth: int = 1) -> Iterator[tuple[object, object]]:
    """Yield (item, load(item)) in order while a background thread loads ahead, so reading
    overlaps computing. Errors are raised at the item that caused them.

    At most `depth` items are loaded (or loading) beyond the one the caller holds: the thread
    starts loading item i + depth only once the caller has taken item i. With depth 1 the
    memory held is the current item plus the next one, whatever the number of items."""
    q: queue.Queue = queue.Queue()
    slots = threading.Semaphore(depth)
    stop = threading.Event()

    def worker() -> None:
        for item in items:
            while not slots.acquire(timeout=0.05):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            try:
                q.put((item, load(item), None))
            except BaseException as e:  # re-raised in the consumer
                q.put((item, None, e))
                return

    t = threading.Thread(target=worker, daemon=True, name="dynlab-prefetch")
    t.start()
    try:
        for _ in range(len(items)):
            item, value, err = q.get()
            slots.release()  # the caller now holds this item: the next may load
            if err is not None:
                raise err
            yield item, value
            del value
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)
