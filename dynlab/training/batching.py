"""The global batch, split into per-process micro-batches and gradient accumulation.

With `global_batch_size` G (sequences per optimizer update, all processes and micro-batches
together), W processes and a per-process micro-batch m:

    grad_accum = G / (W · m),        batch_size (the global micro-batch) = W · m

so an update is W · m · grad_accum = G sequences whatever W is: the same config trains the
same model on 1 GPU, 16 GPUs or 4 nodes × 4 GPUs (pico-train's relation between BATCH_SIZE,
the number of devices and GRADIENT_ACCUMULATION_STEPS). m is `--micro-batch-size`; left out,
a CUDA run measures the largest m that fits (`probe_micro_batch`), and a CPU run takes
m = G / W (no accumulation).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dynlab.errors import InputError

#: fraction of a device's memory the probe lets a micro-batch's peak use (the rest is headroom
#: for the allocator's fragmentation, DDP buckets and evaluation)
PROBE_HEADROOM = 0.85


def split_global_batch(global_batch: int, world_size: int, micro: int | None = None
                       ) -> tuple[int, int]:
    """(micro-batch per process m, grad_accum) with W · m · grad_accum = global_batch.

    micro None: m = global_batch / W (no accumulation). Raises InputError naming the option
    when W does not divide the global batch or m does not divide the per-process share."""
    if global_batch % world_size:
        raise InputError(
            f"--global-batch-size {global_batch}: not divisible by the {world_size} processes "
            f"(each process takes global / processes sequences per update)")
    share = global_batch // world_size
    m = share if micro is None else micro
    if m < 1 or share % m:
        divisors = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if share % d == 0]
        raise InputError(
            f"--micro-batch-size {micro}: must divide the per-process share {share} of "
            f"--global-batch-size {global_batch} over {world_size} processes "
            f"(e.g. {', '.join(map(str, divisors[-4:]))})")
    return m, share // m


def apply_batch(cfg, world_size: int, micro: int | None = None):
    """cfg with batch_size and grad_accum derived from its global batch for W processes.

    A config without `global_batch_size` is returned unchanged (batch_size is then the global
    micro-batch and grad_accum the number of micro-batches per update)."""
    if cfg.global_batch_size is None:
        return cfg
    m, accum = split_global_batch(cfg.global_batch_size, world_size,
                                  micro if micro is not None else cfg.micro_batch_size)
    return dataclasses.replace(cfg, batch_size=m * world_size, grad_accum=accum)


def candidate_micro_batches(share: int) -> list[int]:
    """Divisors of the per-process share, largest first (the micro-batches the probe tries)."""
    return [d for d in range(share, 0, -1) if share % d == 0]


def probe_micro_batch(model: torch.nn.Module, seq_len: int, share: int, device: torch.device,
                      *, extra_bytes: int = 0, headroom: float = PROBE_HEADROOM) -> int:
    """The largest divisor m of `share` whose training forward + backward at (m, seq_len) peaks
    below headroom · the device's memory, counting `extra_bytes` not yet allocated (the AdamW
    state). Measured with torch.cuda.max_memory_allocated on random ids under bf16 autocast;
    parameters' .grad are cleared afterwards. CPU: `share` (nothing to probe)."""
    if device.type != "cuda":
        return share
    total = torch.cuda.get_device_properties(device).total_memory
    vocab = model.config.vocab_size
    was_training = model.training
    model.train()
    best = None
    with torch.random.fork_rng(devices=[device]):  # the training RNG streams stay untouched
        for m in candidate_micro_batches(share):
            peak = math.inf
            ids = logits = loss = None
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                ids = torch.randint(0, vocab, (m, seq_len + 1), device=device)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
                loss.backward()
                peak = torch.cuda.max_memory_allocated(device)
            except torch.cuda.OutOfMemoryError:
                pass
            finally:
                ids = logits = loss = None
                model.zero_grad(set_to_none=True)
            if peak + extra_bytes <= headroom * total:
                best = m
                break
    model.train(was_training)
    torch.cuda.empty_cache()
    if best is None:
        raise InputError(f"--micro-batch-size: not even 1 sequence of {seq_len} tokens fits "
                         f"on {device} ({total / 2**30:.1f} GiB); use a shorter --seq-len")
    return best


def agree_min(value: int, device: torch.device) -> int:
    """The minimum of `value` over all processes (itself without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
