"""Generated runs in the checkpoint layout, for tests, benchmarks and trying the analysis.

`matrix_with_spectrum` builds W = U·diag(σ)·Vᵀ with random orthonormal U, V, so its singular
values are known exactly (up to rounding of the stored dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from dynlab.runs.checkpoints import ModelSpec
from dynlab.runs.files import write_checkpoint, write_run_json


def matrix_with_spectrum(
    m: int, n: int, sigma: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """An m×n float64 matrix whose singular values are `sigma` (length min(m, n))."""
    k = min(m, n)
    if sigma.shape != (k,):
        raise ValueError(f"sigma must have min(m, n) = {k} entries, got {tuple(sigma.shape)}")
    u, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator))
    return (u * sigma.to(torch.float64)) @ v.T


def geometric_spectrum(k: int, kappa: float) -> torch.Tensor:
    """σ_i from 1 down to 1/κ, geometrically spaced."""
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    return torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), k, dtype=torch.float64)


def random_weights(
    spec: ModelSpec, generator: torch.Generator, dtype: torch.dtype = torch.float32,
    scale: float = 0.02,
) -> dict[str, torch.Tensor]:
    """Gaussian weights of every parameter of `spec` (norm weights = 1)."""
    out = {}
    for name, shape in spec.expected_shapes().items():
        if len(shape) == 1:
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=generator) * scale).to(dtype)
    return out


def model_config(spec: ModelSpec, max_seq_len: int = 128) -> dict:
    return {
        "d_model": spec.d_model, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads, "activation_hidden_dim": spec.activation_hidden_dim,
        "vocab_size": spec.vocab_size, "max_seq_len": max_seq_len,
    }


def make_run(
    run_dir: str | Path,
    spec: ModelSpec,
    steps: list[int],
    *,
    seed: int = 0,
    grads: bool = True,
    dtype: torch.dtype = torch.float32,
    relora: Mapping | None = None,
    edit: Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor] | None], None]
    | None = None,
    meta: Callable[[int], Mapping] | None = None,
) -> Path:
    """A run directory with Gaussian weights (and grads) at `steps`; weights drift by small
    random updates between checkpoints. `edit(step, weights, grads)` may change tensors in
    place before they are written (e.g. plant a known spectrum). relora={"r", "alpha"} adds
    lora_A/lora_B factors and makes it a relora run."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config: dict = {"kind": "relora" if relora else "decoder", "model": model_config(spec)}
    if relora:
        config["relora"] = {"r": relora["r"], "alpha": relora["alpha"],
                            "reset_every": relora.get("reset_every", 100)}
    write_run_json(run_dir, config)
    g = torch.Generator().manual_seed(seed)
    w = random_weights(spec, g, torch.float32)
    for step in steps:
        w = {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in w.items()}
        out_w = {k: v.to(dtype) for k, v in w.items()}
        if relora:
            for name, shape in spec.expected_shapes().items():
                if len(shape) == 2 and name.startswith("layers."):
                    mod = name.removesuffix(".weight")
                    a = torch.randn(relora["r"], shape[1], generator=g)
                    out_w[f"{mod}.lora_A"] = a.to(dtype)
                    out_w[f"{mod}.lora_B"] = (
                        0.01 * torch.randn(shape[0], relora["r"], generator=g)
                    ).to(dtype)
        out_g = None
        if grads:
            out_g = {k: (1e-3 * torch.randn(v.shape, generator=g)).to(dtype)
                     for k, v in w.items()}
        if edit is not None:
            edit(step, out_w, out_g)
        write_checkpoint(run_dir, step, out_w, out_g,
                         {"step": step, **(meta(step) if meta else {})})
    return run_dir


#: the modules pico-train saves learning-dynamics data for by default (`layer_suffixes`)
PICO_LD_MODULES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")


def pico_model_config(spec: ModelSpec, max_seq_len: int = 2048) -> dict:
    """pico-train's model section (and its HF config.json's fields)."""
    return {"model_type": "pico_decoder", "d_model": spec.d_model, "n_layers": spec.n_layers,
            "attention_n_heads": spec.n_heads, "attention_n_kv_heads": spec.n_kv_heads,
            "activation_hidden_dim": spec.activation_hidden_dim,
            "vocab_size": spec.vocab_size, "max_seq_len": max_seq_len}


def make_pico_run(
    root: str | Path,
    spec: ModelSpec,
    steps: list[int],
    *,
    seed: int = 0,
    ld_modules: tuple[str, ...] = PICO_LD_MODULES,
    ld_batch: int = 64,
    devices: int = 2,
) -> Path:
    """A pico-train run as its trainer lays it out: `training_config.yaml`, and per step
    `checkpoints/step_N/` with `config.json`, `model.safetensors` (names prefixed
    `pico_decoder.`) and `learning_dynamics/{train,val}_{gradients,weights,activations}.pt`
    (the last step has `val` only, as pico-train writes it), keyed by the module names of the
    Fabric-wrapped model (`_forward_module.module.layers.<i>.<module>` on `devices` > 1,
    where activations are stored as computed: `ld_batch` rows of each module's output).
    Weights are Gaussian and drift between checkpoints; gradients are Gaussian. Read by
    dynlab.sources.pico and by pico-analyze itself."""
    import json

    import yaml
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model = pico_model_config(spec)
    config = {
        "checkpointing": {"run_name": root.name,
                          "learning_dynamics": {"batch_size": ld_batch,
                                                "layer_suffixes": list(ld_modules),
                                                "sequence_idx": -1}},
        "training": {"max_steps": steps[-1],
                     "fabric": {"num_nodes": 1, "num_devices": devices}},
        "model": model,
    }
    (root / "training_config.yaml").write_text(yaml.safe_dump(config))
    prefix = "_forward_module.module." if devices > 1 else "_forward_module."
    g = torch.Generator().manual_seed(seed)
    w = random_weights(spec, g, torch.float32)
    for step in steps:
        w = {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in w.items()}
        d = root / "checkpoints" / f"step_{step}"
        (d / "learning_dynamics").mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({**model,
                                                   "architectures": ["PicoDecoderHF"]}))
        save_file({f"pico_decoder.{k}": v for k, v in w.items()}, str(d / "model.safetensors"))
        for split in ("val",) if step == steps[-1] else ("train", "val"):
            grads, acts, ws = {}, {}, {}
            for layer in range(spec.n_layers):
                for m in ld_modules:
                    key, weight = f"{prefix}layers.{layer}.{m}", w[f"layers.{layer}.{m}.weight"]
                    grads[key] = 1e-3 * torch.randn(weight.shape, generator=g)
                    ws[key] = weight.clone()
                    acts[key] = torch.randn(ld_batch, weight.shape[0], generator=g)
            ld = d / "learning_dynamics"
            torch.save(grads, ld / f"{split}_gradients.pt")
            torch.save(acts, ld / f"{split}_activations.pt")
            torch.save(ws, ld / f"{split}_weights.pt")
    return root
