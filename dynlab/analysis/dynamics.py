"""Function-space dynamics of every checkpoint into the analysis store: the I/O edge of
`dynlab.function_space` (which holds the formulas).

Per checkpoint, on one fixed batch per run (the run's learning-dynamics batch, or
`--dynamics-data`):

    sharpness   top-k Hessian eigenvalues (Lanczos), Hutchinson trace ± standard error, Adam's
                preconditioned sharpness λ_max(P⁻¹H) and the threshold (2 + 2β₁)/((1 − β₁)·η)
    barrier     the loss along θ(α) = (1 − α)·θ_prev + α·θ between consecutive checkpoints and
                its barrier; pairs that straddle a ReLoRA merge-and-reset flagged
    gns         B_simple = tr(Σ)/|G|² from per-sequence gradients, whole model and per layer
    attention   attention entropy and sink score per head, sink rate and massive activations
                per layer

and, without any option, the update-to-weight ratio ‖ΔW‖_F/‖W_prev‖_F of every matrix from
the store's own `frobenius_norm` of `updates` and `weights` (`write_update_ratio`).

Store: the variables of `dynamics_variables`, chunked per (run, step) like every other, each
checkpoint's cells written and then its `dyn_analyzed` flag (per item), so a killed analysis
resumes where it stopped and two writers never share a chunk (the store lock is held by
`dynlab.analysis.analyze`). The batch and the probe seeds are in the `dynamics` attribute.
Deterministic: the same batch and seed give the same bits (CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dynlab.errors import InputError
from dynlab.faults import fault_point
from dynlab.function_space import attention as A
from dynlab.function_space import curvature as C
from dynlab.function_space import landscape as L
from dynlab.function_space import noise as N
from dynlab.function_space.updates import ratio_from_norms
from dynlab.runs.checkpoints import Checkpoint, Run

#: the --dynamics items, in the order of the store's `dynamics` coordinate
DYNAMICS: tuple[str, ...] = ("sharpness", "barrier", "gns", "attention")


def parse_dynamics(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'sharpness,gns' -> ('sharpness', 'gns'); 'all' -> every item; None/'' -> ()."""
    if spec is None:
        return ()
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if s]
    if items == ["all"]:
        return DYNAMICS
    bad = [s for s in items if s not in DYNAMICS]
    if bad:
        raise InputError(f"--dynamics: unknown {', '.join(map(repr, bad))}; expected a comma "
                         f"list of {', '.join(DYNAMICS)}, or all")
    return tuple(d for d in DYNAMICS if d in items)


@dataclass
class DynamicsOptions:
    """What the dynamics analysis computes, and on what.

    items: the --dynamics items. data: None (the run's learning-dynamics batch) or a .txt /
    .jsonl file or `default` (dynlab.analysis.activations.read_documents). n_seq × seq_len:
    the batch (cropped from the learning-dynamics batch); hessian_seq: its first sequences
    used for the Hessian (at most n_seq); k: Hessian eigenvalues; iters: Lanczos steps
    (default max(2k, 10)); probes: Hutchinson probes; alphas: points of the α grid; seed:
    of the probe vectors;
    layer_sharpness: also the top eigenvalue of each block's diagonal Hessian block (one
    Lanczos per block: n_layers times the cost of the whole-model top-k)."""

    items: tuple[str, ...] = DYNAMICS
    data: str | None = None
    n_seq: int = 8
    seq_len: int = 64
    hessian_seq: int = 4
    k: int = 4
    iters: int | None = None
    probes: int = 8
    alphas: int = 11
    seed: int = 0
    sink_eps: float = A.SINK_EPS
    layer_sharpness: bool = False
    extra: dict = field(default_factory=dict)

    def lanczos_iters(self) -> int:
        return int(self.iters or max(2 * self.k, 10))

    def check(self) -> DynamicsOptions:
        flags = {"n_seq": "--dynamics-batch", "seq_len": "--dynamics-seq-len",
                 "hessian_seq": "hessian_seq", "k": "--dynamics-k",
                 "probes": "--dynamics-probes"}
        for name, flag in flags.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{flag}: expected an integer ≥ 1, got {value!r}")
        if self.alphas < 2:
            raise InputError("--dynamics-alphas: the α grid needs at least 2 points")
        if "gns" in self.items and self.n_seq < 2:
            raise InputError("--dynamics-batch: the gradient noise scale needs ≥ 2 sequences")
        return self


# ----------------------------------------------------------------------------------------
# The pure part: one model, one batch


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on token ids (B, T + 1), in float32."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                           batch[:, 1:].reshape(-1))


def math_attention():
    """The context in which double backward works through `F.scaled_dot_product_attention`
    (its fused CPU/GPU kernels have no second derivative): the reference math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def sharpness(model: torch.nn.Module, batch: torch.Tensor, opt: DynamicsOptions,
              precond: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """hess_top (k,), hess_trace, hess_trace_se and, with a flat Adam preconditioner diagonal
    `precond` (dynlab.function_space.curvature.adam_preconditioner), precond_sharpness.
    Hessian-vector products in float32 on the model's device."""
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    dim = sum(p.numel() for p in params)
    device = params[0].device
    out: dict[str, np.ndarray] = {}
    with math_attention():
        mv = C.hvp_operator(lambda: lm_loss(model, batch.to(device)), params)
        top = C.lanczos(mv, dim, opt.k, opt.lanczos_iters(), seed=opt.seed, device=device)
        out["hess_top"] = top.eigenvalues.numpy()
        tr = C.hutchinson(mv, dim, opt.probes, seed=opt.seed + 1, device=device)
        out["hess_trace"], out["hess_trace_se"] = np.float64(tr.trace), np.float64(tr.stderr)
        if precond is not None:
            pm = C.preconditioned(mv, precond.to(device))
            ps = C.lanczos(pm, dim, 1, opt.lanczos_iters(), seed=opt.seed, device=device)
            out["precond_sharpness"] = np.float64(ps.eigenvalues[0])
        if opt.layer_sharpness:
            out["layer_hess_top"] = layer_sharpness(model, batch, opt)
    return out


def layer_sharpness(model: torch.nn.Module, batch: torch.Tensor, opt: DynamicsOptions
                    ) -> np.ndarray:
    """λ_max of each block's diagonal Hessian block ∂²L/∂θ_l² (the parameters of block l,
    every other parameter fixed), by Lanczos; (n_layers,)."""
    named = dict(model.named_parameters())
    device = next(model.parameters()).device
    out = []
    for prefix in block_prefixes(model):
        params = [p for n, p in named.items() if n.startswith(prefix)]
        mv = C.hvp_operator(lambda: lm_loss(model, batch.to(device)), params)
        res = C.lanczos(mv, sum(p.numel() for p in params), 1, opt.lanczos_iters(),
                        seed=opt.seed, device=device, dtype=params[0].dtype)
        out.append(float(res.eigenvalues[0]))
    return np.asarray(out)


def layer_groups(names: Sequence[str], prefixes: Sequence[str]) -> dict[str, list[str]]:
    """Parameter names of the whole model ('model') and of each block ('layers.<i>', the
    names starting with prefixes[i])."""
    groups = {"model": list(names)}
    for i, prefix in enumerate(prefixes):
        groups[f"layers.{i}"] = [n for n in names if n.startswith(prefix)]
    return groups


def gradient_noise(model: torch.nn.Module, batch: torch.Tensor, n_layers: int
                   ) -> dict[str, np.ndarray]:
    """B_simple, tr(Σ) and |G|² of the whole model (gns_*) and of each block
    (layer_gns_b_simple), from the gradients of each sequence of `batch` (B_small = 1
    sequence, B_big = all of them)."""
    named = [(n, p) for n, p in model.named_parameters()]
    device = named[0][1].device
    micro = []
    for row in batch:
        loss = lm_loss(model, row[None].to(device))
        grads = torch.autograd.grad(loss, [p for _, p in named])
        micro.append({n: g.detach() for (n, _), g in zip(named, grads, strict=True)})
    prefixes = block_prefixes(model)[:n_layers]
    groups = layer_groups([n for n, _ in named], prefixes)
    res = N.micro_batch_noise(micro, 1, groups)
    model_ns = res["model"]
    return {"gns_b_simple": np.float64(model_ns.b_simple),
            "gns_trace_sigma": np.float64(model_ns.trace_sigma),
            "gns_grad_sq": np.float64(model_ns.grad_sq),
            "layer_gns_b_simple": np.array([res[f"layers.{i}"].b_simple
                                            for i in range(len(prefixes))])}


@torch.no_grad()
def loss_at(model: torch.nn.Module, batch: torch.Tensor,
            params: Mapping[str, torch.Tensor]) -> float:
    """The loss of `model` with its parameters replaced by `params` (functional call)."""
    from torch.func import functional_call

    device = next(model.parameters()).device
    moved = {n: t.to(device) for n, t in params.items()}
    return float(functional_call(model, moved, (batch[:, :-1].to(device),)).float()
                 .log_softmax(-1).gather(-1, batch[:, 1:, None].to(device)).neg().mean())


def line(model: torch.nn.Module, batch: torch.Tensor, a: Mapping[str, torch.Tensor],
         b: Mapping[str, torch.Tensor], n_alpha: int) -> dict[str, np.ndarray]:
    """line_loss (alpha,) along θ(α) from a to b and its barrier."""
    alphas = L.alpha_grid(n_alpha)
    losses = L.line_losses(lambda p: loss_at(model, batch, p), a, b, alphas)
    return {"line_loss": losses, "barrier": np.float64(L.barrier(losses, alphas))}


def attention_stats(model: torch.nn.Module, batch: torch.Tensor, eps: float
                    ) -> dict[str, np.ndarray]:
    """attn_entropy, sink_score (layer, head), sink_rate, massive_ratio, massive_max (layer):
    a PicoDecoder's weights recomputed from its projections, a transformers model's own
    output_attentions (eager attention, switched on for the call)."""
    hf = hf_inner(model)
    if hf is None:
        res = A.pico_attention_stats(model, batch[:, :-1], eps=eps)
    else:
        before = hf.config._attn_implementation
        hf.config._attn_implementation = "eager"
        try:
            res = A.hf_attention_stats(hf, batch[:, :-1], eps=eps)
        finally:
            hf.config._attn_implementation = before
    return {k: v.numpy() for k, v in res.items()}


# ----------------------------------------------------------------------------------------
# Store variables


def dynamics_variables(k: int, n_alpha: int) -> dict[str, tuple[tuple[str, ...], str, str]]:
    """Variable -> (dims, item, long name)."""
    rs = ("run", "step")
    return {
        "dyn_loss": (rs, "", "mean next-token loss on the dynamics batch"),
        "hess_top": (rs + ("hess_k",), "sharpness", "top eigenvalues of the loss Hessian, "
                     "descending (Lanczos on Hessian-vector products)"),
        "layer_hess_top": (rs + ("layer",), "sharpness", "top eigenvalue of each block's "
                           "diagonal Hessian block (with layer_sharpness)"),
        "hess_trace": (rs, "sharpness", "trace of the loss Hessian (Hutchinson, Rademacher "
                       "probes)"),
        "hess_trace_se": (rs, "sharpness", "standard error of hess_trace"),
        "precond_sharpness": (rs, "sharpness", "largest eigenvalue of P⁻¹H, P Adam's "
                              "preconditioner (1 − β₁^(t+1))·(√v̂ + ε) (Cohen et al. 2022)"),
        "eos_threshold": (rs, "sharpness", "adaptive edge-of-stability threshold "
                          "(2 + 2β₁)/((1 − β₁)·η) of the checkpoint's learning rate"),
        "line_loss": (rs + ("line_alpha",), "barrier", "loss along (1 − α)·θ_prev + α·θ from the "
                      "previous checkpoint (α = 0) to this one (α = 1)"),
        "barrier": (rs, "barrier", "max_α L(θ(α)) − ((1 − α)·L_prev + α·L) on the α grid"),
        "barrier_prev_step": (rs, "barrier", "the step the line starts from (−1: none)"),
        "reset_pair": (rs, "barrier", "1 when a ReLoRA merge-and-reset lies between the "
                       "previous checkpoint and this one"),
        "gns_b_simple": (rs, "gns", "gradient noise scale B_simple = tr(Σ)/|G|², in sequences "
                         "(McCandlish et al. 2018)"),
        "gns_trace_sigma": (rs, "gns", "tr(Σ): per-sequence gradient covariance trace"),
        "gns_grad_sq": (rs, "gns", "|G|²: squared norm of the true gradient (unbiased)"),
        "layer_gns_b_simple": (rs + ("layer",), "gns", "B_simple of each block's parameters"),
        "train_batch_size": (rs, "gns", "sequences per update the run trained with"),
        "attn_entropy": (rs + ("layer", "head"), "attention", "mean attention entropy (nats) "
                         "over query positions ≥ 1"),
        "sink_score": (rs + ("layer", "head"), "attention", "mean attention to the first token "
                       "over query positions ≥ 1"),
        "sink_rate": (rs + ("layer",), "attention", "share of heads with sink_score > ε "
                      "(Gu et al. 2024)"),
        "massive_ratio": (rs + ("layer",), "attention", "max |h| / median |h| of the residual "
                          "stream after the block (Sun et al. 2024)"),
        "massive_max": (rs + ("layer",), "attention", "max |h| of the residual stream after "
                        "the block"),
        "dyn_analyzed": (rs + ("dynamics",), "", "1 once the dynamics item of a checkpoint is "
                         "written"),
    }


UPDATE_RATIO = ("update_ratio", ("run", "step", "layer", "matrix"),
                "‖W − W_prev‖_F / ‖W_prev‖_F between consecutive checkpoints (from "
                "frobenius_norm of updates and weights)")

INT_VARIABLES = {"dyn_analyzed": 0, "reset_pair": 0, "barrier_prev_step": -1}


def ensure_dynamics_store(path: Path, opt: DynamicsOptions) -> None:
    """Create the dynamics variables (and the hess_k, line_alpha, dynamics coordinates) in an
    analysis store; a store made with another k or α grid is refused."""
    from dynlab.analysis import store as S

    group = S.open_group_for_update(path)
    alphas = L.alpha_grid(opt.alphas)
    if "dynamics" in group:
        if group["hess_k"].shape[0] != opt.k or group["line_alpha"].shape != alphas.shape or \
                not np.allclose(group["line_alpha"][...], alphas):
            raise S.StoreError(f"{path}: its dynamics were computed with k = "
                               f"{group['hess_k'].shape[0]} and {group['line_alpha'].shape[0]} α "
                               f"points, not k = {opt.k} and {opt.alphas}; use another -o or "
                               "the same --dynamics-k / --dynamics-alphas")
        return
    sizes = {"run": group["run"].shape[0], "step": group["step"].shape[0],
             "layer": group["layer"].shape[0], "head": group["head"].shape[0],
             "hess_k": opt.k, "line_alpha": opt.alphas, "dynamics": len(DYNAMICS)}
    with S.quiet_zarr():  # the `dynamics` coordinate last: it marks the set complete
        for name, values in (("hess_k", np.arange(opt.k)), ("line_alpha", alphas)):
            if name not in group:  # (one an interrupted creation made is kept)
                S.create_variable(group, name, (name,), values)
        for name, (dims, _, long_name) in dynamics_variables(opt.k, opt.alphas).items():
            if name in group:
                continue
            shape = tuple(sizes[d] for d in dims)
            chunks = tuple(1 if d in ("run", "step") else sizes[d] for d in dims)
            fill = INT_VARIABLES.get(name)
            S.create_variable(group, name, dims, shape=shape, chunks=chunks,
                              dtype="float64" if fill is None else "int64" if fill < 0
                              else "int8", fill_value=np.nan if fill is None else fill,
                              attrs={"long_name": long_name})
        S.create_variable(group, "dynamics", ("dynamics",),
                          S.string_coordinate(DYNAMICS, "dynamics"))
    S.consolidate(path)


# ----------------------------------------------------------------------------------------
# Sources: a runnable model and the batch


def source_reader(ckpt: Checkpoint):
    from dynlab.analysis.activations import source_reader as reader

    return reader(ckpt)


def runnable_model(run: Run, ckpt: Checkpoint, device: str) -> torch.nn.Module:
    """A float32 model computing the checkpoint's function (dynlab.sources.models: dynlab's
    PicoDecoder for dynlab, pico-train and relora-pico runs, with a relora run's effective
    weights; transformers' own class for Hugging Face checkpoints, wrapped as forward(ids) ->
    logits). A source without a runnable model: InputError naming it."""
    from dynlab.sources import release
    from dynlab.sources.models import load_causal_lm

    try:
        lm = load_causal_lm(run, ckpt, device=device, dtype=torch.float32,
                            need_tokenizer=False, what="--dynamics")
    finally:
        if source_reader(ckpt) is not None:
            release(run, ckpt)
    return lm.model


def block_prefixes(model: torch.nn.Module) -> list[str]:
    """The parameter-name prefix of each transformer block ('layers.3.' for a PicoDecoder,
    'hf.model.layers.3.' for a wrapped transformers Llama): the longest ModuleList."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    name, blocks = max(lists, key=lambda nm: len(nm[1]))
    return [f"{name}.{i}." for i in range(len(blocks))]


def hf_inner(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model inside a dynlab.sources.models.HFLogits wrapper, or None."""
    return getattr(model, "hf", None)


def learning_dynamics_batch(run: Run) -> torch.Tensor:
    """The run's fixed learning-dynamics batch: RUN/ld_batch.safetensors (written by the trainer
    at the start of a run), else `batch_tokens` of a checkpoint's saved activations."""
    from dynlab.runs.files import read_ld_batch

    batch = read_ld_batch(run.path)
    if batch is not None:
        return batch
    for ckpt in run.checkpoints:
        if ckpt.has("activations.safetensors"):
            from safetensors import safe_open

            with safe_open(str(ckpt.file("activations.safetensors")), "pt") as f:
                if "batch_tokens" in f.keys():
                    return f.get_tensor("batch_tokens").to(torch.long)
    raise InputError(f"--dynamics: {run.path} holds no learning-dynamics batch (neither "
                     "ld_batch.safetensors, which dynlab's trainer writes at the start of a run, "
                     "nor saved activations with batch_tokens); pass --dynamics-data")


def dynamics_batch(run: Run, opt: DynamicsOptions) -> torch.Tensor:
    """(n_seq, seq_len + 1) token ids: the first sequences and tokens of the learning-dynamics
    batch, or of `opt.data` in the run's tokenizer."""
    if source_reader(run.checkpoints[0]) is not None:
        full = source_batch(run, opt)
    elif opt.data is None:
        full = learning_dynamics_batch(run)
    else:
        from dynlab.analysis.activations import data_batch

        full = data_batch(run, opt.data, opt.n_seq, opt.seq_len)
    if full.shape[0] < opt.n_seq or full.shape[1] < 2:
        raise InputError(f"--dynamics-batch {opt.n_seq}: {run.name}'s batch has only "
                         f"{full.shape[0]} sequences")
    return full[: opt.n_seq, : opt.seq_len + 1].clone()


def source_batch(run: Run, opt: DynamicsOptions) -> torch.Tensor:
    """The batch of a pico-train, relora-pico or Hugging Face run: `opt.data` in the first
    checkpoint's own tokenizer (dynlab.sources.models), documents joined as
    [bos] doc_1 [bos] doc_2 …; InputError without --dynamics-data or a tokenizer."""
    from dynlab.analysis.activations import read_documents
    from dynlab.sources import release
    from dynlab.sources.models import load_causal_lm

    if opt.data is None:
        raise InputError(f"--dynamics: {run.name} has no learning-dynamics batch dynlab can "
                         "read; pass --dynamics-data (a .txt/.jsonl file or 'default')")
    ckpt = run.checkpoints[0]
    try:
        lm = load_causal_lm(run, ckpt, what="--dynamics-data")
    finally:
        release(run, ckpt)
    sep = lm.bos_id
    if sep is None:
        raise InputError(f"--dynamics-data: {run.name}'s tokenizer has no document-start token")
    need = opt.n_seq * (opt.seq_len + 1)
    ids: list[int] = []
    for doc in read_documents(opt.data):
        ids += [sep] + list(lm.tokenizer.encode([doc])[0])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise InputError(f"--dynamics-data {opt.data}: {len(ids)} tokens in {run.name}'s "
                         f"tokenizer, fewer than {opt.n_seq} windows of {opt.seq_len + 1}")
    return torch.tensor(ids[:need], dtype=torch.long).view(opt.n_seq, opt.seq_len + 1)


def batch_record(batch: torch.Tensor, source: str) -> dict:
    """What the `dynamics` attribute records of a run's batch: its source, shape, SHA-256 of
    its int64 ids and, up to 4096 ids, the ids themselves."""
    ids = batch.to(torch.int64).contiguous().numpy()
    rec = {"source": source, "shape": list(ids.shape),
           "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
    if ids.size <= 4096:
        rec["tokens"] = ids.tolist()
    return rec


def adam_state(run: Run, ckpt: Checkpoint, model: torch.nn.Module
               ) -> tuple[torch.Tensor | None, float]:
    """(flat P diagonal in model.parameters() order, β₁) from a dynlab decoder checkpoint's
    trainer_state.pt, or (None, β₁) when the run is not a plain decoder (ReLoRA's optimizer
    holds the factors, not the weights), the state is absent, or no update was made yet."""
    if source_reader(ckpt) is not None or run.config.get("kind") != "decoder" \
            or not ckpt.has("trainer_state.pt"):
        return None, 0.9
    from dynlab.runs.files import read_trainer_state

    opt_state = read_trainer_state(ckpt.path)["optimizer"]
    group = opt_state["param_groups"][0]
    betas = tuple(float(b) for b in group.get("betas", (0.9, 0.999)))
    params = list(model.parameters())
    state = opt_state["state"]
    if len(group["params"]) != len(params) or not all(i in state for i in group["params"]):
        return None, betas[0]
    parts = []
    for idx, p in zip(group["params"], params, strict=True):
        st = state[idx]
        if tuple(st["exp_avg_sq"].shape) != tuple(p.shape):
            return None, betas[0]
        parts.append(C.adam_preconditioner(st["exp_avg_sq"], int(float(st["step"])), betas,
                                           float(group.get("eps", 1e-8))).reshape(-1))
    return torch.cat(parts), betas[0]


def reset_between(run: Run, prev: int, step: int) -> bool:
    """Whether a ReLoRA merge-and-reset happened between checkpoints prev and step (a reset
    after update r runs after checkpoint r is written: prev ≤ r < step)."""
    relora = run.config.get("relora") if isinstance(run.config, Mapping) else None
    resets = (relora or {}).get("reset_steps") or []
    return any(prev <= int(r) < step for r in resets)


def train_batch_size(run: Run) -> float:
    train = run.config.get("train", {}) if isinstance(run.config, Mapping) else {}
    try:
        return float(train.get("global_batch_size") or int(train["batch_size"])
                     * int(train.get("grad_accum") or 1))
    except (KeyError, TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------------------
# The driver


def checkpoint_dynamics(run: Run, ckpt: Checkpoint, prev: Checkpoint | None,
                        batch: torch.Tensor, items: Sequence[str], opt: DynamicsOptions,
                        model_of: Callable[[Checkpoint], torch.nn.Module],
                        n_layers: int) -> dict[str, np.ndarray]:
    """Every requested item of one checkpoint, as arrays shaped as its store cells."""
    model = model_of(ckpt)
    with torch.no_grad():
        out: dict[str, np.ndarray] = {"dyn_loss": np.float64(float(lm_loss(model, batch)))}
    if "sharpness" in items:
        precond, beta1 = adam_state(run, ckpt, model)
        out.update(sharpness(model, batch[: opt.hessian_seq], opt, precond))
        lr = ckpt.meta().get("lr")
        out["eos_threshold"] = np.float64(C.adaptive_eos_threshold(
            float(lr) if isinstance(lr, (int, float)) else math.nan, beta1))
    if "gns" in items:
        out.update(gradient_noise(model, batch, n_layers))
        out["train_batch_size"] = np.float64(train_batch_size(run))
    if "attention" in items:
        out.update(attention_stats(model, batch, opt.sink_eps))
    if "barrier" in items:
        if prev is None:
            out["barrier_prev_step"] = np.int64(-1)
        else:
            a = dict(model_of(prev).state_dict())
            b = dict(model.state_dict())
            out.update(line(model, batch, a, b, opt.alphas))
            out["barrier_prev_step"] = np.int64(prev.step)
            out["reset_pair"] = np.int8(reset_between(run, prev.step, ckpt.step))
    return out


def pad(value: np.ndarray, shape: tuple[int, ...], fill: float) -> np.ndarray:
    """A result smaller than the store's cell (a run with fewer layers) padded with fill."""
    arr = np.asarray(value)
    if arr.shape == shape:
        return arr
    out = np.full(shape, fill, dtype=np.float64 if arr.dtype.kind == "f" else arr.dtype)
    out[tuple(slice(0, n) for n in arr.shape)] = arr
    return out


def prepare_dynamics(runs: Sequence[Run], opt: DynamicsOptions) -> dict[str, torch.Tensor]:
    """Check, before anything is written, that every run has a runnable model and a batch;
    returns each run's batch (InputError naming what is missing)."""
    opt.check()
    for run in runs:
        runnable_model(run, run.checkpoints[0], "cpu")
    return {run.name: dynamics_batch(run, opt) for run in runs}


def analyze_dynamics(runs: Sequence[Run], path: Path, opt: DynamicsOptions, *,
                     device: str = "cpu", progress: bool = False,
                     need: Callable[[str], None] | None = None,
                     batches: Mapping[str, torch.Tensor] | None = None,
                     steps: Mapping[str, Sequence[int]] | None = None) -> int:
    """The function-space dynamics of every checkpoint of `runs` (only the selected `steps`
    where given: run -> steps) into the store at `path` (made by dynlab analyze for these runs,
    whose lock the caller holds). Resumable: (run, step, item) cells already flagged are
    skipped; a barrier is always taken against the previous checkpoint on disk. `need(what)`
    is called before the first write (it raises where the store is read-only). Returns the
    checkpoints written."""
    from dynlab.analysis import store as S
    from dynlab.analysis.progress import Progress

    items = tuple(opt.items)
    if not items:
        return 0
    batches = batches if batches is not None else prepare_dynamics(runs, opt)
    need = need or (lambda what: None)
    if "dynamics" not in S.open_group_for_update(path):
        need("create the dynamics variables")
    ensure_dynamics_store(path, opt)
    group = S.open_group_for_update(path)
    stored = group.attrs.get("dynamics", "{}") or "{}"
    record = json.loads(stored)
    settings = {k: v for k, v in asdict(opt).items() if k not in ("items", "extra")}
    settings["probes_seeds"] = {"lanczos_start": f"Gaussian, torch.Generator seed {opt.seed}",
                                "hutchinson": f"Rademacher, torch.Generator seed {opt.seed + 1}"}
    for run in runs:
        rec = batch_record(batches[run.name], opt.data or "learning-dynamics batch")
        old = record.get("runs", {}).get(run.name)
        if old is not None and old.get("sha256") != rec["sha256"]:
            raise S.StoreError(f"{path}: {run.name}'s dynamics were computed on another batch "
                               f"({old.get('source')}); use another -o or the same data")
        record.setdefault("runs", {})[run.name] = rec
    old_settings = record.get("settings")
    if old_settings is not None and {k: old_settings.get(k) for k in settings
                                     if k not in ("data",)} != {k: v for k, v in settings.items()
                                                               if k not in ("data",)}:
        raise S.StoreError(f"{path}: its dynamics were computed with other settings "
                           f"({old_settings}); use another -o or the same options")
    record["settings"] = settings
    if json.dumps(record) != stored:
        need("record the dynamics batch")
        group.attrs.update({"dynamics": json.dumps(record)})
    run_index = {str(r): i for i, r in enumerate(group["run"][...])}
    step_index = {int(s): j for j, s in enumerate(group["step"][...])}
    item_index = {str(d): k for k, d in enumerate(group["dynamics"][...])}
    done = np.asarray(group["dyn_analyzed"][...])
    pair_prev = np.asarray(group["barrier_prev_step"][...])
    specs = dynamics_variables(opt.k, opt.alphas)
    todo = []
    for run in runs:
        i = run_index[run.name]
        chosen = None if steps is None else set(steps.get(run.name, ()))
        for n, ckpt in enumerate(run.checkpoints):
            if chosen is not None and ckpt.step not in chosen:
                continue
            j = step_index[ckpt.step]
            # a barrier taken against another previous checkpoint (one that completed later
            # was sorted in between) is stale: computed again
            expected = run.checkpoints[n - 1].step if n else -1
            wanted = [d for d in items if not done[i, j, item_index[d]] or
                      (d == "barrier" and int(pair_prev[i, j]) != expected)]
            if wanted:
                todo.append((run, ckpt, run.checkpoints[n - 1] if n else None, wanted))
    if todo:
        need(f"write the dynamics of {len(todo)} checkpoints")
    models: dict[Path, torch.nn.Module] = {}

    def model_of(ckpt: Checkpoint) -> torch.nn.Module:
        if ckpt.path not in models:
            if len(models) > 1:
                models.pop(next(iter(models)))
            run = next(r for r in runs if ckpt in r.checkpoints)
            models[ckpt.path] = runnable_model(run, ckpt, device)
        return models[ckpt.path]

    written = 0
    with Progress(progress, len(todo)) as advance:
        for run, ckpt, prev, wanted in todo:
            i, j = run_index[run.name], step_index[ckpt.step]
            try:
                values = checkpoint_dynamics(run, ckpt, prev, batches[run.name], wanted, opt,
                                             model_of, run.spec.n_layers)
            except (torch.OutOfMemoryError, MemoryError) as err:
                raise InputError(f"--dynamics: {ckpt.path}: the batch of {opt.n_seq} × "
                                 f"{opt.seq_len} tokens (Hessian on {opt.hessian_seq}) does not "
                                 f"fit in memory on {device} ({type(err).__name__}); lower "
                                 "--dynamics-batch / --dynamics-seq-len. The store keeps every "
                                 "checkpoint written so far") from None
            for name, value in values.items():
                dims = specs[name][0]
                arr = group[name]
                cell = tuple(arr.shape[len(("run", "step")):]) if len(dims) > 2 else ()
                fill = INT_VARIABLES.get(name, np.nan)
                group[name][i, j] = pad(value, cell, fill) if cell else value
            fault_point("dynamics.write")  # cells written, flags not yet
            for d in wanted:
                group["dyn_analyzed"][i, j, item_index[d]] = 1
            written += 1
            advance(f"dynamics {run.name} step {ckpt.step}")
    if todo:
        S.consolidate(path)
    return written


def write_update_ratio(path: Path, runs: Sequence[str] | None = None) -> bool:
    """update_ratio (run, step, layer, matrix) = frobenius_norm(updates, step) /
    frobenius_norm(weights, prev_step) from the store itself, for the analysed cells of
    `runs` (default all); False (nothing written) when the store lacks frobenius_norm of
    weights or updates. Unchanged cells are not rewritten (a read-only complete store stays
    untouched)."""
    from dynlab.analysis import store as S

    group = S.open_group_for_update(path)
    if "frobenius_norm" not in group:
        return False
    kinds = [str(k) for k in group["kind"][...]]
    if "weights" not in kinds or "updates" not in kinds:
        return False
    name, dims, long_name = UPDATE_RATIO
    fro = group["frobenius_norm"]
    if name not in group:
        shape = tuple(fro.shape[d] for d in (0, 2, 3, 4))
        with S.quiet_zarr():
            S.create_variable(group, name, dims, shape=shape,
                              chunks=(1, 1) + shape[2:], attrs={"long_name": long_name})
        S.consolidate(path)
        group = S.open_group_for_update(path)
    arr = group[name]
    kw, ku = kinds.index("weights"), kinds.index("updates")
    steps = [int(s) for s in group["step"][...]]
    where = {s: j for j, s in enumerate(steps)}
    prev = np.asarray(group["prev_step"][...])
    analyzed = np.asarray(group["analyzed"][...])
    names = [str(r) for r in group["run"][...]]
    for i, run in enumerate(names):
        if runs is not None and run not in runs:
            continue
        for j in range(len(steps)):
            p = int(prev[i, j])
            if not analyzed[i, j] or p < 0 or p not in where:
                continue
            new = ratio_from_norms(fro[i, ku, j], fro[i, kw, where[p]])
            old = np.asarray(arr[i, j])
            if not np.array_equal(old, new, equal_nan=True):
                arr[i, j] = new
    return True


# ----------------------------------------------------------------------------------------
# The line between two runs at one step each (--between RUN@STEP,RUN@STEP)


def parse_between(spec: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """'a@100,b@100' -> (('a', 100), ('b', 100)); InputError otherwise."""
    parts = [p.strip() for p in str(spec).split(",")]
    out = []
    for part in parts:
        name, _, step = part.rpartition("@")
        if not name or not step.isdigit():
            break
        out.append((name, int(step)))
    if len(parts) != 2 or len(out) != 2:
        raise InputError(f"--between: expected RUN@STEP,RUN@STEP, got {spec!r}")
    return out[0], out[1]


def analyze_between(runs: Sequence[Run], path: Path, spec: str, opt: DynamicsOptions, *,
                    device: str = "cpu", need: Callable[[str], None] | None = None) -> bool:
    """The loss along the straight line from RUN_A@STEP_A (α = 0) to RUN_B@STEP_B (α = 1) on
    RUN_A's batch, and its barrier, into `between_loss` (between, line_alpha) and
    `between_barrier` (between), the `between` coordinate naming the pair as given. The two
    checkpoints must hold parameters of the same names and shapes. Skipped (False) when the
    store holds the pair already."""
    from dynlab.analysis import store as S

    (ra, sa), (rb, sb) = parse_between(spec)
    by_name = {r.name: r for r in runs}
    ends = []
    for name, step in ((ra, sa), (rb, sb)):
        run = by_name.get(name)
        if run is None:
            raise InputError(f"--between {spec}: run {name!r} is not among the analysed runs "
                             f"({', '.join(by_name)})")
        found = [c for c in run.checkpoints if c.step == step]
        if not found:
            raise InputError(f"--between {spec}: {name} has no complete checkpoint at step "
                             f"{step}")
        ends.append((run, found[0]))
    label = f"{ra}@{sa},{rb}@{sb}"
    need = need or (lambda what: None)
    ensure_dynamics_store(path, opt)
    group = S.open_group_for_update(path)
    if "between" in group and label in [str(v) for v in group["between"][...]]:
        k = [str(v) for v in group["between"][...]].index(label)
        if np.isfinite(np.asarray(group["between_barrier"][k])):
            return False
    need(f"write the line {label}")
    if "between" not in group:
        with S.quiet_zarr():
            S.create_variable(group, "between_loss", ("between", "line_alpha"),
                              shape=(0, opt.alphas), chunks=(1, opt.alphas),
                              attrs={"long_name": "loss along (1 − α)·θ_A + α·θ_B between "
                                     "two runs' checkpoints (RUN@STEP,RUN@STEP)"})
            S.create_variable(group, "between_barrier", ("between",), shape=(0,), chunks=(1,),
                              attrs={"long_name": "barrier of the line between_loss"})
            S.create_variable(group, "between", ("between",),
                              S.string_coordinate([], "between"), chunks=(1024,))
        S.consolidate(path)
        group = S.open_group_for_update(path)
    labels = [str(v) for v in group["between"][...]]
    if label not in labels:
        S.grow_dimension(path, "between", S.string_coordinate([label], "between"))
        group = S.open_group_for_update(path)
        labels.append(label)
    k = labels.index(label)
    (run_a, ck_a), (run_b, ck_b) = ends
    model = runnable_model(run_a, ck_a, device)
    other = runnable_model(run_b, ck_b, device)
    a, b = dict(model.state_dict()), dict(other.state_dict())
    if {n: tuple(t.shape) for n, t in a.items()} != {n: tuple(t.shape) for n, t in b.items()}:
        raise InputError(f"--between {spec}: the two checkpoints have different parameters "
                         "(not one architecture and shape)")
    res = line(model, dynamics_batch(run_a, opt), a, b, opt.alphas)
    group["between_loss"][k] = res["line_loss"]
    group["between_barrier"][k] = res["barrier"]
    S.consolidate(path)
    return True
