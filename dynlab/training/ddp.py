"""Multi-process training: torchrun + PyTorch's DistributedDataParallel.

    torchrun --nproc_per_node 2 -m dynlab train relora --batch-size 16 ...
    dynlab train relora --nproc 2 --batch-size 16 ...     # launches the line above

Every process runs the whole trainer; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) gives it its place, and the trainer joins the process group
(gloo on CPU, nccl on CUDA, one GPU per process: cuda:LOCAL_RANK). The rules:

- `--batch-size` is the GLOBAL micro-batch. Each of W processes trains on batch_size / W
  sequences (an error when W does not divide it): rank r takes samples r, r + W, ... of the
  draw a single process makes. One update is batch_size · grad_accum sequences whatever W,
  so the same command trains the same model with 1 or N processes.
- DDP averages the gradients (micro-batches before the last skip the all-reduce via
  `no_sync`); the logged loss is the mean over ranks, i.e. the single-process loss.
- Rank 0 writes run.json, tokenizer.json, metrics.jsonl and the checkpoints, and computes
  the learning-dynamics gradient and the evaluation on the whole fixed batch, exactly as a
  single process does; the other ranks wait at their next collective.
- Randomness: initialisation is seeded identically on every rank (and DDP broadcasts rank 0's
  parameters at start); rank 0 keeps the single-process RNG stream, rank r > 0 reseeds with
  `rank_seed` so LoRA dropout masks are independent across ranks. State that changes outside
  the gradient, a ReLoRA reset's merged W, re-initialised A, zeroed B and pruned Adam moments,
  is computed on every rank and then broadcast from rank 0 (`relora_reset`), so every rank
  holds bitwise the same parameters and optimizer state; each checkpoint verifies it
  (`out_of_step`, recorded as meta.json["ranks_in_step"]). Decoder runs, and relora runs
  with --lora-dropout 0, therefore match a single process to float rounding (loss curve,
  weights and gradients within 1e-5: tests/test_ddp.py); with LoRA dropout the masks are
  drawn per rank, so such a run matches one process in distribution, not draw for draw.
- Resume: every rank loads the same checkpoint; the data position counts global samples and
  the RNG state of every rank is saved, so a run resumes under the same or a different W.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dynlab.model.relora import ReLoRAConfig, lora_parameters, merge_and_reset, relora_modules

TIMEOUT = datetime.timedelta(minutes=30)  # rank 0 alone evaluates / writes checkpoints
MOMENTS = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------- process group


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world_size) of this process: the process group's, else torchrun's environment,
    else (0, 1)."""
    if initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def check_batch_size(batch_size: int, world_size: int) -> int:
    """Per-process micro-batch = batch_size / world_size; ValueError when not divisible."""
    if batch_size % world_size:
        raise ValueError(
            f"--batch-size {batch_size}: not divisible by the {world_size} processes; it is the "
            f"global micro-batch, split evenly across processes (try "
            f"{max(world_size, batch_size // world_size * world_size)})"
        )
    return batch_size // world_size


def process_device(device: torch.device, world_size: int) -> torch.device:
    """With several processes on CUDA, process r uses cuda:LOCAL_RANK."""
    if world_size == 1 or device.type != "cuda":
        return device
    lr = local_rank()
    if device.index is not None and device.index != lr:
        raise ValueError(f"--device {device}: with {world_size} processes each uses "
                         "cuda:LOCAL_RANK; pass --device cuda")
    if lr >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {lr}: only {torch.cuda.device_count()} CUDA devices here "
                         "(one process per GPU)")
    return torch.device("cuda", lr)


def backend(device: torch.device) -> str:
    """nccl for CUDA, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Join torchrun's process group when WORLD_SIZE > 1 (and none exists yet); yields
    (rank, world_size) and destroys the group on exit if it created it."""
    rank, size = world()
    owned = size > 1 and not initialized()
    if size > 1 and device.type == "cuda":
        torch.cuda.set_device(device)  # nccl collectives use the current device
    if owned:
        dist.init_process_group(backend(device), init_method="env://", rank=rank,
                                world_size=size, timeout=TIMEOUT)
    try:
        yield world()
    finally:
        if owned and initialized():
            # a DistributedDataParallel model kept alive by a reference cycle (the trainer's
            # closures) must die while its group exists: destroyed later, at interpreter exit,
            # its reducer finds the group gone and the process aborts ("terminate called
            # without an active exception") after a complete run
            gc.collect()
            dist.destroy_process_group()


def barrier() -> None:
    if initialized():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model. Its only buffers (RoPE tables) are
    constants, so they are not re-broadcast before each forward."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # torch >= 2.13 names the switch forward_sync_buffers; older versions broadcast_buffers
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """(1/W) Σ_r value_r; the value itself in a single process."""
    if not initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


# ---------------------------------------------------------------- randomness and reset


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of rank r > 0's RNG stream (dropout), started fresh at `step`."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63)


def gather_rng(state: dict) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor with rank src's copy, in place."""
    for t in tensors:
        dist.broadcast(t.data, src)


def relora_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What a ReLoRA reset changes: W, A, B of each wrapped module and the Adam moments of
    the factors."""
    out = [t for m in relora_modules(model).values() for t in (m.weight, m.lora_A, m.lora_B)]
    for p in lora_parameters(model):
        state = optimizer.state.get(p) or {}
        out += [state[k] for k in MOMENTS if k in state]
    return out


@torch.no_grad()
def relora_reset(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: ReLoRAConfig) -> None:
    """merge_and_reset on every rank, then rank 0's result broadcast to all (re-initialised A,
    pruning masks and merged W identical everywhere)."""
    merge_and_reset(model, optimizer, cfg)
    if initialized() and dist.get_world_size() > 1:
        broadcast_(relora_tensors(model, optimizer))


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer
                  ) -> dict[str, torch.Tensor]:
    """Every parameter and every optimizer moment, by name (the state all ranks must share)."""
    out = {n: p for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for k in MOMENTS:
            if k in state:
                out[f"{names[id(p)]}.{k}"] = state[k]
    return out


@torch.no_grad()
def out_of_step(tensors: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Bitwise comparison with rank 0: (number of (rank, tensor) pairs that differ over all
    ranks, names that differ on this rank). A collective; tensors in the same order on all
    ranks."""
    differ = []
    for name, t in tensors.items():
        ref = t.detach().clone()
        dist.broadcast(ref, 0)
        if not torch.equal(ref.reshape(-1).view(torch.uint8),
                           t.detach().contiguous().reshape(-1).view(torch.uint8)):
            differ.append(name)
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    count = torch.tensor([len(differ)], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    return int(count.item()), differ


# ---------------------------------------------------------------- launcher


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_command(nproc: int, module_args: list[str], port: int | None = None) -> list[str]:
    """`python -m torch.distributed.run` for one machine with nproc processes on 127.0.0.1."""
    port = free_port() if port is None else port
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(port), *module_args]


def launch(nproc: int, module_args: list[str], threads: int | None = None) -> int:
    """Run `torchrun --nproc-per-node nproc <module_args>` and return its exit status.

    OMP_NUM_THREADS defaults to the cores divided among the processes (torchrun's own
    default is 1 with a warning)."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    return subprocess.run(launch_command(nproc, module_args), env=env).returncode


def check_in_step(step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                  rank: int) -> None:
    """RuntimeError when any parameter or optimizer tensor differs between the ranks at
    `step` (a collective: every rank calls it)."""
    n_differ, differ = out_of_step(state_tensors(model, optimizer))
    if n_differ:
        raise RuntimeError(f"step {step}: {n_differ} parameter/optimizer tensors differ "
                           f"between ranks (rank {rank}: {differ[:4]}); this is a bug")
