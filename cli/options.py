"""The vocabulary every `dynlab` command shares: one spelling per option, the closed choices
as enums, comma lists parsed one way.

    -o/--out        every output (file, folder or store) of every command
    --device        auto (default), cpu, cuda, cuda:N; resolved by dynlab.devices.resolve_device
    -m/--metrics    comma list of metrics (or 'all')
    -k/--kinds      comma list of matrix kinds (or 'all')
    --progress/--no-progress

The enums spell the choices the library accepts; tests/test_cli.py checks that they equal the
library's own tuples (dynlab.analysis.run.PRECISIONS, dynlab.sources.FORMATS, ...), so the
command line imports no torch to draw its help.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

#: what `--device` accepts (dynlab.devices.DEVICE_HELP, repeated to keep torch out of --help;
#: tests/test_cli.py checks the two are equal)
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."


class Precision(str, Enum):
    """Floating-point type of the spectra (dynlab.analysis.run.PRECISIONS)."""

    float64 = "float64"
    float32 = "float32"


class Convention(str, Enum):
    """Which definitions of the OV matrices and the condition number (dynlab.analysis)."""

    dynlab = "dynlab"
    pico = "pico"


class SourceFormat(str, Enum):
    """Checkpoint layouts `dynlab analyze` reads (dynlab.sources.FORMATS)."""

    dynlab = "dynlab"
    pico_train = "pico-train"
    relora_pico = "relora-pico"
    hf = "hf"


class ExportFormat(str, Enum):
    """Layouts `dynlab export` writes (dynlab.analysis.export.FORMATS)."""

    pico_analyze = "pico-analyze"
    tensorboard = "tensorboard"
    wandb = "wandb"


class Kind(str, Enum):
    """Matrix kinds of an analysis store (dynlab.analysis.components.KINDS)."""

    weights = "weights"
    grads = "grads"
    updates = "updates"
    lora = "lora"
    train_grads = "train_grads"


class OnError(str, Enum):
    """What `dynlab eval` does with a malformed line or a checkpoint it cannot evaluate."""

    fail = "fail"
    skip = "skip"


class Preset(str, Enum):
    """Model presets (dynlab.model.pico_decoder.PRESETS)."""

    micro = "micro"
    tiny = "tiny"
    small = "small"
    medium = "medium"
    large = "large"


class PruneMethod(str, Enum):
    """How a ReLoRA reset prunes the LoRA Adam moments."""

    random = "random"
    magnitude = "magnitude"


class Gpu(str, Enum):
    """GPUs of the `--dry-run` estimate (dynlab.training.costs.GPUS)."""

    h100 = "h100"
    h100_pcie = "h100-pcie"
    h200 = "h200"
    a100 = "a100"
    a100_40gb = "a100-40gb"
    l40s = "l40s"
    a10 = "a10"


def choices(enum: type[Enum]) -> str:
    """'[a|b|c]': the metavar of a string option that the library checks against `enum`'s
    values with its own message (--format of analyze, --gpu of train)."""
    return "[" + "|".join(str(e.value) for e in enum) + "]"


def value(choice: Enum | None) -> str | None:
    """The string of an enum choice (None stays None), as the library takes it."""
    return None if choice is None else str(choice.value)


def split(spec: str | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c'] (None -> [])."""
    return [] if spec is None else [s.strip() for s in spec.split(",") if s.strip()]


def comma_list(flag: str, allowed: type[Enum] | None = None
               ) -> Callable[[str | None], str | None]:
    """A typer callback for a comma-list option: checks every item (against `allowed` and
    'all' when given) and returns the list joined by commas, or None when not given."""

    def check(spec: str | None) -> str | None:
        if spec is None:
            return None
        items = split(spec)
        if not items:
            raise typer.BadParameter(f"{spec!r}: expected a comma list", param_hint=flag)
        if allowed is not None:
            names = [e.value for e in allowed]
            bad = [i for i in items if i not in (*names, "all")]
            if bad:
                raise typer.BadParameter(f"{', '.join(bad)}: expected a comma list of "
                                         f"{', '.join(names)}, or 'all'", param_hint=flag)
        return ",".join(items)

    return check


def resolve(device: str) -> str:
    """`--device` through dynlab.devices.resolve_device, as the string the library takes
    ('auto' -> 'cuda' or 'cpu'). ValueError (exit 2) for a value that is no device here."""
    from dynlab.devices import resolve_device

    return str(resolve_device(device))


# ------------------------------------------------------------------ shared option types

Device = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
KIND_NAMES = ", ".join(k.value for k in Kind)


def metrics_option(help: str = "Comma list of metrics, or 'all'.") -> Any:
    """-m/--metrics (typer.Option): a comma list of metric names (checked by the library)."""
    return typer.Option("--metrics", "-m", callback=comma_list("--metrics"),
                        show_default=False, help=help)


def kinds_option(help: str = f"Comma list of {KIND_NAMES}; or 'all'.") -> Any:
    """-k/--kinds (typer.Option): a comma list of Kind values or 'all'."""
    return typer.Option("--kinds", "-k", callback=comma_list("--kinds", Kind),
                        show_default=False, help=help)


Store = Annotated[Path, typer.Argument(help="A Zarr store written by `dynlab analyze`.",
                                       show_default=False)]


class LiveLog(str, Enum):
    """Where `dynlab train --log` logs live (dynlab.training.livelog)."""

    tensorboard = "tensorboard"
    wandb = "wandb"
# ------------------------------------------------------------------ selections
# What to analyse (dynlab.analysis.selection checks each list and names what exists); the
# same three options serve every command that reads checkpoints matrix by matrix.

STEPS_HELP = ("Checkpoints to analyse: a comma list of steps N, ranges A:B (every checkpoint "
              "from A to B) or A:B:K (A, A+K, ... up to B), and 'last' (each run's last "
              "checkpoint). Default: every checkpoint.")
LAYERS_HELP = ("Layers to analyse: a comma list of N, A:B, A:B:K (inclusive) and 'last'. "
               "Default: every layer. The embeddings belong to no layer: select them with "
               "--matrices.")
MATRICES_HELP = ("Matrices to analyse: a comma list of names or globs over attention.q_proj, "
                 "attention.k_proj, attention.v_proj, attention.o_proj, swiglu.w_0, "
                 "swiglu.w_1, swiglu.w_2, ov_circuit, qk_circuit (each with its heads), "
                 "embedding_proj, de_embedding_proj. Default: all.")


def steps_option(help: str = STEPS_HELP) -> Any:
    """--steps (typer.Option): a comma list of steps, ranges A:B[:K] and 'last'."""
    return typer.Option("--steps", callback=comma_list("--steps"), show_default=False,
                        help=help)


def layers_option(help: str = LAYERS_HELP) -> Any:
    """--layers (typer.Option): a comma list of layers, ranges A:B[:K] and 'last'."""
    return typer.Option("--layers", callback=comma_list("--layers"), show_default=False,
                        help=help)


def matrices_option(help: str = MATRICES_HELP) -> Any:
    """--matrices (typer.Option): a comma list of matrix names or globs."""
    return typer.Option("--matrices", callback=comma_list("--matrices"), show_default=False,
                        help=help)


# ------------------------------------------------------------------ hf:// and --follow
# The options every command that reads checkpoints of any source shares (analyze, eval);
# `done` is the command's past participle ("analysed", "evaluated").


def source_format_option() -> Any:
    """--format (typer.Option) of the commands that read sources: one of SourceFormat."""
    return typer.Option("--format", show_default=False, metavar=choices(SourceFormat),
                        help="Force the source format (default: detected per path; checked "
                        "by dynlab.sources).")


def revisions_option() -> Any:
    """--revisions (typer.Option): hf:// revisions, a comma list and/or ranges."""
    return typer.Option("--revisions", show_default=False,
                        help="hf:// only: revisions, a comma list and/or ranges stepA:stepB:K "
                        "(default: every step<N> branch).")


def keep_downloads_option(done: str) -> Any:
    """--keep-downloads (typer.Option)."""
    return typer.Option("--keep-downloads",
                        help="hf:// only: keep each downloaded revision in the Hugging Face "
                        f"cache (default: delete it once {done}; at most two on disk).")


def hub_cache_option() -> Any:
    """--hub-cache (typer.Option)."""
    return typer.Option("--hub-cache", show_default=False,
                        help="hf:// only: the huggingface_hub cache directory (default "
                        "HF_HUB_CACHE).")


def follow_option(verb: str, done: str) -> Any:
    """--follow (typer.Option): `verb` checkpoints as they complete."""
    return typer.Option("--follow", help=f"{verb} checkpoints as they complete, until the "
                        f"run's last step (or --until) is {done}, or Ctrl-C.")


def until_option(done: str) -> Any:
    """--until (typer.Option)."""
    return typer.Option("--until", min=0, show_default=False,
                        help=f"--follow: stop once this step is {done}.")


def poll_option() -> Any:
    """--poll (typer.Option)."""
    return typer.Option("--poll", min=0.05, help="--follow: seconds between looks.")
