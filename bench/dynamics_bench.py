"""Benchmark the function-space dynamics (`dynlab analyze --dynamics all`) against the demo's
analysis, in one process.

1. The demo's micro runs (trained here with `make demo`'s options, or given with --runs):
   times `dynlab.analyze(both runs)` (the demo's analysis: spectra, activations, update
   ratio) into a fresh store, then the dynamics of every checkpoint of both runs into the same
   store, with the demo's dynamics options (`dynlab.demo.DEMO_DYNAMICS`) and with the
   defaults, and prints each as a ratio to the analysis time (the goal: demo options ≤ 2×).
2. The cost per checkpoint of each item for a pico-tiny-shaped model (12 layers, d_model 96,
   12 heads / 4 kv, hidden 384, vocab 50304; random weights) on the default batch (8 × 64
   tokens; the Hessian on 4 of them), in seconds.

    python bench/dynamics_bench.py [--runs DEC REL] [--skip-tiny] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def train_demo_runs(root: Path) -> list[Path]:
    import dynlab
    from dynlab.demo import DEFAULTS

    common = dict(steps=DEFAULTS["steps"], checkpoint_every=DEFAULTS["checkpoint_every"],
                  warmup_steps=DEFAULTS["warmup_steps"], seed=DEFAULTS["seed"],
                  overwrite=True, save_activations=True, activation_positions="sample:16",
                  progress=False)
    dec = dynlab.train("decoder", out=str(root / "decoder"), **common)
    rel = dynlab.train("relora", out=str(root / "relora"), reset_every=DEFAULTS["reset_every"],
                       restart_warmup_steps=DEFAULTS["restart_warmup_steps"], **common)
    return [Path(dec), Path(rel)]


def demo_ratio(runs: list[Path], device: str) -> None:
    import dynlab
    from dynlab.analysis.dynamics import DynamicsOptions
    from dynlab.demo import DEMO_DYNAMICS

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "a.zarr"
        t = time.perf_counter()
        dynlab.analyze(runs, out=store, progress=False, device=device)
        base = time.perf_counter() - t
        n = sum(len(list((r / "checkpoints").glob("step_*"))) for r in runs)
        print(f"demo analysis (both runs, {n} checkpoints): {base:.1f} s")
        for label, opts in (("demo options", DEMO_DYNAMICS), ("defaults", {})):
            s2 = Path(tmp) / f"{label}.zarr"
            shutil.copytree(store, s2)
            t = time.perf_counter()
            dynlab.analyze(runs, out=s2, progress=False, device=device, dynamics="all",
                           dynamics_options=opts)
            dt = time.perf_counter() - t
            print(f"dynamics all, {label} {DynamicsOptions(**opts)}: {dt:.1f} s = "
                  f"{dt / base:.2f} × the analysis ({dt / n:.2f} s per checkpoint)")


def tiny_cost(device: str) -> None:
    from dynlab.analysis import dynamics as D
    from dynlab.model.pico_decoder import PRESETS, PicoDecoder

    torch.manual_seed(0)
    model = PicoDecoder(PRESETS["tiny"]).to(device).eval()
    opt = D.DynamicsOptions()
    batch = torch.randint(0, 50304, (opt.n_seq, opt.seq_len + 1))
    p = sum(x.numel() for x in model.parameters())
    print(f"pico-tiny shape, {p / 1e6:.1f} M parameters, batch {opt.n_seq} × {opt.seq_len} "
          f"(Hessian on {opt.hessian_seq}), k {opt.k}, {opt.lanczos_iters()} Lanczos steps, "
          f"{opt.probes} probes, {opt.alphas} α:")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    precond = torch.ones(p, dtype=torch.float64)
    items = {
        "sharpness (top-k, trace, preconditioned)":
            lambda: D.sharpness(model, batch[: opt.hessian_seq], opt, precond),
        "barrier (11-point line)": lambda: D.line(model, batch, state, state, opt.alphas),
        "gns (per-sequence gradients)": lambda: D.gradient_noise(model, batch, 12),
        "attention": lambda: D.attention_stats(model, batch, opt.sink_eps),
    }
    total = 0.0
    for name, fn in items.items():
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        total += dt
        print(f"  {name}: {dt:.1f} s")
    print(f"  all: {total:.1f} s per checkpoint")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs=2, type=Path, help="the demo's decoder and relora runs")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if not args.skip_demo:
        if args.runs:
            demo_ratio(list(args.runs), args.device)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                demo_ratio(train_demo_runs(Path(tmp)), args.device)
    if not args.skip_tiny:
        tiny_cost(args.device)


if __name__ == "__main__":
    main()
