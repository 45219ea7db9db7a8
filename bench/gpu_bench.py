"""GPU figures in one run: batched-SVD analysis, training throughput and MFU, evaluation.

Run through `bench/gpu.sh` on a machine with a CUDA GPU (under 8 minutes on an H100); with
`--dry-run` the same steps run on the CPU at tiny sizes, so the script is known to work
before a GPU is lent. Sections:

  analyze   a pico-small-shaped run of 20 checkpoints (weights + grads, generated as in
            bench/analyze_bench.py): `dynlab analyze --device cuda` wall time over the time to
            only read the same files (goal <= 1.25: I/O-bound), its speed-up over
            `--device cpu` on the same machine, and the largest relative difference between
            the CUDA and CPU stores over every finite value of every metric (goal 1e-6 in
            float64), then the same with `--precision float32` and its measured accuracy
  train     bench/train_bench.py on the device: pico-small, bf16 autocast, eager and
            `torch.compile`: tokens/s, MFU, relora against decoder, peak memory
  eval      bench/eval_bench.py: BLiMP on a pico-small-shaped model (skipped with a note
            when the BLiMP files are absent); then bench/eval_sources_bench.py: perplexity of
            a Hugging Face (GPT-NeoX, Pythia-160M-shaped) checkpoint with bf16 autocast,
            target >= 100k scored tokens/s on an H100 (skipped without transformers)

    python bench/gpu_bench.py [--dry-run] [--checkpoints 20] [--workdir /tmp/dynlab-gpu]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import analyze_bench as AB  # noqa: E402  (a sibling script)

from dynlab.runs.checkpoints import ModelSpec  # noqa: E402

TINY = ModelSpec(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=128,
                 vocab_size=512)


def dynlab_cmd(*args: str) -> list[str]:
    """`dynlab ...` through this interpreter (works without the console script installed)."""
    return [sys.executable, "-m", "dynlab_cli.main", *args]


def timed_analyze(run: Path, out: Path, device: str, precision: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(dynlab_cmd("analyze", str(run), "--metrics", "per,cn", "-o", str(out),
                              "--device", device, "--precision", precision, "--no-progress"),
                   check=True)
    return time.perf_counter() - t0


def max_relative_difference(a: Path, b: Path) -> float:
    """Largest |x − y| / |y| over every metric value finite in both stores; +inf where one
    store holds inf (or NaN) where the other holds a number."""
    import xarray as xr

    da, db = xr.open_zarr(a).load(), xr.open_zarr(b).load()
    worst = 0.0
    for name in ("per", "cn", "head_per", "head_cn", "emb_per", "emb_cn"):
        x = da[name].values.ravel()
        y = db[name].sel(run=da.run, step=da.step, kind=da.kind).values.ravel()
        both = np.isfinite(x) & np.isfinite(y)
        if not np.array_equal(np.isfinite(x), np.isfinite(y)):
            return math.inf
        if both.any():
            rel = np.abs(x[both] - y[both]) / np.maximum(np.abs(y[both]), 1e-300)
            worst = max(worst, float(rel.max()))
    return worst


def section_analyze(args, device: str) -> None:
    spec = TINY if args.dry_run else AB.SMALL
    n = args.checkpoints
    run = args.workdir / f"run-{n}"
    print(f"[analyze] generating {n} checkpoints of d_model {spec.d_model}, "
          f"{spec.n_layers} layers in {run} ...", flush=True)
    AB.generate(run, spec, n)
    t_read = AB.read_only(run)
    t_dev = timed_analyze(run, args.workdir / "dev64.zarr", device, "float64")
    t_read2 = AB.read_only(run)  # files are in the page cache for both measurements
    t_cpu = timed_analyze(run, args.workdir / "cpu64.zarr", "cpu", "float64")
    t_f32 = timed_analyze(run, args.workdir / "dev32.zarr", device, "float32")
    d64 = max_relative_difference(args.workdir / "dev64.zarr", args.workdir / "cpu64.zarr")
    d32 = max_relative_difference(args.workdir / "dev32.zarr", args.workdir / "cpu64.zarr")
    read = min(t_read, t_read2)
    print(f"[analyze] {n} checkpoints, --metrics per,cn, kinds weights,grads,updates")
    print(f"  read only                 {read:8.1f} s")
    print(f"  analyze --device {device:5s}    {t_dev:8.1f} s   / read = {t_dev / read:5.2f}"
          "   (goal <= 1.25)")
    print(f"  analyze --device cpu      {t_cpu:8.1f} s   speed-up cpu/{device} = "
          f"{t_cpu / t_dev:5.2f}x")
    print(f"  analyze {device} float32     {t_f32:8.1f} s   / read = {t_f32 / read:5.2f}")
    print(f"  max relative difference {device} float64 vs cpu float64: {d64:.2e} (goal 1e-6)")
    print(f"  max relative difference {device} float32 vs cpu float64: {d32:.2e}")


def section_train(args, device: str) -> None:
    import train_bench

    if args.dry_run:
        argv = ["--device", "cpu", "--preset", "micro", "--batch-size", "2", "--seq-len", "32",
                "--steps", "3", "--warmup", "1", "--rounds", "1", "--only", "speed"]
    else:
        argv = ["--device", device, "--steps", "30", "--warmup", "10", "--rounds", "1"]
    print(f"[train] bench/train_bench.py {' '.join(argv)}", flush=True)
    train_bench.main(argv)


def section_eval(args, device: str) -> None:
    import eval_bench

    blimp = args.blimp
    if not blimp.exists() or not args.text.exists():
        print(f"[eval] skipped: {blimp} or {args.text} is missing (pass --blimp/--text)")
        return
    argv = ["--device", device, "--blimp", str(blimp), "--text", str(args.text), "--rounds",
            "1" if args.dry_run else "2", "--preset", "micro" if args.dry_run else "small"]
    if args.dry_run:
        argv += ["--limit", "2", "--vocab-size", "512"]
    print(f"[eval] bench/eval_bench.py {' '.join(argv)}", flush=True)
    eval_bench.main(argv)
    try:
        import eval_sources_bench
        import transformers  # noqa: F401
    except ImportError:
        print("[eval] Hugging Face checkpoint skipped: transformers is not installed")
        return
    hf = ["--device", device, "--text", str(args.text), "--rounds", "1" if args.dry_run
          else "2"]
    hf += (["--docs", "40", "--layers", "1", "--d-model", "64", "--context", "64",
            "--vocab-size", "512"] if args.dry_run else
           ["--docs", "4000", "--layers", "12", "--d-model", "768", "--context", "2048",
            "--vocab-size", "8192", "--batch-size", "64", "--plain-batch", "64",
            "--autocast", "bf16"])
    print(f"[eval] bench/eval_sources_bench.py {' '.join(hf)} (GPU target: >= 100k "
          "tokens/s)", flush=True)
    eval_sources_bench.main(hf)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    ap.add_argument("--checkpoints", type=int, default=None, help="default 20 (dry run: 3)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dynlab-gpu"))
    ap.add_argument("--blimp", type=Path, default=HERE.parents[1] / "shared/data/blimp")
    ap.add_argument("--text", type=Path,
                    default=HERE.parents[1] / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--only", choices=("analyze", "train", "eval"), default=None)
    args = ap.parse_args(argv)
    args.checkpoints = args.checkpoints or (3 if args.dry_run else 20)
    if args.dry_run:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        sys.exit("no CUDA GPU here: run `bench/gpu.sh --dry-run` to check the script on a CPU")
    args.workdir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    print(f"machine: {name}; {os.cpu_count()} CPU threads; torch {torch.__version__}")
    t0 = time.perf_counter()
    for section in ("analyze", "train", "eval"):
        if args.only in (None, section):
            globals()[f"section_{section}"](args, device)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
