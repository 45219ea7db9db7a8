"""pico-relora: ReLoRA (Lialin et al. 2023) on the pico-decoder.

Every attention projection (q, k, v, o) and SwiGLU projection (w_0, w_1, w_2) becomes

    y = W x + s · B A dropout(x),      s = alpha / r,   W frozen,
    A (r × in): Kaiming-uniform (a = √5),   B (out × r): zeros,

so a freshly wrapped model computes exactly the decoder's function. Embeddings, norms and
the output head stay full-rank and trainable. A reset merges and restarts the factors:

    W ← W + s · B A,   A ← Kaiming-uniform,   B ← 0

(leaving the function unchanged) and prunes the Adam moments of A and B.

`paper_compat=True` reproduces the published relora-pico code, defects included: A is
zero-initialised at wrap time (A = B = 0, so wrapped layers cannot learn before the first
reset) and the merge omits the scale (W ← W + B A, which changes the function).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynlab.model.pico_decoder import PicoDecoder

TARGET_MODULES = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                  "swiglu.w_0", "swiglu.w_1", "swiglu.w_2")
PRUNE_METHODS = ("random", "magnitude")


@dataclass
class ReLoRAConfig:
    """ReLoRA hyper-parameters (defaults as the pico-relora study)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    reset_every: int = 2000
    restart_warmup_steps: int = 100
    prune_ratio: float = 0.999
    prune_method: str = "random"
    paper_compat: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"relora: rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"relora: alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"relora: dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.reset_every, int) or self.reset_every < 1:
            raise ValueError(f"relora: reset_every must be a positive integer, got "
                             f"{self.reset_every!r}")
        if not isinstance(self.restart_warmup_steps, int) or self.restart_warmup_steps < 0:
            raise ValueError("relora: restart_warmup_steps must be a non-negative integer, got "
                             f"{self.restart_warmup_steps!r}")
        if not 0.0 <= self.prune_ratio <= 1.0:
            raise ValueError(f"relora: prune_ratio must be in [0, 1], got {self.prune_ratio!r}")
        if self.prune_method not in PRUNE_METHODS:
            raise ValueError(f"relora: prune_method must be one of {PRUNE_METHODS}, got "
                             f"{self.prune_method!r}")

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)


class ReLoRALinear(nn.Module):
    """y = W x + s · B A dropout(x) with W frozen; A (r × in), B (out × r)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 zero_init_a: bool = False) -> None:
        super().__init__()
        if base.bias is not None:
            raise ValueError("ReLoRALinear wraps bias-free linear layers only")
        out_f, in_f = base.weight.shape
        self.in_features, self.out_features, self.r = in_f, out_f, r
        self.scale = alpha / r
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.dropout = nn.Dropout(dropout)
        if zero_init_a:
            nn.init.zeros_(self.lora_A)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._capture: list[torch.Tensor] | None = None

    def effective_weight(self) -> torch.Tensor:
        """W_eff = W + s · B A (differentiable in A and B)."""
        return self.weight + self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._capture is not None:  # learning-dynamics mode: one matmul with W_eff
            w_eff = self.effective_weight()
            self._capture.append(w_eff)
            return F.linear(x, w_eff)
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight) + self.scale * lora

    @torch.no_grad()
    def merge_and_reinit(self, paper_compat: bool = False) -> None:
        """W ← W + s·B A (paper_compat: W ← W + B A), A ← Kaiming-uniform(a=√5), B ← 0."""
        delta = self.lora_B @ self.lora_A
        self.weight += delta if paper_compat else self.scale * delta
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, s={self.scale:g}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def wrap_relora(model: PicoDecoder, cfg: ReLoRAConfig) -> PicoDecoder:
    """Replace q, k, v, o, w_0, w_1, w_2 of every layer by ReLoRALinear, in place.

    With paper_compat, A starts at zero (relora-pico's keep_original_weights path)."""
    for i in range(len(model.layers)):
        for target in TARGET_MODULES:
            name = f"layers.{i}.{target}"
            base = model.get_submodule(name)
            if isinstance(base, ReLoRALinear):
                raise ValueError(f"{name} is already wrapped")
            _set_submodule(model, name, ReLoRALinear(base, cfg.r, cfg.alpha, cfg.dropout,
                                                      zero_init_a=cfg.paper_compat))
    model.relora_config = cfg
    return model


def relora_modules(model: nn.Module) -> dict[str, ReLoRALinear]:
    """Module name -> ReLoRALinear, e.g. 'layers.0.attention.q_proj'."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ReLoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors A and B of every wrapped module."""
    return [p for m in relora_modules(model).values() for p in (m.lora_A, m.lora_B)]


@torch.no_grad()
def random_prune_(tensor: torch.Tensor, ratio: float) -> None:
    """Zero each entry independently with probability `ratio` (mask = U(0,1) > ratio)."""
    tensor.mul_(torch.rand_like(tensor) > ratio)


@torch.no_grad()
def magnitude_prune_(tensor: torch.Tensor, ratio: float) -> None:
    """Zero the floor(ratio · n) entries of smallest magnitude (keep |x| > k-th smallest |x|)."""
    k = int(ratio * tensor.numel())
    if k <= 0:
        return
    mags = tensor.abs().flatten().float()
    threshold = mags.kthvalue(k).values
    tensor.mul_(tensor.abs().float() > threshold)


@torch.no_grad()
def prune_moments_(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], ratio: float,
                   method: str = "random", keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
                   ) -> None:
    """Prune the Adam moments of `params` in place (ReLoRA's partial optimizer reset)."""
    prune = {"random": random_prune_, "magnitude": magnitude_prune_}[method]
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in keys:
            if key in state:
                prune(state[key], ratio)


@torch.no_grad()
def merge_and_reset(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    cfg: ReLoRAConfig) -> None:
    """One ReLoRA reset: merge every module's factors, re-initialise them, prune their moments."""
    for module in relora_modules(model).values():
        module.merge_and_reinit(paper_compat=cfg.paper_compat)
    if optimizer is not None:
        prune_moments_(optimizer, lora_parameters(model), cfg.prune_ratio, cfg.prune_method)


@contextmanager
def capture_effective_weights(model: nn.Module):
    """Within this context each ReLoRALinear computes F.linear(x, W + s·B A) without dropout
    and records that W_eff tensor; yields {module name: [W_eff per forward call]}.

    Passing W_eff to torch.autograd.grad gives dL/dW_eff, the gradient the same loss has
    for an unwrapped model holding W_eff; the factors' gradients follow by the chain rule
    (dL/dB = s · G Aᵀ, dL/dA = s · Bᵀ G with G = dL/dW_eff)."""
    mods = relora_modules(model)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    for name, m in mods.items():
        m._capture = captured[name]
    try:
        yield captured
    finally:
        for m in mods.values():
            m._capture = None


@torch.no_grad()
def effective_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter under pico-train names, with W + s·B A in place of each wrapped W,
    plus `<module>.lora_A` and `<module>.lora_B`."""
    mods = relora_modules(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, m in mods.items():
        state[f"{name}.weight"] = m.effective_weight().detach()
    return state


def unwrap(model: nn.Module) -> PicoDecoder:
    """A plain PicoDecoder (new module) computing the relora model's dropout-free function."""
    plain = PicoDecoder(model.config).to(next(model.parameters()).device)
    state = {k: v for k, v in effective_state_dict(model).items()
             if not k.endswith((".lora_A", ".lora_B"))}
    plain.load_state_dict(state)
    return plain
