"""Read tensor files safely: safetensors (single or sharded) and plain torch tensor dicts.

Nothing here executes code from a file. safetensors holds no code; torch files are read with
`torch.load(weights_only=True)` (torch's restricted unpickler: tensors, dicts, lists, numbers,
strings) and must then be a plain `dict[str, Tensor]`, anything else is refused.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

from dynlab.errors import printable, quoted
from dynlab.runs.checkpoints import load_tensors
from dynlab.sources.base import SourceError as CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


def safetensors_complete(path: Path) -> bool:
    """True when `path` is a whole safetensors file: its header parses and the file is exactly
    8 + header length + the end of the last tensor's bytes (a file still being written is
    shorter)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    return size == 8 + n + (max(ends) if ends else 0)


def load_torch_tensor_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torch file that holds a plain dict[str, Tensor], read with weights_only=True (and
    memory-mapped when the file is in torch's zip format). Anything else is refused with a
    message naming the file; nothing in it is executed."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: not a plain tensor dict that torch.load(weights_only=True) can "
            f"read ({first}); dynlab never unpickles arbitrary objects"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch file ({e})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointError(
            f"{path}: expected a plain dict of name -> tensor, found {type(data).__name__}"
        )
    return data


class UnsafeShard(CheckpointError):
    """A shard index names a file outside its model folder; never skipped silently."""


def weight_files(model_dir: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "torch", the files holding a Hugging Face model directory's weights).

    Order of preference: model.safetensors, model.safetensors.index.json (shards),
    pytorch_model.bin, pytorch_model.bin.index.json. Every shard an index names must exist."""
    if (model_dir / SAFETENSORS).is_file():
        return "safetensors", [model_dir / SAFETENSORS]
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (TORCH_BIN_INDEX, "torch")):
        index = model_dir / index_name
        if index.is_file():
            return fmt, _shards(index)
    if (model_dir / TORCH_BIN).is_file():
        return "torch", [model_dir / TORCH_BIN]
    raise CheckpointError(
        f"{model_dir}: no weights (expected {SAFETENSORS}, {SAFETENSORS_INDEX} with its shards, "
        f"or {TORCH_BIN})"
    )


def shard_roots(model_dir: Path) -> list[Path]:
    """Where the shards of `model_dir` may resolve to: the folder itself and, when it is a
    snapshot in huggingface_hub's cache (`models--ORG--NAME/snapshots/<commit>`, whose files
    are links into the repository's `blobs/`), that repository's blobs folder."""
    roots = [model_dir.resolve()]
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith(
            "models--"):
        roots.append((model_dir.parent.parent / "blobs").resolve())
    return roots


def _shards(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names in its `weight_map` (tensor name -> file name).
    Every name must be a relative path inside the model folder, and resolve inside it with
    symbolic links followed (`shard_roots`): a name such as `../../elsewhere/x.safetensors`,
    an absolute path or a link that leads out is refused and never opened."""
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({printable(e)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a valid shard index (expected an object with a "
                              "'weight_map' object of tensor name -> shard file name)")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise CheckpointError(f"{index}: weight_map[{quoted(bad[0])}] is {quoted(bad[1])}; "
                              "expected the file name of a shard")
    roots = shard_roots(index.parent)
    folder = Path(os.path.normpath(index.parent))
    shards = []
    for name in sorted(set(weight_map.values())):
        lexical = os.path.normpath(folder / name)
        shard = (index.parent / name).resolve()
        if (Path(name).is_absolute() or not Path(lexical).is_relative_to(folder)
                or not any(shard.is_relative_to(r) for r in roots)):
            raise UnsafeShard(f"{index}: shard {quoted(name)} lies outside the model folder "
                                  f"{index.parent} (after following links); refused, nothing "
                                  "was read from it")
        shards.append(index.parent / name)
    missing = [printable(s.relative_to(index.parent)) for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shard(s) {', '.join(missing)} that are missing")
    return shards


def weights_complete(model_dir: Path) -> bool:
    """Every weight file is present and whole (safetensors: by its header; torch: present)."""
    try:
        fmt, files = weight_files(model_dir)
    except UnsafeShard:
        raise
    except CheckpointError:
        return False
    if fmt == "safetensors":
        return all(safetensors_complete(f) for f in files)
    return all(f.is_file() and f.stat().st_size > 0 for f in files)


def load_model_tensors(model_dir: Path, names: Sequence[str] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model directory (all shards merged)."""
    fmt, files = weight_files(model_dir)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_tensors(f) if fmt == "safetensors" else load_torch_tensor_dict(f)
        out.update(part)
    if names is not None:
        missing = [n for n in names if n not in out]
        if missing:
            raise CheckpointError(f"{model_dir}: missing tensors {', '.join(missing[:5])}")
        out = {n: out[n] for n in names}
    return out
