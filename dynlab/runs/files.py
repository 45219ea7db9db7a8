"""The files of a run, written atomically and read with errors naming the path.

Every writer here assembles its file (or a checkpoint's folder) under a temporary name
starting with `TMP_PREFIX` and renames it into place, so a reader sees the old file or the
new one, whole. JSON is written strict: non-finite floats become null (`json_safe`).

eval.json: a standalone `dynlab eval` stores its result in step_<N>/eval.json, beside the
"eval" entry that training wrote into meta.json. `store_eval` merges the old entries into
eval.json and `read_meta` lets eval.json replace meta.json["eval"], so nothing measured is
lost and one rule decides which result a reader sees.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dynlab.atomic import replace_atomically, write_text_atomically
from dynlab.errors import DynlabFailure, InputError
from dynlab.faults import fault_point
from dynlab.runs.layout import TMP_PREFIX, CheckpointError, checkpoint_dir


def json_safe(obj: Any) -> Any:
    """`obj` with non-finite floats replaced by None, so the files are strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented strict JSON via a temporary sibling and an atomic rename."""
    path = Path(path)
    write_text_atomically(path, json.dumps(json_safe(obj), indent=2) + "\n",
                          f"{TMP_PREFIX}{path.name}-{os.getpid()}")


RUN_JSON = "run.json"


def read_run_json(run_dir: str | Path) -> dict:
    """RUN/run.json (the run's kind, model, options and data; the trainer writes it with
    `write_run_json`): FileNotFoundError when absent, CheckpointError naming the file when it
    is not a JSON object."""
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run.json (not a dynlab run directory)")
    return read_json(path)


def write_run_json(run_dir: str | Path, record: dict) -> Path:
    """Write RUN/run.json atomically; returns its path."""
    path = Path(run_dir) / RUN_JSON
    write_json(path, record)
    return path


def read_json(path: str | Path) -> dict:
    """A JSON object from `path`; CheckpointError naming it when missing, invalid or not an
    object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_dict(path: Path) -> dict:
    """A JSON object from `path`, or {} when it is missing or unreadable."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def read_meta(ckpt: str | Path) -> dict:
    """step_<N>/meta.json, with step_<N>/eval.json (when present) as its "eval" entry."""
    ckpt = Path(ckpt)
    meta = read_json(ckpt / "meta.json")
    if (ckpt / "eval.json").is_file():
        meta["eval"] = read_json(ckpt / "eval.json")
    return meta


def store_eval(ckpt: str | Path, result: Mapping) -> Path:
    """Merge `result` ({"perplexity", "blimp"}) into step_<N>/eval.json, atomically.

    eval.json starts from meta.json["eval"] (what training measured) and the previous
    eval.json, so a part that is not re-evaluated is kept (`read_meta` lets eval.json replace
    meta.json["eval"])."""
    ckpt = Path(ckpt)
    path = ckpt / "eval.json"
    merged: dict = {}
    meta_eval = _read_dict(ckpt / "meta.json").get("eval")
    if isinstance(meta_eval, dict):
        merged.update(meta_eval)
    if path.is_file():
        merged.update(_read_dict(path))  # an unreadable old file is replaced
    merged.update({k: v for k, v in result.items() if k in ("perplexity", "blimp")})
    write_json(path, merged)
    return path


class DiskFull(DynlabFailure):
    """A write failed because its file system is full; the message says where and how much
    was needed (exit 1)."""


def tensor_bytes(obj: Any, dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors in `obj` (nested dicts, lists, tuples), each in `dtype` or its
    own."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * (dtype or obj.dtype).itemsize
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v, dtype) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v, dtype) for v in obj)
    return 0


def checkpoint_bytes(weights, grads=None, activations=None, trainer_state=None,
                     dtype: torch.dtype | None = None) -> int:
    """The size a checkpoint's tensors take on disk (file headers not counted)."""
    return (sum(tensor_bytes(t, dtype) for t in (weights, grads, activations) if t is not None)
            + tensor_bytes(trainer_state))


def size_text(n: int) -> str:
    """A byte count for a message, in decimal units: '950 B', '183.4 kB', '12.3 MB', '1.2 GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def disk_full(err: BaseException, folder: Path, need: int) -> bool:
    """Whether a failed write failed for want of space: ENOSPC or EDQUOT (safetensors reports
    it as "os error 28" in a SafetensorError), or (torch.save reports a short write as a
    RuntimeError, e.g. "unexpected pos") a file system with less free space than the write
    needed."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if f"os error {errno.ENOSPC}" in str(err) or "No space left on device" in str(err):
        return True
    try:
        return shutil.disk_usage(folder).free < need
    except OSError:
        return False


def write_checkpoint(run_dir: str | Path, step: int, weights: Mapping[str, torch.Tensor],
                     grads: Mapping[str, torch.Tensor] | None = None,
                     meta: Mapping | None = None, *,
                     activations: Mapping[str, torch.Tensor] | None = None,
                     trainer_state: dict | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write checkpoints/step_<step>/ atomically and return it.

    The folder is assembled as `.tmp-step_<step>-<pid>`: weights, grads and activations
    (safetensors, on the CPU, in `dtype` or each tensor's own), trainer_state.pt, then
    meta.json last; it is then renamed into place. An older copy of the step is moved aside
    before the rename and deleted after it, so it is never lost before the new one is whole.
    A file system that runs full raises DiskFull (how much was needed, how much is free)
    after removing the partial folder."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    def save(tensors: Mapping[str, torch.Tensor], name: str) -> None:
        flat = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
                for k, v in tensors.items()}
        save_file(flat, str(tmp / name), metadata={"step": str(step)})

    try:
        save(weights, "weights.safetensors")
        if grads is not None:
            save(grads, "grads.safetensors")
        if activations is not None:
            save(activations, "activations.safetensors")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "meta.json").write_text(json.dumps(json_safe(dict(meta or {})), indent=2) + "\n")
    except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        need = checkpoint_bytes(weights, grads, activations, trainer_state, dtype)
        full = disk_full(err, final.parent, need)
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial checkpoint took
        if not full:
            raise
        free = shutil.disk_usage(final.parent).free
        raise DiskFull(
            f"disk full: checkpoint {final} needs about {size_text(need)} and the file "
            f"system holding {final.parent} ran out of space ({size_text(free)} free after "
            "removing the partial checkpoint); the checkpoints already written are intact: "
            "free some space, then rerun with --resume") from None
    fault_point("checkpoint.before-rename")
    old = None
    if final.exists():
        old = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)
    fault_point("checkpoint.renamed")
    return final


TRAINER_STATE_KEYS = ("state", "optimizer", "rng", "frozen_weights")


def read_trainer_state(ckpt: str | Path) -> dict:
    """step_<N>/trainer_state.pt, loaded with weights_only=True (no arbitrary unpickling).

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
    if not isinstance(state, dict) or not set(TRAINER_STATE_KEYS) <= set(state):
        raise InputError(f"{path}: not a dynlab trainer state (expected a mapping with "
                         f"{', '.join(map(repr, TRAINER_STATE_KEYS))})")
    return state


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file; InputError naming it when it is
    missing, truncated or not a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing; this checkpoint cannot be resumed from")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise InputError(f"{path}: truncated or not a safetensors file ({err}); this "
                         "checkpoint cannot be resumed from") from err


def write_tokenizer(run_dir: str | Path, tokenizer) -> Path:
    """Save a `tokenizers` tokenizer as RUN/tokenizer.json, atomically."""
    path = Path(run_dir) / "tokenizer.json"
    replace_atomically(path, lambda tmp: tokenizer.save(str(tmp)),
                       f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    return path


LD_BATCH_FILE = "ld_batch.safetensors"


def write_ld_batch(run_dir: str | Path, batch: torch.Tensor) -> Path:
    """Save the run's fixed learning-dynamics batch (token ids, (sequences, seq_len + 1)) as
    RUN/ld_batch.safetensors (key `batch_tokens`), atomically, so that analyses that run the
    model on it (`dynlab analyze --dynamics`) read it instead of rebuilding the data."""
    from safetensors.torch import save_file

    path = Path(run_dir) / LD_BATCH_FILE
    tokens = batch.detach().cpu().to(torch.int64).contiguous()
    replace_atomically(path, lambda tmp: save_file({"batch_tokens": tokens}, str(tmp)),
                       f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    return path


def read_ld_batch(run_dir: str | Path) -> torch.Tensor | None:
    """RUN/ld_batch.safetensors's `batch_tokens` (int64), or None where the run has none
    (runs written before the file existed)."""
    from safetensors import safe_open

    path = Path(run_dir) / LD_BATCH_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("batch_tokens").to(torch.int64) if "batch_tokens" in f.keys() \
                else None
    except Exception as err:  # safetensors raises its own error types
        raise InputError(f"{path}: not a readable safetensors file with `batch_tokens` "
                         f"({err})") from None
