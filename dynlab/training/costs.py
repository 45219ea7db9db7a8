"""What a training run costs, before it runs (`dynlab train ... --dry-run`).

Everything is computed from the resolved options and the model built on the meta device (no
memory, no data read, no network):

- parameters: total / trainable, embedding (`embedding_proj` + `de_embedding_proj`) /
  non-embedding;
- tokens: per update G · T (global batch G sequences of T = seq_len tokens), in total
  steps · G · T;
- model FLOPs per token (`flops_per_token`): 6N + 12·L·H·hd·T, where N counts the weights of
  every matrix multiplication (the non-embedding weights plus `de_embedding_proj`; the input
  embedding is a lookup) and 12·L·H·hd·T is the attention score and value products, forward
  and backward, at context T (PaLM, Chowdhery et al. 2022, appendix B). For ReLoRA the frozen
  weights get no weight gradient: 2F (forward) + 2F (backward to the activations) + 2N_train
  (weight gradients), with F the weights of the forward matmuls including the LoRA factors;
- memory per device (`memory_bytes`): float32 parameters, gradients and AdamW's two moments,
  DDP's gradient buckets (with more than one process), and activations at the micro-batch;
- wall-clock = total FLOPs / (devices · peak · MFU), GPU-hours = total FLOPs / (peak · MFU).
  The MFU is an assumption the user states (`--mfu`), not a measurement.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dynlab.errors import InputError

#: name -> (description, dense bf16 peak FLOP/s, memory in GiB), vendors' data sheets
GPUS: dict[str, tuple[str, float, float]] = {
    "h100": ("NVIDIA H100 SXM, bf16 dense", 989e12, 80),
    "h100-pcie": ("NVIDIA H100 PCIe, bf16 dense", 756e12, 80),
    "h200": ("NVIDIA H200 SXM, bf16 dense", 989e12, 141),
    "a100": ("NVIDIA A100 SXM 80 GB, bf16 dense", 312e12, 80),
    "a100-40gb": ("NVIDIA A100 40 GB, bf16 dense", 312e12, 40),
    "l40s": ("NVIDIA L40S, bf16 dense", 362e12, 48),
    "a10": ("NVIDIA A10, bf16 dense", 125e12, 24),
}
DEFAULT_GPU = "h100"
DEFAULT_MFU = 0.3
#: bytes of activations kept per layer, token and d_model unit under bf16 mixed precision
#: (Korthikanti et al. 2022, "Reducing activation recomputation", 34·s·b·h per layer, without
#: the 5·a·s/h attention-score term that fused attention does not store)
ACTIVATION_BYTES_PER_LAYER = 34
#: bytes per logit: the bf16 logits, their float32 copy and its gradient (2 + 4 + 4)
LOGIT_BYTES = 10
#: fraction of a device's memory a micro-batch may fill (as batching.PROBE_HEADROOM)
MEMORY_HEADROOM = 0.85


def gpu_spec(name: str) -> tuple[str, float, float]:
    """(description, peak FLOP/s, memory GiB) of a named GPU."""
    key = name.lower()
    if key not in GPUS:
        raise InputError(f"--gpu {name!r}: unknown; choose one of {', '.join(GPUS)}")
    return GPUS[key]


def meta_model(cfg, vocab_size: int) -> torch.nn.Module:
    """The run's model (wrapped for relora) built on the meta device: shapes, no memory."""
    from dynlab.model.pico_decoder import PicoDecoder
    from dynlab.model.relora import wrap_relora
    from dynlab.training.config import model_config, relora_config

    mcfg = model_config(cfg, vocab_size)
    with torch.device("meta"):
        model = PicoDecoder(mcfg)
        if cfg.kind == "relora":
            wrap_relora(model, relora_config(cfg))
    return model


EMBEDDINGS = ("embedding_proj.weight", "de_embedding_proj.weight")


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """total, trainable, embedding (the two vocabulary matrices), non_embedding."""
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    emb = sum(named[n].numel() for n in EMBEDDINGS if n in named)
    return {"total": total, "trainable": sum(p.numel() for p in named.values()
                                             if p.requires_grad),
            "embedding": emb, "non_embedding": total - emb}


def matmul_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(F, N_train): the weights of every matrix multiplication of a forward pass (2-D
    parameters other than the input embedding, LoRA factors included) and those of them that
    are trained."""
    f = t = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or name == "embedding_proj.weight":
            continue
        f += p.numel()
        t += p.numel() if p.requires_grad else 0
    return f, t


def flops_per_token(model: torch.nn.Module, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token: dense = 2F + 2F + 2·N_train (= 6N when every matmul weight is
    trained), attention = 12·L·H·hd·T (PaLM's convention, full T × T products)."""
    cfg = model.config
    f, t = matmul_parameters(model)
    dense = 4 * f + 2 * t
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return {"matmul_params": f, "trained_matmul_params": t, "dense": float(dense),
            "attention": float(attention), "total": float(dense + attention)}


def memory_bytes(counts: dict[str, int], mcfg, micro_batch: int, seq_len: int,
                 world_size: int) -> dict[str, float]:
    """Estimated peak bytes on one device: float32 parameters (4·total), gradients
    (4·trainable), AdamW moments (8·trainable), DDP buckets (4·trainable when W > 1), and
    activations 34·L·b·T·d + 10·b·T·V (see the module docstring)."""
    acts = (ACTIVATION_BYTES_PER_LAYER * mcfg.n_layers * micro_batch * seq_len * mcfg.d_model
            + LOGIT_BYTES * micro_batch * seq_len * mcfg.vocab_size)
    out = {"parameters": 4.0 * counts["total"], "gradients": 4.0 * counts["trainable"],
           "optimizer": 8.0 * counts["trainable"],
           "ddp_buckets": 4.0 * counts["trainable"] if world_size > 1 else 0.0,
           "activations": float(acts)}
    out["total"] = sum(out.values())
    return out


def vocab_for(cfg) -> tuple[int, str]:
    """The model's vocabulary for a preview, and where it comes from (no network)."""
    if cfg.model_vocab_size:
        return cfg.model_vocab_size, "--model-vocab-size"
    if cfg.tokenizer:
        p = Path(cfg.tokenizer).expanduser()
        if p.is_file() or (p / "tokenizer.json").is_file():
            from dynlab.data.tokenizer import load_tokenizer

            return load_tokenizer(p).get_vocab_size(), f"tokenizer {p}"
    return cfg.vocab_size, "the preset's vocab_size (the tokenizer decides at run time)"


def estimate(cfg, world_size: int = 1, gpu: str = DEFAULT_GPU, mfu: float = DEFAULT_MFU
             ) -> dict:
    """The cost of a resolved TrainConfig on `world_size` devices of a named GPU at an MFU."""
    from dynlab.training.batching import apply_batch, candidate_micro_batches

    if not 0 < mfu <= 1:
        raise InputError(f"--mfu {mfu}: expected a fraction in (0, 1]")
    desc, peak, mem_gib = gpu_spec(gpu)
    vocab, vocab_source = vocab_for(cfg)
    model = meta_model(cfg, vocab)
    counts = parameter_counts(model)
    mcfg = model.config
    if cfg.global_batch_size is not None:
        global_batch = cfg.global_batch_size
        share = global_batch // world_size if global_batch % world_size == 0 else None
        if share is None:
            apply_batch(cfg, world_size)  # raises the divisibility error
        micro = cfg.micro_batch_size
        micro_source = "--micro-batch-size"
        if micro is None:  # the largest divisor whose estimate fits (the run probes instead)
            micro_source = f"largest that fits {MEMORY_HEADROOM:.0%} of {mem_gib:g} GiB (est.)"
            micro = 1
            for m in candidate_micro_batches(share):
                if (memory_bytes(counts, mcfg, m, cfg.seq_len, world_size)["total"]
                        <= MEMORY_HEADROOM * mem_gib * 2**30):
                    micro = m
                    break
        cfg = apply_batch(cfg, world_size, micro)
    else:
        cfg = dataclasses.replace(cfg)
        global_batch = cfg.batch_size * cfg.grad_accum
        micro, micro_source = cfg.batch_size // max(1, world_size), "--batch-size / processes"
    tokens_per_step = global_batch * cfg.seq_len
    fpt = flops_per_token(model, cfg.seq_len)
    total_flops = fpt["total"] * tokens_per_step * cfg.steps
    gpu_seconds = total_flops / (peak * mfu)
    mem = memory_bytes(counts, mcfg, micro, cfg.seq_len, world_size)
    rows = data_rows(cfg.data)
    return {
        "data_rows": rows, "rows_needed": cfg.ld_batch_size + global_batch * cfg.steps,
        "kind": cfg.kind, "preset": cfg.preset, "model": mcfg.to_dict(),
        "vocab_size": vocab, "vocab_source": vocab_source, "parameters": counts,
        "steps": cfg.steps, "seq_len": cfg.seq_len, "global_batch": global_batch,
        "world_size": world_size, "micro_batch": micro, "micro_source": micro_source,
        "grad_accum": cfg.grad_accum, "tokens_per_step": tokens_per_step,
        "tokens_total": tokens_per_step * cfg.steps, "flops_per_token": fpt,
        "flops_total": total_flops, "memory": mem, "gpu": gpu.lower(), "gpu_description": desc,
        "gpu_peak_flops": peak, "gpu_memory_gib": mem_gib, "mfu": mfu,
        "gpu_hours": gpu_seconds / 3600.0, "wall_hours": gpu_seconds / 3600.0 / world_size,
        "fits": mem["total"] <= mem_gib * 2**30,
    }


def data_rows(spec: str) -> int | None:
    """Rows of a local pre-tokenised --data (file metadata only), else None."""
    from dynlab.data import pretokenized as P

    files = P.row_files(spec) if spec else None
    return None if files is None else P.LocalRows(files, spec).n_rows


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"),
                           (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def format_estimate(e: dict) -> list[str]:
    """The preview as lines of text."""
    p, f, m = e["parameters"], e["flops_per_token"], e["memory"]
    gib = 2.0 ** 30
    dense = "6N" if f["matmul_params"] == f["trained_matmul_params"] else "4F + 2N_train"
    lines = [
        f"{e['kind']} (preset {e['preset']}), vocabulary {e['vocab_size']:,} "
        f"({e['vocab_source']})",
        f"parameters   {p['total']:,} total ({p['total'] / 1e6:.2f} M), {p['trainable']:,} "
        f"trainable ({p['trainable'] / 1e6:.2f} M)",
        f"             {p['embedding']:,} embedding, {p['non_embedding']:,} non-embedding",
        f"batch        {e['global_batch']:,} sequences × {e['seq_len']:,} tokens per update = "
        f"{e['world_size']} device(s) × micro-batch {e['micro_batch']} ({e['micro_source']}) "
        f"× {e['grad_accum']} accumulation steps",
        f"tokens       {e['tokens_per_step']:,} per step, {e['tokens_total']:,} in "
        f"{e['steps']:,} steps ({e['tokens_total'] / 1e9:.1f} B)",
        *([f"data         {e['data_rows']:,} rows; the run reads {e['rows_needed']:,} "
            f"({e['rows_needed'] / e['data_rows']:.2f} passes over the data)"]
          if e.get("data_rows") else []),
        f"FLOPs/token  {_si(f['total'])} = {dense} ({_si(f['dense'])}, N = "
        f"{f['matmul_params']:,} matmul weights) + attention 12·L·H·hd·T ({_si(f['attention'])})",
        f"FLOPs        {_si(e['flops_total'])} in total",
        f"memory/dev   {m['total'] / gib:.1f} GiB: parameters {m['parameters'] / gib:.2f}, "
        f"gradients {m['gradients'] / gib:.2f}, AdamW {m['optimizer'] / gib:.2f}"
        + (f", DDP buckets {m['ddp_buckets'] / gib:.2f}" if m["ddp_buckets"] else "")
        + f", activations {m['activations'] / gib:.1f} (micro-batch {e['micro_batch']}) "
        f"of {e['gpu_memory_gib']:g} GiB" + ("" if e["fits"] else "  [does NOT fit]"),
        f"time         {e['gpu_hours']:,.1f} GPU-hours, {e['wall_hours']:,.2f} h wall-clock on "
        f"{e['world_size']} × {e['gpu_description']} ({_si(e['gpu_peak_flops'], 'FLOP/s')}) "
        f"at an assumed MFU of {e['mfu']:.0%}",
    ]
    return lines
