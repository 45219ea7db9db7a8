"""Benchmark dynlab's trainer: throughput against a plain PyTorch loop, MFU, ReLoRA memory.

Four figures, each a ratio computed within this run:

  speed    tokens/s of `dynlab.train("decoder", ...)` divided by tokens/s of a plain eager
           PyTorch loop (same PicoDecoder class and config, same initialisation, AdamW with the
           same settings, same batch and sequence length, random windows of the same token
           stream). dynlab's step times come from its own metrics.jsonl (it logs every step
           here: one JSON line per step, counted) over `--steps` steps after `--warmup` steps,
           a window without checkpoints: the checkpoint at step 0 is timed and printed
           separately, the final one falls after the window. The plain loop reads the loss
           every 10 steps; dynlab reads it every step (it skips updates on a non-finite loss).
           On CPU the headline rate is the median step time (robust to other processes on a
           shared machine; the whole-window rate is printed too), on CUDA the window. Rounds
           alternate in ABBA order; medians over rounds are compared. Goal: >= 1.0.
  MFU      model FLOPs utilisation (CUDA): tokens/s x FLOPs per token / peak, with
               FLOPs per token = 6 N + 12 L T d
           N: parameters in matrix multiplies (all but the input embedding table and the
           norms), L layers, T sequence length, d = n_heads x head_dim. 6 N counts the
           forward and backward matmuls, 12 L T d attention's QK^T and AV (forward 4 T d per
           layer, backward twice that; the causal mask is not discounted, as in PaLM and
           nanoGPT). Peak: H100 SXM bf16 dense, 989 TFLOP/s (--peak-tflops). bf16 autocast,
           with and without torch.compile. Goal: >= 35% on an H100 for pico-small.
  memory   relora / decoder, same config and batch.
           CUDA: torch.cuda.max_memory_allocated over three training steps (the trainer's
           build_model, optimizer and train_step), above what was allocated before.
           CPU: (a) bytes of parameters + gradients + AdamW state actually allocated after a
           step (tensor sizes; activations excluded), and (b) in a fresh process per kind,
           the peak resident memory while building the model and training three steps
           (VmHWM, reset via /proc/self/clear_refs once torch is imported, the data loaded
           and one step of a 2-layer d_model 8 model made, so lazy imports are not counted)
           minus the resident memory before: activations and allocator slack included.
           Goal: <= 0.85.
  saved    activations saved for backward, relora / decoder (distinct storages caught by
           torch.autograd.graph.saved_tensors_hooks in one training forward with the loss;
           parameters and buffers excluded), pico-small shape at batch 1 x 512 and 1 x 2048;
           then at 1 x 2048 (parameters + gradients + AdamW state + saved activations),
           relora / decoder: the main terms of the training peak. Goal: <= 0.85.

The data are uniform random token ids with the preset's exact vocabulary (a word-level
tokenizer of that size), so the model has the preset's real shape; throughput does not depend
on the text.

    python bench/train_bench.py                          # CPU: micro preset, ~2-3 minutes
    python bench/train_bench.py --device cuda            # GPU: pico-small, bf16, compile on/off
    python bench/train_bench.py --only speed --rounds 5  # one figure

Record the printed figures in bench/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dynlab.model.pico_decoder import PRESETS, ModelConfig, PicoDecoder

H100_BF16_DENSE_TFLOPS = 989.0

DEFAULTS = {  # device type -> options
    "cpu": dict(preset="micro", batch_size=8, seq_len=128, steps=100, warmup=20, rounds=4),
    "cuda": dict(preset="small", batch_size=16, seq_len=2048, steps=50, warmup=20, rounds=2),
}


@dataclass
class Setup:
    preset: str
    batch_size: int
    seq_len: int
    steps: int  # timed steps
    warmup: int
    device: str
    threads: int
    lr: float = 3e-4
    weight_decay: float = 0.01
    rank: int = 16
    ld_batch_size: int = 8
    compile: bool = False

    @property
    def model(self) -> ModelConfig:
        return replace(PRESETS[self.preset], max_seq_len=max(self.seq_len,
                                                             PRESETS[self.preset].max_seq_len))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


# ---------------------------------------------------------------- data


def make_data(folder: Path, vocab_size: int, n_tokens: int, seed: int = 0) -> tuple[Path, Path]:
    """A word-level tokenizer with exactly vocab_size entries (<|endoftext|> = 0) and a .npy
    of uniform random token ids."""
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {f"t{i}": i for i in range(2, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok_path, data_path = folder / "tokenizer.json", folder / "tokens.npy"
    tok.save(str(tok_path))
    rng = np.random.default_rng(seed)
    np.save(data_path, rng.integers(0, vocab_size, n_tokens, dtype=np.int32))
    return tok_path, data_path


def n_tokens_needed(s: Setup) -> int:
    steps = s.warmup + s.steps + 2
    return (steps * s.batch_size + s.ld_batch_size + 4) * (s.seq_len + 1)


# ---------------------------------------------------------------- FLOPs


def matmul_parameters(cfg: ModelConfig) -> int:
    """N: parameters in matrix multiplies (attention and SwiGLU projections, output head) =
    all parameters but the input embedding table and the RMSNorm weights."""
    from dynlab.model.pico_decoder import count_parameters

    return (count_parameters(cfg) - cfg.vocab_size * cfg.d_model
            - (2 * cfg.n_layers + 1) * cfg.d_model)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token = 6 N + 12 L T d (d = n_heads · head_dim)."""
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


# ---------------------------------------------------------------- throughput


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rates(durations: list[float], tokens_per_step: int) -> dict[str, float]:
    """tokens/s over the window (sum of step times) and at the median step time."""
    return {"window": tokens_per_step * len(durations) / sum(durations),
            "median_step": tokens_per_step / statistics.median(durations)}


def dynlab_rate(s: Setup, tok: Path, data: Path, out: Path, kind: str = "decoder"
                ) -> tuple[dict[str, float], float]:
    """(rates of the steps warmup+1 .. warmup+steps, seconds of step 0's checkpoint) of
    `dynlab.training`, from the wall_seconds of its metrics.jsonl (one line per step)."""
    import dynlab
    from dynlab.runs.metrics import read_metrics

    if s.compile:
        torch._dynamo.reset()  # every measurement compiles afresh (in its warmup steps)
    first, last = s.warmup, s.warmup + s.steps
    total = last + 2  # the final checkpoint falls outside the window
    opts = dict(preset=s.preset, out=str(out), overwrite=True, data=str(data),
                tokenizer=str(tok), steps=total, warmup_steps=min(10, total),
                checkpoint_every=total, eval_every=0, log_every=1, progress=False,
                batch_size=s.batch_size, seq_len=s.seq_len, ld_batch_size=s.ld_batch_size,
                max_seq_len=s.model.max_seq_len, lr=s.lr, weight_decay=s.weight_decay,
                device=s.device, threads=s.threads, compile=s.compile)
    if kind == "relora":
        opts |= dict(lora_rank=s.rank, reset_every=10**9, restart_warmup_steps=0)
    dynlab.train(kind, **opts)
    wall = {r["step"]: r["wall_seconds"] for r in read_metrics(out)}
    durations = [wall[i] - wall[i - 1] for i in range(first + 1, last + 1)]
    return rates(durations, s.tokens_per_step), wall[0]


def plain_rate(s: Setup, data: Path) -> dict[str, float]:
    """Rates of a plain eager loop: PicoDecoder, AdamW, cross-entropy, random windows, the
    loss read every 10 steps. On CUDA the device is synchronised only around the window
    (median_step is then the window's mean)."""
    device = torch.device(s.device)
    if s.compile:
        torch._dynamo.reset()
    torch.manual_seed(0)
    model = PicoDecoder(s.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                            fused=True if device.type == "cuda" else None)
    step_model = torch.compile(model) if s.compile else model
    tokens = torch.from_numpy(np.load(data).astype(np.int64))
    n_windows = (len(tokens) - 1) // s.seq_len
    gen = torch.Generator().manual_seed(0)
    V = s.model.vocab_size

    def step(i: int) -> None:
        ix = torch.randint(n_windows, (s.batch_size,), generator=gen)
        batch = torch.stack([tokens[j * s.seq_len: j * s.seq_len + s.seq_len + 1] for j in ix])
        batch = batch.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = step_model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % 10 == 0:
            loss.item()

    for i in range(s.warmup):
        step(i)
    sync(device)
    durations = []
    t0 = start = time.perf_counter()
    for i in range(s.steps):
        step(i)
        if device.type != "cuda":
            now = time.perf_counter()
            durations.append(now - t0)
            t0 = now
    sync(device)
    if device.type == "cuda":
        durations = [(time.perf_counter() - start) / s.steps] * s.steps
    return rates(durations, s.tokens_per_step)


def speed(s: Setup, rounds: int, tok: Path, data: Path, work: Path, relora: bool,
          say) -> dict:
    """Rounds of dynlab and plain in alternating order (ABBA); medians over rounds and the
    ratio dynlab / plain. The headline rate: the median step on CPU (robust to other
    processes on a shared machine), the window on CUDA."""
    key = "window" if torch.device(s.device).type == "cuda" else "median_step"
    dyn, plain, ckpt, rel = [], [], [], []
    for r in range(rounds):
        if r % 2:  # a drifting machine load favours neither side
            plain.append(plain_rate(s, data))
        rate, c = dynlab_rate(s, tok, data, work / "dec")
        dyn.append(rate)
        ckpt.append(c)
        if not r % 2:
            plain.append(plain_rate(s, data))
        if relora:
            rel.append(dynlab_rate(s, tok, data, work / "rel", kind="relora")[0])
        say(f"  round {r + 1}/{rounds}: dynlab {dyn[-1][key]:,.0f} tok/s, plain "
            f"{plain[-1][key]:,.0f} tok/s" + (f", relora {rel[-1][key]:,.0f} tok/s"
                                               if relora else ""))

    def med(xs: list[dict], k: str = key) -> float:
        return statistics.median(x[k] for x in xs)

    out = {"rate": key, "dynlab_tokens_per_s": med(dyn), "plain_tokens_per_s": med(plain),
           "dynlab_window_tokens_per_s": med(dyn, "window"),
           "plain_window_tokens_per_s": med(plain, "window"),
           "checkpoint_step0_s": statistics.median(ckpt),
           "rounds": {"dynlab": dyn, "plain": plain}}
    out["ratio_dynlab_over_plain"] = out["dynlab_tokens_per_s"] / out["plain_tokens_per_s"]
    out["ratio_window"] = out["dynlab_window_tokens_per_s"] / out["plain_window_tokens_per_s"]
    if relora:
        out["relora_tokens_per_s"] = med(rel)
        out["rounds"]["relora"] = rel
    return out


# ---------------------------------------------------------------- memory


def _train_cfg(s: Setup, kind: str, vocab: int):
    from dynlab.training.config import TrainConfig

    cfg = TrainConfig(kind=kind, preset=s.preset, batch_size=s.batch_size, seq_len=s.seq_len,
                      max_seq_len=s.model.max_seq_len, vocab_size=vocab, lr=s.lr,
                      weight_decay=s.weight_decay, lora_rank=s.rank, device=s.device,
                      threads=s.threads).resolved()
    return cfg


def train_three_steps(s: Setup, kind: str, data: Path):
    """(model, optimizer) after three updates made with the trainer's own functions."""
    from dynlab.training.config import model_config
    from dynlab.training.step import train_step
    from dynlab.training.trainer import build_model, make_optimizer

    device = torch.device(s.device)
    cfg = _train_cfg(s, kind, s.model.vocab_size)
    model = build_model(cfg, model_config(cfg, s.model.vocab_size), None).to(device)
    opt = make_optimizer(cfg, model, device)
    tokens = torch.from_numpy(np.load(data)[: 3 * s.batch_size * (s.seq_len + 1)]
                              .astype(np.int64)).view(3, s.batch_size, s.seq_len + 1)
    for i in range(3):
        train_step(model, opt, [tokens[i]], s.lr, device)
    return model, opt


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state actually allocated."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                if p.grad is not None)
    state = sum(t.numel() * t.element_size() for st in opt.state.values()
                for t in st.values() if torch.is_tensor(t))
    return {"parameters": params, "gradients": grads, "optimizer": state,
            "total": params + grads + state}


def _vm(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _warm_up(s: Setup) -> None:
    """One step of a 2-layer, d_model 8 model: lazy imports (torch._dynamo via the
    optimizer), kernels, autograd threads and (CUDA) the cuBLAS workspace are set up before
    a measurement."""
    from dynlab.training.step import train_step

    device = torch.device(s.device)
    tiny = ModelConfig(d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, activation_hidden_dim=8,
                       vocab_size=16, max_seq_len=8)
    model = PicoDecoder(tiny).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                            fused=True if device.type == "cuda" else None)
    train_step(model, opt, [torch.zeros(2, 9, dtype=torch.long)], s.lr, device)


def rss_worker(args: argparse.Namespace) -> None:
    """Run in a fresh process: after imports and data loading, reset the peak-RSS mark, build
    the model and train three steps; print the resident memory before and the peak during."""
    s = Setup(**json.loads(args.setup))
    torch.set_num_threads(s.threads)
    import dynlab.training.trainer  # noqa: F401  (imported before the measurement)

    data = Path(args.data)
    np.load(data)
    _warm_up(s)
    gc.collect()
    before = _vm("VmRSS")
    reset = _reset_peak_rss()
    if args.rss_worker != "baseline":
        train_three_steps(s, args.rss_worker, data)
    peak = _vm("VmHWM") if reset else None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak if peak is not None else maxrss,
                      "peak_is_since_reset": peak is not None}))


#: glibc malloc settings for the peak-RSS workers: every allocation of 64 KiB or more is its
#: own mapping, returned to the system when freed, and one arena, so the peak resident memory
#: follows the live tensors instead of the allocator's retained slack (without them relora's
#: peak read 29% above its structural bound at the micro preset, with them 4%).
RSS_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}


def peak_rss(s: Setup, what: str, data: Path) -> dict:
    from dataclasses import asdict

    out = subprocess.run([sys.executable, __file__, "--rss-worker", what, "--setup",
                          json.dumps(asdict(s)), "--data", str(data)],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(s.threads), **RSS_MALLOC))
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(s: Setup, data: Path) -> dict:
    device = torch.device(s.device)
    out: dict = {}
    if device.type == "cuda":
        _warm_up(s)
        peaks = {}
        for kind in ("decoder", "relora"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            model, opt = train_three_steps(s, kind, data)
            sync(device)
            peaks[kind] = torch.cuda.max_memory_allocated(device) - base
            out[f"{kind}_state_bytes"] = state_bytes(model, opt)
            del model, opt
        out["cuda_peak_bytes"] = peaks
        out["ratio_cuda_peak"] = peaks["relora"] / peaks["decoder"]
    else:
        for kind in ("decoder", "relora"):
            model, opt = train_three_steps(s, kind, data)
            out[f"{kind}_state_bytes"] = state_bytes(model, opt)
            del model, opt
        rss = {w: peak_rss(s, w, data) for w in ("decoder", "relora")}
        out["rss"] = rss
        out["ratio_peak_rss"] = rss["relora"]["peak"] / rss["decoder"]["peak"]
        if all(r["peak_is_since_reset"] for r in rss.values()):
            grow = {k: r["peak"] - r["before"] for k, r in rss.items()}
            out["ratio_peak_rss_growth"] = grow["relora"] / grow["decoder"]
    out["ratio_state"] = (out["relora_state_bytes"]["total"]
                          / out["decoder_state_bytes"]["total"])
    out["saved_bytes"] = saved_at_setup(s)
    out.update(structural_bound(out))
    return out


def saved_at_setup(s: Setup) -> dict[str, int]:
    """Saved activations for backward of one training forward at the bench's own setup."""
    from dynlab.training.config import model_config
    from dynlab.training.trainer import build_model

    device = torch.device(s.device)
    vocab = s.model.vocab_size
    batch = torch.randint(0, vocab, (s.batch_size, s.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    out = {}
    for kind in ("decoder", "relora"):
        cfg = _train_cfg(s, kind, vocab)
        model = build_model(cfg, model_config(cfg, vocab), None).to(device).train()
        out[kind] = saved_activation_bytes(model, batch, device)
        del model
        gc.collect()
    return out


def structural_bound(m: dict) -> dict:
    """ReLoRA's structural peak: the decoder's measured peak, minus the gradients and AdamW
    state that freezing the wrapped matrices saves, plus the LoRA factors' own parameters,
    gradients and AdamW state, plus what the LoRA branches must save for backward (their
    rank-r intermediates: the saved-activation difference at the same batch). The first two
    changes are the difference of the two kinds' parameters + gradients + optimizer state
    (the frozen matrices' parameters stay in both), so
        bound = decoder peak + (relora state − decoder state) + (relora saved − decoder saved).
    `relora_over_bound` near 1 means ReLoRA wastes nothing beyond its structure."""
    delta = m["relora_state_bytes"]["total"] - m["decoder_state_bytes"]["total"]
    delta += m["saved_bytes"]["relora"] - m["saved_bytes"]["decoder"]
    if "cuda_peak_bytes" in m:
        peak = m["cuda_peak_bytes"]
    elif "ratio_peak_rss_growth" in m:
        peak = {k: r["peak"] - r["before"] for k, r in m["rss"].items()}
    else:
        return {}
    bound = peak["decoder"] + delta
    return {"structural_bound_bytes": bound, "relora_over_bound": peak["relora"] / bound}


SAVED_PRESET, SAVED_SEQ_LENS, SAVED_STATE_SEQ = "small", (512, 2048), 16


def saved_activation_bytes(model: torch.nn.Module, batch: torch.Tensor,
                           device: torch.device) -> int:
    """Bytes of the distinct storages (by data_ptr) autograd saves for backward in one
    training forward with the loss (the trainer's autocast), parameters and buffers excluded.
    The graph is dropped without a backward."""
    from dynlab.training.step import autocast, lm_loss

    constant = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in constant:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    batch = batch.to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(device):
            logits = model(batch[:, :-1])
        loss = lm_loss(logits, batch[:, 1:])
    del logits, loss  # every saved tensor stayed alive until here
    return sum(seen.values())


def saved_memory(s: Setup, data: Path) -> dict:
    """Saved activations for backward, relora / decoder, for the SAVED_PRESET shape at batch 1
    and each of SAVED_SEQ_LENS (the trainer's build_model, training mode, LoRA dropout as the
    trainer's default); and at the longest length the ratio of parameters + gradients + AdamW
    state (measured after three steps at seq SAVED_STATE_SEQ, which they do not depend on)
    + saved activations: the training peak's main terms."""
    from dynlab.training.config import model_config
    from dynlab.training.trainer import build_model

    device = torch.device(s.device)
    sp = replace(s, preset=SAVED_PRESET, batch_size=1, seq_len=max(SAVED_SEQ_LENS))
    vocab = sp.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = {t: torch.randint(0, vocab, (1, t + 1), generator=gen) for t in SAVED_SEQ_LENS}
    out: dict = {"preset": SAVED_PRESET, "batch_size": 1, "saved": {}}
    for kind in ("decoder", "relora"):
        cfg = _train_cfg(sp, kind, vocab)
        model = build_model(cfg, model_config(cfg, vocab), None).to(device).train()
        torch.manual_seed(0)
        out["saved"][kind] = {t: saved_activation_bytes(model, b, device)
                              for t, b in batches.items()}
        del model
        gc.collect()
        m, opt = train_three_steps(replace(sp, seq_len=SAVED_STATE_SEQ), kind, data)
        out[f"{kind}_state_bytes"] = state_bytes(m, opt)
        del m, opt
        gc.collect()
    out["ratio_saved"] = {t: out["saved"]["relora"][t] / out["saved"]["decoder"][t]
                          for t in SAVED_SEQ_LENS}
    t = max(SAVED_SEQ_LENS)
    total = {k: out[f"{k}_state_bytes"]["total"] + out["saved"][k][t]
             for k in ("decoder", "relora")}
    out["total_bytes"] = total
    out["ratio_total"] = total["relora"] / total["decoder"]
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--preset", default=None, help="model preset (cpu: micro; cuda: small)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before (compile)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (median)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank for relora")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="peak for MFU (default H100 SXM bf16 dense, 989)")
    ap.add_argument("--compile", choices=("both", "on", "off"), default=None,
                    help="torch.compile: cuda default both, cpu default off")
    ap.add_argument("--only", choices=("speed", "memory"), default=None)
    ap.add_argument("--no-relora-speed", action="store_true",
                    help="skip relora's tokens/s (information only)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--setup", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_worker:
        rss_worker(args)
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    d = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in d.items()}
    torch.set_num_threads(args.threads)
    base = Setup(preset=pick["preset"], batch_size=pick["batch_size"], seq_len=pick["seq_len"],
                 steps=pick["steps"], warmup=pick["warmup"], device=str(device),
                 threads=args.threads, rank=args.rank)
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[
        args.compile or ("both" if device.type == "cuda" else "off")]

    def say(msg: str) -> None:
        print(msg, flush=True)

    cfg = base.model
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{os.cpu_count()}-core CPU, {args.threads} thread(s)")
    say(f"train_bench: {machine}, torch {torch.__version__}")
    say(f"model {base.preset}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} "
        f"heads ({cfg.n_kv_heads} kv), hidden {cfg.activation_hidden_dim}, vocab "
        f"{cfg.vocab_size}; batch {base.batch_size} x seq {base.seq_len} = "
        f"{base.tokens_per_step:,} tokens/step")
    fpt = flops_per_token(cfg, base.seq_len)
    say(f"FLOPs/token = 6 N + 12 L T d = 6 x {matmul_parameters(cfg):,} + 12 x {cfg.n_layers} "
        f"x {base.seq_len} x {cfg.n_heads * cfg.head_dim} = {fpt / 1e6:,.1f} M")
    results: dict = {"machine": machine, "torch": torch.__version__,
                     "setup": {"preset": base.preset, "batch_size": base.batch_size,
                               "seq_len": base.seq_len, "steps": base.steps,
                               "warmup": base.warmup, "threads": args.threads},
                     "flops_per_token": fpt, "peak_tflops": args.peak_tflops}
    with tempfile.TemporaryDirectory(prefix="dynlab-train-bench-") as tmp:
        work = Path(tmp)
        tok, data = make_data(work / "data", cfg.vocab_size, n_tokens_needed(base))
        os.environ.setdefault("DYNLAB_CACHE", str(work / "cache"))
        if args.only in (None, "memory"):
            # first: on CUDA nothing of the speed runs (compiled graphs) is still allocated
            say(f"\nmemory, relora (r={base.rank}) vs decoder, same config and batch:")
            m = memory(base, data)
            results["memory"] = m
            mib = 2**20
            for kind in ("decoder", "relora"):
                b = m[f"{kind}_state_bytes"]
                say(f"  {kind}: parameters {b['parameters'] / mib:.2f} MiB + gradients "
                    f"{b['gradients'] / mib:.2f} MiB + AdamW state {b['optimizer'] / mib:.2f} "
                    f"MiB = {b['total'] / mib:.2f} MiB")
            say(f"  ratio of parameters + gradients + optimizer state: {m['ratio_state']:.3f}"
                " (goal <= 0.85)")
            if "ratio_cuda_peak" in m:
                p = m["cuda_peak_bytes"]
                say(f"  torch.cuda.max_memory_allocated: decoder {p['decoder'] / mib:,.0f} MiB,"
                    f" relora {p['relora'] / mib:,.0f} MiB -> ratio {m['ratio_cuda_peak']:.3f}"
                    " (goal <= 0.85)")
            else:
                p = m["rss"]
                say(f"  peak RSS of a fresh process (torch imported, data loaded, then model +"
                    f" 3 steps): decoder {p['decoder']['peak'] / mib:.1f} MiB, relora "
                    f"{p['relora']['peak'] / mib:.1f} MiB -> ratio {m['ratio_peak_rss']:.3f}")
                if "ratio_peak_rss_growth" in m:
                    say(f"  peak RSS growth over the RSS before the model was built "
                        f"(activations and allocator slack included): decoder "
                        f"{(p['decoder']['peak'] - p['decoder']['before']) / mib:.1f} MiB, "
                        f"relora {(p['relora']['peak'] - p['relora']['before']) / mib:.1f} MiB"
                        f" -> ratio {m['ratio_peak_rss_growth']:.3f} (goal <= 0.85)")
            if "relora_over_bound" in m:
                say(f"  structural bound for relora (decoder peak - saved gradients and AdamW "
                    f"state + LoRA factors' own + their saved rank-r intermediates): "
                    f"{m['structural_bound_bytes'] / mib:,.1f} MiB;"
                    f" relora peak / bound = {m['relora_over_bound']:.3f} (goal within 2%)")
            say(f"\nsaved activations for backward (one training forward with the loss, LoRA "
                f"dropout 0.1, r={base.rank}, parameters excluded), pico-{SAVED_PRESET} shape, "
                "batch 1:")
            a = saved_memory(base, data)
            results["saved_activations"] = a
            for t in SAVED_SEQ_LENS:
                say(f"  seq {t}: decoder {a['saved']['decoder'][t] / mib:,.1f} MiB, relora "
                    f"{a['saved']['relora'][t] / mib:,.1f} MiB -> relora / decoder "
                    f"{a['ratio_saved'][t]:.3f}")
            t = max(SAVED_SEQ_LENS)
            parts = {k: (a[f"{k}_state_bytes"]["total"], a["saved"][k][t])
                     for k in ("decoder", "relora")}
            say(f"  parameters + gradients + AdamW state + saved activations at 1 x {t}: "
                + ", ".join(f"{k} {st / mib:,.1f} + {sv / mib:,.1f} = {(st + sv) / mib:,.1f} MiB"
                            for k, (st, sv) in parts.items())
                + f" -> ratio {a['ratio_total']:.3f} (goal <= 0.85)")
        if args.only in (None, "speed"):
            for comp in compile_modes:
                s = replace(base, compile=comp)
                label = "compiled" if comp else "eager"
                say(f"\nspeed ({label}), {pick['rounds']} rounds of {s.steps} timed steps after "
                    f"{s.warmup} warmup steps:")
                r = speed(s, pick["rounds"], tok, data, work, not args.no_relora_speed, say)
                for who in ("dynlab", "plain"):
                    r[f"{who}_mfu"] = r[f"{who}_tokens_per_s"] * fpt / (args.peak_tflops * 1e12)
                results[f"speed_{label}"] = r
                what = "window" if r["rate"] == "window" else "median step"
                say(f"  {what}: dynlab {r['dynlab_tokens_per_s']:,.0f} tok/s, plain loop "
                    f"{r['plain_tokens_per_s']:,.0f} tok/s  ->  ratio dynlab/plain "
                    f"{r['ratio_dynlab_over_plain']:.3f} (goal >= 1.0)")
                if r["rate"] != "window":
                    say(f"  whole window: dynlab {r['dynlab_window_tokens_per_s']:,.0f} tok/s, "
                        f"plain {r['plain_window_tokens_per_s']:,.0f} tok/s -> ratio "
                        f"{r['ratio_window']:.3f}")
                if "relora_tokens_per_s" in r:
                    say(f"  relora (dynlab) {r['relora_tokens_per_s']:,.0f} tok/s = "
                        f"{r['relora_tokens_per_s'] / r['dynlab_tokens_per_s']:.3f} x decoder")
                say(f"  checkpoint at step 0 (learning-dynamics gradient on "
                    f"{base.ld_batch_size} sequences + write), not in the window: "
                    f"{r['checkpoint_step0_s']:.2f} s")
                if device.type == "cuda":
                    say(f"  MFU dynlab {100 * r['dynlab_mfu']:.1f}%, plain "
                        f"{100 * r['plain_mfu']:.1f}% of {args.peak_tflops:g} TFLOP/s "
                        f"(goal >= 35% on an H100)")
                else:
                    say(f"  achieved {r['dynlab_tokens_per_s'] * fpt / 1e9:.2f} GFLOP/s "
                        "(dynlab)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        say(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
