"""Hugging Face model directories, and runs made of them.

A model directory holds `config.json` and its weights: `model.safetensors`; shards with
`model.safetensors.index.json`; or `pytorch_model.bin` (read with
torch.load(weights_only=True, mmap=True), never plain pickle), in fp32, fp16 or bf16. Only
config.json is read of its configuration; no `.py` file shipped with it is imported and no
remote code runs.

A run is a directory whose sub-directories are model directories named `stepN`, `step_N`,
`checkpoint-N` (the HF Trainer) or `global_stepN`: N is the step. A single model directory is
a run of one checkpoint (its step from its name, or trainer_state.json's global_step, else 0).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from dynlab.errors import printable
from dynlab.runs.checkpoints import Keep, ModelSpec, read_json
from dynlab.runs.layout import CheckpointError, unique_steps
from dynlab.sources.arch import Adapter, adapter_for
from dynlab.sources.base import (
    Reader,
    SourceCheckpoint,
    SourceError,
    SourceRun,
    Tensors,
    check_named_shapes,
)
from dynlab.sources.tensors import load_model_tensors, weight_files, weights_complete

STEP_NAME = re.compile(r"^(?:step_?|checkpoint-|global_step)(\d+)$")


def step_of(name: str) -> int | None:
    """stepN, step_N, checkpoint-N, global_stepN -> N; anything else -> None."""
    m = STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def is_model_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    try:
        weight_files(path)
    except SourceError:
        return False
    return True


def looks_like_model_dir(path: Path) -> bool:
    """config.json or any weight file: a model directory, complete or not."""
    names = ("config.json", "model.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin", "pytorch_model.bin.index.json")
    return any((path / n).exists() for n in names)


def step_children(path: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the step folders of a run, sorted; SourceError naming both when two
    folders claim one step (`step10`, `step_010`, `checkpoint-10`)."""
    out = []
    for child in path.iterdir():
        step = step_of(child.name)
        if step is not None and child.is_dir() and not child.is_symlink():
            out.append((step, child))
    try:
        return unique_steps(out)
    except CheckpointError as e:
        raise SourceError(str(e)) from None


def is_hf_run(path: Path) -> bool:
    return any(looks_like_model_dir(d) for _, d in step_children(path))


def trainer_meta(model_dir: Path, step: int) -> dict:
    """train_loss / lr at `step` from an HF Trainer checkpoint's trainer_state.json. A file
    that is not a JSON object with a `log_history` list is left out with a warning naming
    it (the weights are still analysed)."""
    f = model_dir / "trainer_state.json"
    meta: dict = {"step": step}
    if not f.is_file():
        return meta
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        warnings.warn(f"{f}: unreadable ({printable(e)}); its losses are left out",
                      stacklevel=2)
        return meta
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list):
        warnings.warn(f"{f}: expected a JSON object whose 'log_history' is a list; its losses "
                      "are left out", stacklevel=2)
        return meta
    for entry in history:
        if isinstance(entry, dict) and entry.get("step") == step:
            for key, name in (("loss", "train_loss"), ("learning_rate", "lr")):
                value = entry.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    meta[name] = float(value)
    return meta


def model_spec(model_dir: Path) -> tuple[dict, Adapter, ModelSpec]:
    f = model_dir / "config.json"
    if not f.is_file():
        raise SourceError(f"{f}: missing (a Hugging Face model directory needs config.json)")
    config = read_json(f)
    adapter = adapter_for(config, f)
    return config, adapter, adapter.spec(config, f)


def convert_model_dir(model_dir: Path, adapter: Adapter, spec: ModelSpec,
                      config: dict | None = None) -> Tensors:
    """A model directory's matrices under dynlab's names, checked against config.json (a
    relora-pico model's effective weights W + s·B·A, with its LoRA factors)."""
    tensors = load_model_tensors(model_dir)
    w = adapter.convert(tensors, spec, model_dir)
    if adapter.family == "pico" and config and config.get("relora"):
        from dynlab.sources.pico import compose_relora

        w = compose_relora(w, config["relora"], model_dir)
    check_named_shapes(w, spec, model_dir, gated=adapter.gated)
    return w


@dataclass(frozen=True)
class HFDirReader(Reader):
    """A run of local Hugging Face model directories (or one model directory)."""

    root: Path
    model_type: str
    spec: ModelSpec
    single: bool = False
    relora: bool = False
    format: str = "hf"

    @property
    def lora_scale(self) -> float | None:
        return 1.0 if self.relora else None

    @property
    def adapter(self) -> Adapter:
        from dynlab.sources.arch import ADAPTERS

        return ADAPTERS[self.model_type]

    def dirs(self) -> list[tuple[int, Path]]:
        if self.single:
            step = step_of(self.root.name)
            if step is None:
                step = int(trainer_global_step(self.root) or 0)
            return [(step, self.root)]
        return step_children(self.root)

    def checkpoints(self, run_name: str) -> list[SourceCheckpoint]:
        return [SourceCheckpoint(run_name, s, d, reader=self) for s, d in self.dirs()
                if (d / "config.json").is_file() and weights_complete(d)]

    def weights(self, ckpt: SourceCheckpoint, keep: Keep = None) -> Tensors:
        """Every tensor, whatever `keep` says: the model directory is converted whole (fused
        and renamed matrices)."""
        config, adapter, spec = model_spec(ckpt.path)
        if adapter.family != self.adapter.family or spec != self.spec:
            raise SourceError(f"{ckpt.path}: config.json describes another model than the "
                              f"run's first checkpoint ({spec} vs {self.spec})")
        return convert_model_dir(ckpt.path, adapter, spec, config)

    def meta(self, ckpt: SourceCheckpoint) -> dict:
        return trainer_meta(ckpt.path, ckpt.step)


def trainer_global_step(model_dir: Path) -> int | None:
    f = model_dir / "trainer_state.json"
    try:
        return int(json.loads(f.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def source_config(config: dict, adapter: Adapter, fmt: str, where: str) -> dict:
    """What the store keeps for a run: the model's config.json and how its names map."""
    return {"kind": "hf", "model": config,
            "source": {"format": fmt, "architecture": adapter.family, "path": where,
                       "model_type": config.get("model_type"),
                       "matrix_names": dict(adapter.native)}}


def open_hf_run(root: Path, name: str | None = None) -> SourceRun:
    """A model directory, or a directory of step/checkpoint model directories."""
    single = looks_like_model_dir(root)
    if single:
        first = root
    else:
        dirs = [d for _, d in step_children(root) if looks_like_model_dir(d)]
        if not dirs:
            raise SourceError(f"{root}: no model directory (expected config.json and weights, or "
                              "sub-directories stepN, step_N, checkpoint-N or global_stepN)")
        first = dirs[0]
    config, adapter, spec = model_spec(first)
    weight_files(first)  # a clear error for missing weights or shards, before anything runs
    reader = HFDirReader(root, adapter.model_types[0], spec, single,
                         relora=adapter.family == "pico" and bool(config.get("relora")))
    name = name or root.name
    ckpts = reader.checkpoints(name)
    if not ckpts:
        raise SourceError(f"{root}: no complete model directory (config.json and whole weights)")
    return SourceRun(name, root, source_config(config, adapter, "hf", str(root)), spec,
                     tuple(ckpts), reader=reader)
