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


def draw_dropout_seed() -> int:
    """One seed for a LoRA dropout mask, drawn from the global CPU generator (so the training
    RNG state, which checkpoints save and resume restores, fixes every mask)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Inverted-dropout mask m = 1[b ≥ round(p · 2³¹)] / (1 − p), b uniform on
    {0, …, 2³¹ − 1} (int32 `random_` from a generator seeded with `seed` on `device`):
    P(m = 0) = p to within 2⁻³², and the same (shape, p, seed, device, dtype) give the same
    mask. (Random bits and a threshold cost half of `bernoulli_` on CPUs without MKL.)"""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    bits = torch.empty(shape, device=device, dtype=torch.int32).random_(generator=gen)
    keep = bits >= round(p * 2**31)
    del bits
    return keep.to(dtype).div_(1.0 - p)


def _mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x's dropout mask, in float32 at least (1 / (1 − p) is not rounded to bf16/fp16)."""
    return dropout_mask(x.shape, p, seed, x.device, torch.promote_types(x.dtype, torch.float32))


class LoRABranch(torch.autograd.Function):
    """h = s · B (A (m ⊙ x)),  m = dropout_mask(x.shape, p, seed)  (m = 1 when p = 0).

    Saves for backward only x (an input the caller holds anyway), A, B and the rank-r
    intermediate u = A (m ⊙ x); the mask is regenerated from `seed` in backward, so no
    activation-sized dropout output or mask is kept. With g = ∂L/∂h:

        ∂L/∂B = s gᵀ u,   ∂L/∂u = s g B,   ∂L/∂A = (∂L/∂u)ᵀ (m ⊙ x),   ∂L/∂x = m ⊙ (∂L/∂u) A

    (token dimensions flattened). Under autocast (bf16 on CUDA) the forward matmuls run in
    the autocast dtype; backward casts its operands to that same dtype (the dtype of u), as
    autograd's matmul backward would, and returns gradients in the dtypes of x, A and B.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                p: float, seed: int) -> torch.Tensor:
        xd = x if p == 0.0 else _mask(x, p, seed).mul_(x).to(x.dtype)  # m ⊙ x, in m's memory
        u = F.linear(xd, lora_A)
        del xd  # freed here: only x, A, B and u outlive the forward
        ctx.save_for_backward(x, lora_A, lora_B, u)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        return F.linear(u, lora_B) * scale

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out: torch.Tensor):
        x, lora_A, lora_B, u = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        cd = u.dtype  # the forward matmuls' dtype (the autocast dtype under autocast)
        gs = (grad_out * ctx.scale).reshape(-1, grad_out.shape[-1]).to(cd)  # s g, (n, out)
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = (gs.t() @ u.reshape(-1, u.shape[-1])).to(lora_B.dtype)
        if need_x or need_A:  # in place where possible: at most two x-sized temporaries
            grad_u = gs @ lora_B.to(cd)  # (n, r)
            mask = None if ctx.p == 0.0 else _mask(x, ctx.p, ctx.seed)
            if need_x:
                grad_x = (grad_u @ lora_A.to(cd)).reshape(x.shape).to(x.dtype)
                if mask is not None:
                    grad_x.mul_(mask)
            if need_A:
                xd = x if mask is None else mask.mul_(x).to(x.dtype)  # the forward's m ⊙ x
                grad_A = (grad_u.t() @ xd.reshape(-1, x.shape[-1]).to(cd)).to(lora_A.dtype)
        return grad_x, grad_A, grad_B, None, None, None


class ReLoRALinear(nn.Module):
    """y = W x + s · B A dropout(x) with W frozen; A (r × in), B (out × r).

    The LoRA branch is `LoRABranch` (activation memory: x, shared with the frozen path, and
    the rank-r intermediate; the dropout mask is regenerated in backward). In training mode
    with dropout p > 0 each call draws one seed from the global CPU generator. Under
    torch.compile the branch is written with plain ops instead (same function; the masks
    come from the compiled graph's own RNG, as for any dropout under torch.compile)."""

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

    def effective_weight(self) -> torch.Tensor:
        """W_eff = W + s · B A (differentiable in A and B)."""
        return self.weight + self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # plain ops, so torch.compile traces one graph (a Generator inside LoRABranch
            # would break it at every module) and its partitioner chooses what to save
            lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        else:
            p = self.dropout.p if self.training else 0.0
            seed = draw_dropout_seed() if p > 0.0 else 0
            lora = LoRABranch.apply(x, self.lora_A, self.lora_B, self.scale, p, seed)
        return F.linear(x, self.weight) + lora

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
    """A plain PicoDecoder (new module) computing the relora model's dropout-free function.

    The global RNG is left as it was: the new module's initial values, overwritten at once,
    are drawn inside `torch.random.fork_rng`, so unwrapping (e.g. to evaluate during
    training) does not move the training run's dropout stream."""
    with torch.random.fork_rng(devices=[]):
        plain = PicoDecoder(model.config)
    plain = plain.to(next(model.parameters()).device)
    state = {k: v for k, v in effective_state_dict(model).items()
             if not k.endswith((".lora_A", ".lora_B"))}
    plain.load_state_dict(state)
    return plain
