"""The source contract: what `dynlab analyze` needs from any kind of checkpoint collection.

A source is one run: an ordered list of checkpoints (each with its training step), and for a
checkpoint its tensors under dynlab's names (the pico-decoder names:
`layers.<i>.attention.{q,k,v,o}_proj.weight`, `layers.<i>.swiglu.w_{0,1,2}.weight`,
`embedding_proj.weight`, `de_embedding_proj.weight`; Linear layout (out, in)), the gradients
where it holds any, and its meta (training values such as the loss, where known). The shape of
the model is a `ModelSpec`.

A `Reader` implements this for one format. `SourceRun` and `SourceCheckpoint` are the
analysis's `Run` and `Checkpoint` with a reader attached, so everything that plans, stores
and reports works on them unchanged; a dynlab run stays a plain `Run`.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch

from dynlab.errors import InputError
from dynlab.runs.checkpoints import (
    Checkpoint,
    CheckpointError,
    Keep,
    LoadedCheckpoint,
    ModelSpec,
    Run,
    check_floating,
)

Tensors = dict[str, torch.Tensor]


#: set while `dynlab.analysis.follow` analyses live runs: None, or {"until": STEP or None}.
#: Readers whose files are not written atomically then list a checkpoint only once it can no
#: longer change (pico-train: once a later step exists, or it is the last step).
FOLLOWING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dynlab_following",
                                                                      default=None)


class SourceError(CheckpointError, InputError):
    """A source on disk or on the Hub is not what dynlab expects (exit 2); the message names
    the path, revision or argument."""


@dataclass(frozen=True)
class Grads:
    """Gradients of one checkpoint by kind: `grads` (the fixed learning-dynamics batch) and,
    for pico-train runs, `train_grads` (the training batch of the next update)."""

    grads: Tensors | None = None
    train_grads: Tensors | None = None


class Reader:
    """One source's checkpoints and tensors. Subclasses are small picklable dataclasses (a
    reader travels with its run to Dask workers)."""

    format: str = "?"

    def checkpoints(self, run_name: str) -> list[SourceCheckpoint]:
        """Every complete checkpoint, sorted by step."""
        raise NotImplementedError

    def weights(self, ckpt: SourceCheckpoint, keep: Keep = None) -> Tensors:
        """Weights under dynlab's names (relora: the effective weight, plus lora_A/lora_B).
        Tensors whose name `keep` rejects may be left out (a reader that reads its files in
        part does; one that must convert the whole model returns every tensor)."""
        raise NotImplementedError

    def grads(self, ckpt: SourceCheckpoint, weights: Tensors,
              kinds: tuple[str, ...] = ("grads", "train_grads")) -> Grads:
        """Gradients under dynlab's names (only the matrices the source holds), of the
        gradient `kinds` asked for (the others may be left None)."""
        return Grads()

    def grad_kinds(self) -> tuple[str, ...]:
        """The gradient kinds this source can give (a subset of grads, train_grads)."""
        return ()

    def meta(self, ckpt: SourceCheckpoint) -> dict:
        """Training values of a checkpoint (`train_loss`, `lr`, `tokens`, ...), where known."""
        return {"step": ckpt.step}

    def release(self, ckpt: SourceCheckpoint) -> None:
        """Called once a checkpoint is analysed (a Hub source deletes its download)."""

    @property
    def lora_scale(self) -> float | None:
        """s of the `lora` kind (None: the source has no LoRA factors)."""
        return None


@dataclass(frozen=True)
class SourceCheckpoint(Checkpoint):
    """A checkpoint of a non-dynlab source; `path` is its directory (or, for the Hub, the
    revision's name)."""

    reader: Reader | None = None
    revision: str | None = None

    def meta(self) -> dict:
        return self.reader.meta(self)

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()


@dataclass(frozen=True)
class SourceRun(Run):
    """A run read through a `Reader`. `config` is what the store keeps in `run_configs`:
    the source's own configuration under its names plus a "source" block (format,
    architecture, the native name of every stored matrix)."""

    reader: Reader | None = None

    @property
    def lora_scale(self) -> float | None:
        return self.reader.lora_scale


def load_source_checkpoint(run: Run, ckpt: Checkpoint, *, grads: bool = True,
                           kinds: tuple[str, ...] = ("grads",), keep: Keep = None
                           ) -> LoadedCheckpoint:
    """A checkpoint's tensors under dynlab's names, for any run (dynlab runs through
    `dynlab.runs.checkpoints.load_checkpoint`); those `keep` rejects may be left out."""
    from dynlab.runs.checkpoints import load_checkpoint

    if not isinstance(run, SourceRun):
        return load_checkpoint(ckpt, run.spec, grads=grads, keep=keep)
    weights = run.reader.weights(ckpt, keep)
    wanted = ("grads",) + ("train_grads",) * ("train_grads" in kinds)
    g = run.reader.grads(ckpt, weights, wanted) if grads else Grads()
    loaded = LoadedCheckpoint(ckpt, weights, g.grads, ckpt.meta())
    loaded.train_grads = g.train_grads if "train_grads" in kinds else None
    return loaded


def load_source_weights(run: Run, ckpt: Checkpoint, keep: Keep = None) -> Tensors:
    """A checkpoint's weights under dynlab's names (the previous checkpoint, for updates);
    those `keep` rejects may be left out."""
    from dynlab.runs.checkpoints import load_tensors

    if not isinstance(run, SourceRun):
        return load_tensors(ckpt.file("weights.safetensors"), keep=keep)
    return run.reader.weights(ckpt, keep)


def run_grad_kinds(run: Run) -> tuple[str, ...]:
    """The gradient kinds a run can give: a dynlab run has `grads` when any checkpoint holds
    grads.safetensors."""
    if isinstance(run, SourceRun):
        return run.reader.grad_kinds()
    return ("grads",) if any(c.has("grads.safetensors") for c in run.checkpoints) else ()


def release(run: Run, ckpt: Checkpoint) -> None:
    if isinstance(run, SourceRun):
        run.reader.release(ckpt)


def check_named_shapes(tensors: Tensors, spec: ModelSpec, path: object, *,
                       gated: bool = True, what: str = "config.json", keep: Keep = None
                       ) -> None:
    """Every matrix dynlab analyses (of those `keep` keeps) is present with the shape the
    config implies (the gate `swiglu.w_0` only for gated MLPs)."""
    expected = {k: v for k, v in spec.expected_shapes().items()
                if k.endswith(".weight") and len(v) == 2 and (keep is None or keep(k))}
    for name, shape in expected.items():
        if not gated and ".swiglu.w_0." in name:
            continue
        if name.startswith(("embedding_proj", "de_embedding_proj")):
            shape = (tensors[name].shape[0], spec.d_model) if name in tensors else shape
        if name not in tensors:
            raise SourceError(f"{path}: missing parameter for {name} ({what} implies it)")
        try:
            check_floating(name, tensors[name], path)
        except CheckpointError as e:
            raise SourceError(str(e)) from None
        if tuple(tensors[name].shape) != tuple(shape):
            raise SourceError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, but {what} implies "
                f"{tuple(shape)}"
            )
