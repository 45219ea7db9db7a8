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
