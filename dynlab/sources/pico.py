"""pico-train and relora-pico runs.

Layout (one run):

    RUN/training_config.yaml
    RUN/checkpoints/step_<N>/config.json           pico's keys: d_model, n_layers,
                                                   attention_n_heads, attention_n_kv_heads,
                                                   activation_hidden_dim, vocab_size, ...
    RUN/checkpoints/step_<N>/model.safetensors     names prefixed `pico_decoder.` (or `pico.`)
    RUN/checkpoints/step_<N>/learning_dynamics/{train,val}_{weights,gradients,activations}.pt
    RUN/checkpoints/latest -> step_<N>             (skipped)

The learning-dynamics files are plain dict[str, Tensor] torch files keyed by module names
without `.weight`, prefixed `_forward_module.` or `_forward_module.module.`, holding only the
modules named by `checkpointing.learning_dynamics.layer_suffixes` (by default
attention.v_proj, attention.o_proj, swiglu.w_2). The last step holds only `val_*` files.
`val_gradients` become the store's kind `grads` (the fixed batch), `train_gradients` the kind
`train_grads`: at step N the gradient of the batch that drives update N→N+1, a *sum* of the
sub-batches' mean gradients (scale-free metrics such as PER and cn are unaffected; norms scale
with the number of sub-batches). `fabric_state/` is never read.

relora-pico (`model_type` pico_relora_decoder / relora-pico, config.json's `relora` block with
r, lora_alpha, trainable_scaling) stores each wrapped linear as `<module>.weight` (frozen W),
`<module>.A_lora.weight` (r × in), `<module>.B_lora.weight` (out × r) and, with trainable
scaling, `<module>.s`. Its forward is W·x + s·B·A·x with s = tanh(s) when trainable and
lora_alpha / r otherwise, so the effective weight analysed is W + s·B·A and the `lora` kind is
s·B·A.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dynlab.errors import quoted
from dynlab.runs.checkpoints import Keep, ModelSpec, load_tensors, read_json
from dynlab.runs.layout import step_of, unique_steps
from dynlab.sources.arch import pico_convert, pico_keep, pico_spec
from dynlab.sources.base import (
    FOLLOWING,
    Grads,
    Reader,
    SourceCheckpoint,
    SourceError,
    SourceRun,
    Tensors,
    check_named_shapes,
)
from dynlab.sources.tensors import load_torch_tensor_dict, safetensors_complete

LD_DIR = "learning_dynamics"
GRAD_FILES = {"grads": "val_gradients.pt", "train_grads": "train_gradients.pt"}
MODULE_PREFIXES = ("_forward_module.module.", "_forward_module.", "module.")
RELORA_TYPES = ("pico_relora_decoder", "relora-pico")


def is_pico_run(path: Path) -> bool:
    return (path / "training_config.yaml").is_file() and (path / "checkpoints").is_dir()


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a mapping at the top level")
    return data


#: the sections of training_config.yaml dynlab reads, each a mapping when present
YAML_SECTIONS = ("training", "training.fabric", "training.optimization", "model",
                 "model.relora")
#: the whole numbers dynlab reads from it
YAML_INTEGERS = ("training.max_steps", "training.fabric.num_nodes",
                 "training.fabric.num_devices", "training.optimization.lr_warmup_steps")


def check_training_config(config: dict, path: Path) -> None:
    """SourceError naming `path` and the key unless every section dynlab reads is a mapping
    and every count a whole number (when present; null counts as absent)."""
    def get(dotted: str):
        node = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    for key in YAML_SECTIONS:
        if get(key) is not None and not isinstance(get(key), dict):
            raise SourceError(f"{path}: '{key}' is {quoted(get(key))}; expected a mapping")
    for key in YAML_INTEGERS:
        value = get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise SourceError(f"{path}: '{key}' is {quoted(value)}; expected a whole number")


def step_complete(step_dir: Path, live: bool = False) -> bool:
    """A pico-train step folder is complete once config.json parses and model.safetensors is
    whole; in a live run also every learning-dynamics torch file must be a whole zip archive
    (torch.save's format ends with the zip's central directory)."""
    import zipfile

    try:
        read_json(step_dir / "config.json")
    except Exception:
        return False
    if not safetensors_complete(step_dir / "model.safetensors"):
        return False
    ld = step_dir / LD_DIR
    return not live or not ld.is_dir() or all(zipfile.is_zipfile(f) for f in ld.glob("*.pt"))


def world_size(training_config: dict) -> int:
    fabric = (training_config.get("training") or {}).get("fabric") or {}
    return int(fabric.get("num_nodes", 1) or 1) * int(fabric.get("num_devices", 1) or 1)


def module_key(name: str) -> str:
    """`_forward_module.layers.0.attention.v_proj` -> `layers.0.attention.v_proj.weight`."""
    for p in MODULE_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    return name + ".weight"


def unscramble_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """Undo pico-train's single-device activation layout. On one device each sub-batch's
    (b, h) block is stored as true.T.reshape(-1, h); block.reshape(h, -1).T restores it.
    `block` is the sub-batch size (the last block may be shorter)."""
    h = x.shape[1]
    parts = [x[i:i + block].reshape(h, -1).T for i in range(0, x.shape[0], block)]
    return torch.cat(parts) if parts else x


def compose_relora(w: Tensors, relora: dict, path: Path) -> Tensors:
    """Effective weights W + s·B·A under the standard names, plus `lora_A` (A) and `lora_B`
    (s·B) so that the `lora` kind (scale 1) is s·B·A. s = tanh(s) with trainable scaling,
    else lora_alpha / r (relora-pico's ReLoRALinear._scale)."""
    try:
        r, alpha = float(relora["r"]), float(relora["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise SourceError(f"{path}: config.json's 'relora' block needs r and lora_alpha") from None
    trainable = bool(relora.get("trainable_scaling", False))
    out: Tensors = {}
    for k, v in w.items():
        if k.endswith((".A_lora.weight", ".B_lora.weight")) or k.endswith(".s"):
            continue
        out[k] = v
    for k in [k for k in w if k.endswith(".A_lora.weight")]:
        module = k[: -len(".A_lora.weight")]
        a, b = w[k], w.get(module + ".B_lora.weight")
        base = w.get(module + ".weight")
        if b is None or base is None:
            raise SourceError(f"{path}: {module} has A_lora but no B_lora or base weight")
        if trainable:
            if module + ".s" not in w:
                raise SourceError(f"{path}: trainable_scaling is set but {module}.s is missing")
            s = torch.tanh(w[module + ".s"].double().reshape(-1)[0])
        else:
            s = torch.tensor(alpha / r, dtype=torch.float64)
        sb = s * b.double()
        out[module + ".weight"] = base.double() + sb @ a.double()
        out[module + ".lora_A"] = a
        out[module + ".lora_B"] = sb
    return out


@dataclass(frozen=True)
class PicoTrainReader(Reader):
    """A pico-train (or relora-pico) run directory."""

    root: Path
    training_config: dict
    model_config: dict
    spec: ModelSpec
    relora: dict | None = None

    @property
    def format(self) -> str:  # type: ignore[override]
        return "relora-pico" if self.relora is not None else "pico-train"

    def step_dirs(self) -> list[tuple[int, Path]]:
        out = []
        for child in (self.root / "checkpoints").iterdir():
            step = step_of(child)
            if step is not None and not child.is_symlink() and child.is_dir():
                out.append((step, child))
        return unique_steps(out)

    def checkpoints(self, run_name: str) -> list[SourceCheckpoint]:
        """Complete steps. While following a live run (`FOLLOWING` set) a step also needs a
        later step folder, or to be the last step (training.max_steps or --until): pico-train
        writes a step's files one after another, and only the next step shows that it is done."""
        dirs = self.step_dirs()
        following = FOLLOWING.get()
        out = []
        for i, (step, d) in enumerate(dirs):
            if not step_complete(d, live=following is not None):
                continue
            if following is not None:
                ends = [s for s in (self.last_step(), following.get("until")) if s is not None]
                if i == len(dirs) - 1 and not (ends and step >= min(ends)):
                    continue
            out.append(SourceCheckpoint(run_name, step, d, reader=self))
        return out

    def weights(self, ckpt: SourceCheckpoint, keep: Keep = None) -> Tensors:
        """model.safetensors under dynlab's names: only the tensors `keep` keeps are read
        (its names are dynlab's behind the HF wrapper's prefix)."""
        f = ckpt.path / "model.safetensors"
        w = pico_convert(load_tensors(f, keep=None if keep is None else pico_keep(keep)),
                         self.spec, f)
        if self.relora is not None:
            w = compose_relora(w, self.relora, f)
        check_named_shapes(w, self.spec, f, keep=keep)
        return w

    def grad_kinds(self) -> tuple[str, ...]:
        dirs = [d / LD_DIR for _, d in self.step_dirs()]
        return tuple(k for k, name in GRAD_FILES.items() if any((d / name).is_file() for d in dirs))

    def grads(self, ckpt: SourceCheckpoint, weights: Tensors,
              kinds: tuple[str, ...] = ("grads", "train_grads")) -> Grads:
        found = {}
        for kind, name in GRAD_FILES.items():
            f = ckpt.path / LD_DIR / name
            if kind in kinds and f.is_file():
                g = {module_key(k): v for k, v in load_torch_tensor_dict(f).items()}
                found[kind] = {k: v for k, v in g.items()
                               if k in weights and tuple(v.shape) == tuple(weights[k].shape)}
        return Grads(found.get("grads"), found.get("train_grads"))

    def activations(self, ckpt: SourceCheckpoint, split: str = "val") -> Tensors:
        """The learning-dynamics activations (module output at the chosen sequence position,
        (batch, out) per module) in sample order, unscrambled on single-device runs."""
        f = ckpt.path / LD_DIR / f"{split}_activations.pt"
        acts = {module_key(k).removesuffix(".weight"): v
                for k, v in load_torch_tensor_dict(f).items()}
        if world_size(self.training_config) != 1:
            return acts
        ld = (self.training_config.get("checkpointing") or {}).get("learning_dynamics") or {}
        return {k: unscramble_activations(v, int(ld.get("batch_size") or v.shape[0]))
                for k, v in acts.items()}

    def has_activations(self, ckpt: SourceCheckpoint, split: str = "val") -> bool:
        return (ckpt.path / LD_DIR / f"{split}_activations.pt").is_file()

    def saved_activations(self, ckpt: SourceCheckpoint, split: str = "val") -> Tensors:
        """The learning-dynamics activations in dynlab's saved layout
        (dynlab.analysis.activations): `layers.<i>.<module>` (samples, out) float32 in sample
        order, and `token_positions` (samples, 2) = (sample, `sequence_idx`): pico-train keeps
        each sample's output at one position, `learning_dynamics.sequence_idx` (-1: the last)."""
        acts: Tensors = {k: v.float() for k, v in self.activations(ckpt, split).items()}
        ld = (self.training_config.get("checkpointing") or {}).get("learning_dynamics") or {}
        n = next(iter(acts.values())).shape[0] if acts else 0
        position = int(ld.get("sequence_idx", -1))
        acts["token_positions"] = torch.stack(
            [torch.arange(n, dtype=torch.long), torch.full((n,), position, dtype=torch.long)], 1)
        return acts

    def last_step(self) -> int | None:
        steps = (self.training_config.get("training") or {}).get("max_steps")
        return int(steps) if steps is not None else None

    @property
    def lora_scale(self) -> float | None:
        return 1.0 if self.relora is not None else None


def report_config(training_config: dict, relora: dict | None) -> dict:
    """The run.json-style entries the report reads: `train.steps`, `train.warmup_steps` and,
    for relora-pico, `relora.reset_every` (model.relora.reset_frequency) with relora-pico's
    own reset rule (`paper_compat`: a reset follows update t when t > warmup and
    t mod reset_every = 1)."""
    training = training_config.get("training") or {}
    optim = training.get("optimization") or {}
    out: dict = {"train": {k: v for k, v in (("steps", training.get("max_steps")),
                                             ("warmup_steps", optim.get("lr_warmup_steps")))
                           if v is not None}}
    if relora is not None:
        model_relora = (training_config.get("model") or {}).get("relora") or {}
        every = model_relora.get("reset_frequency", relora.get("reset_frequency"))
        out["relora"] = {**relora, "paper_compat": True,
                         **({"reset_every": every} if every else {})}
    return out


def open_pico_run(root: Path, name: str | None = None, fmt: str | None = None) -> SourceRun:
    """A pico-train or relora-pico run (detected from config.json's model_type / relora block;
    `fmt` forces one)."""
    training_config = read_yaml(root / "training_config.yaml")
    check_training_config(training_config, root / "training_config.yaml")
    steps = [d for _, d in PicoTrainReader(root, {}, {}, None).step_dirs()]
    if not steps:
        raise SourceError(f"{root / 'checkpoints'}: no step_<N>/ folders")
    model_config = read_json(steps[0] / "config.json")
    spec = pico_spec(model_config, steps[0] / "config.json")
    is_relora = model_config.get("model_type") in RELORA_TYPES or bool(model_config.get("relora"))
    if fmt == "relora-pico" and not model_config.get("relora"):
        raise SourceError(f"{steps[0] / 'config.json'}: --format relora-pico needs a 'relora' "
                          "block (r, lora_alpha)")
    if fmt is not None:
        is_relora = fmt == "relora-pico"
    if is_relora and not isinstance(model_config.get("relora"), dict):
        raise SourceError(f"{steps[0] / 'config.json'}: 'relora' is "
                          f"{quoted(model_config.get('relora'))}; expected an object (r, "
                          "lora_alpha)")
    relora = dict(model_config["relora"]) if is_relora else None
    reader = PicoTrainReader(root, training_config, model_config, spec, relora)
    name = name or root.name
    ckpts = reader.checkpoints(name)
    if not ckpts:
        raise SourceError(f"{root / 'checkpoints'}: no complete step yet (expected step_<N>/ "
                          "with config.json and a whole model.safetensors)")
    config = {"kind": "relora" if is_relora else "decoder", "model": model_config,
              "training_config": training_config,
              "source": {"format": reader.format, "architecture": "pico", "path": str(root)}}
    config.update(report_config(training_config, relora))
    return SourceRun(name, root, config, spec, tuple(ckpts), reader=reader)
