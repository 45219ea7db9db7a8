"""Benchmark `dynlab analyze --metrics per,cn` against three baselines, in one run.

Generates a pico-small-shaped run (12 layers, d_model 384, 12 heads, 4 kv heads, hidden 1536,
vocab 50304; weights and grads at every checkpoint), then times:

  dynlab  the whole `dynlab analyze RUN --metrics per,cn` process, as a user runs it
  (a)     the pico-analyze way: reload the checkpoint for each metric, a full float32
          torch.linalg.svd of one matrix at a time
  (b)     a strong plain loop: read each checkpoint once, float64 svdvals per matrix
  (c)     the floor: bare file reads, plus Gram products and eigvalsh of all the same
          matrices already in memory (batched by shape, float64)

Every route analyses the same matrices: per kind (weights, grads, updates) each layer's
q, k, v, o, w_0, w_1, w_2, the whole-layer OV circuit, each head's OV circuit (as a dense d×d
matrix for the baselines) and both embeddings. Values of dynlab and (b) are compared (1e-6).
Figures are printed as seconds and as ratios within this run; record them in
bench/RESULTS.md with the machine.

    python bench/analyze_bench.py [--checkpoints 3] [--skip-a] [--device cpu|cuda]
    python bench/analyze_bench.py --scaling [--device cuda]   # 5 vs 20 checkpoints

--scaling prints, for 5 and 20 checkpoints, the analysis wall time divided by the time to only
read the same checkpoints (I/O-bound when near 1), and the analysis process's peak resident
memory (bounded by about three checkpoints whatever the run's length).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dynlab.runs.checkpoints import ModelSpec, read_ahead

SMALL = ModelSpec(d_model=384, n_layers=12, n_heads=12, n_kv_heads=4,
                  activation_hidden_dim=1536, vocab_size=50304)
MATS = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
        "swiglu.w_0", "swiglu.w_1", "swiglu.w_2")


def generate(run: Path, spec: ModelSpec, n_ckpt: int, seed: int = 0) -> None:
    """Gaussian weights drifting between checkpoints; grads dense except the input embedding,
    whose gradient is non-zero only on the rows of tokens in the batch (as in training)."""
    if (run / "checkpoints" / f"step_{(n_ckpt - 1) * 1000}" / "meta.json").exists():
        return
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cfg = {"kind": "decoder", "model": {
        "d_model": spec.d_model, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads, "activation_hidden_dim": spec.activation_hidden_dim,
        "vocab_size": spec.vocab_size, "max_seq_len": 2048}}
    (run / "run.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    shapes = spec.expected_shapes()
    w = {k: (torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=g))
         for k, s in shapes.items()}
    for i in range(n_ckpt):
        step = i * 1000
        w = {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in w.items()}
        grads = {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in w.items()}
        seen = torch.zeros(spec.vocab_size, dtype=torch.bool)
        seen[torch.randint(0, spec.vocab_size, (4096,), generator=g)] = True
        grads["embedding_proj.weight"][~seen] = 0
        d = run / "checkpoints" / f"step_{step}"
        d.mkdir(parents=True)
        save_file(w, str(d / "weights.safetensors"))
        save_file(grads, str(d / "grads.safetensors"))
        (d / "meta.json").write_text(json.dumps({"step": step}))


def dense_matrices(w, g, prev, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """The same matrices dynlab analyses, all dense (per-head OV as d×d products)."""
    h, kv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim

    def heads(t, layer):
        o = t[f"layers.{layer}.attention.o_proj.weight"].double()
        v = t[f"layers.{layer}.attention.v_proj.weight"].double()
        return [(o[:, i * hd:(i + 1) * hd], v[(i // (h // kv)) * hd:(i // (h // kv) + 1) * hd])
                for i in range(h)]

    out = []
    kinds = {"weights": w, "grads": g}
    if prev is not None:
        kinds["updates"] = {k: w[k].double() - prev[k].double() for k in w}
    for kind, t in kinds.items():
        for layer in range(spec.n_layers):
            for m in MATS:
                out.append((f"{kind}.{layer}.{m}", t[f"layers.{layer}.{m}.weight"]))
            if kind == "weights":
                hv = [o @ v for o, v in heads(w, layer)]
            elif kind == "grads":
                hv = [o @ dv + do @ v for (o, v), (do, dv) in zip(heads(w, layer), heads(g, layer),
                                                                    strict=True)]
            else:
                hv = [o @ v - po @ pv for (o, v), (po, pv) in zip(heads(w, layer),
                                                                  heads(prev, layer), strict=True)]
            out.append((f"{kind}.{layer}.ov_circuit", sum(hv)))
            out.extend((f"{kind}.{layer}.head{i}", x) for i, x in enumerate(hv))
        for e in ("embedding_proj", "de_embedding_proj"):
            out.append((f"{kind}.{e}", t[f"{e}.weight"]))
    return out


def per_cn(s: np.ndarray, k: int, max_dim: int) -> tuple[float, float]:
    s = s[:k]
    p = s / s.sum()
    nz = p[p > 0]
    per = math.exp(-(nz * np.log(nz)).sum()) / k
    tol = max_dim * np.finfo(np.float64).eps * s[0]
    return per, (math.inf if s[-1] <= tol else s[0] / s[-1])


def rank_bound(name: str, x: torch.Tensor, spec: ModelSpec) -> int:
    """k: hd (2·hd) for a head's OV, n_kv·hd (2·n_kv·hd) for the layer's OV (GQA)."""
    inner = {"head": spec.head_dim, "ov_circuit": spec.n_kv_heads * spec.head_dim}
    for key, r in inner.items():
        if name.rsplit(".", 1)[-1].startswith(key):
            return min(min(x.shape), r if name.startswith("weights") else 2 * r)
    return min(x.shape)


def read_checkpoint(d: Path) -> tuple[dict, dict]:
    """Both files, really read: safetensors maps files lazily, so each file is read through
    once (what dynlab's loader does) and the tensors are the zero-copy mapping."""
    out = []
    for f in ("weights.safetensors", "grads.safetensors"):
        read_ahead(d / f)
        out.append(load_file(str(d / f)))
    return tuple(out)


def ckpt_files(run: Path):
    return sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))


def baseline_a(run: Path, spec: ModelSpec) -> float:
    """pico-analyze: reload per metric; full float32 SVD, one matrix at a time."""
    t0 = time.perf_counter()
    for _metric in ("per", "cn"):
        prev = None
        for d in ckpt_files(run):
            w, g = read_checkpoint(d)
            for name, x in dense_matrices(w, g, prev, spec):
                _, s, _ = torch.linalg.svd(x.float(), full_matrices=False)
                per_cn(s.double().numpy(), rank_bound(name, x, spec), max(x.shape))
            prev = w
    return time.perf_counter() - t0


def baseline_b(run: Path, spec: ModelSpec) -> tuple[float, dict]:
    """Read once; float64 svdvals per matrix."""
    t0 = time.perf_counter()
    values, prev = {}, None
    for d in ckpt_files(run):
        step = int(d.name.split("_")[1])
        w, g = read_checkpoint(d)
        for name, x in dense_matrices(w, g, prev, spec):
            s = torch.linalg.svdvals(x.double()).numpy()
            values[(step, name)] = per_cn(s, rank_bound(name, x, spec), max(x.shape))
        prev = w
    return time.perf_counter() - t0, values


def floor_c(run: Path, spec: ModelSpec) -> tuple[float, float]:
    """Bare reads + Gram and eigvalsh of the same matrices already in memory."""
    t_read, t_gram, prev = 0.0, 0.0, None
    for d in ckpt_files(run):
        t0 = time.perf_counter()
        w, g = read_checkpoint(d)
        t_read += time.perf_counter() - t0
        groups: dict[tuple, list] = {}
        for _, x in dense_matrices(w, g, prev, spec):
            x = x.double()
            x = x if x.shape[0] <= x.shape[1] else x.mT
            groups.setdefault(tuple(x.shape), []).append(x)
        stacks = [torch.stack(v) for v in groups.values()]
        t0 = time.perf_counter()
        for x in stacks:
            torch.linalg.eigvalsh(x @ x.mT)
        t_gram += time.perf_counter() - t0
        prev = w
        del stacks, groups
    return t_read, t_gram


def time_dynlab(run: Path, out: Path, device: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).parent / "dynlab"
    t0 = time.perf_counter()
    subprocess.run([str(exe), "analyze", str(run), "--metrics", "per,cn", "-o", str(out),
                    "--device", device, "--no-progress"], check=True)
    return time.perf_counter() - t0


def compare(out: Path, ref: dict, spec: ModelSpec) -> tuple[float, int]:
    """(largest relative difference over per and every cn finite in both, number of cn values
    that one side counts as infinite and the other not). The reference judges σ_k against
    float64's eps (numpy's matrix_rank rule); dynlab against the precision the checkpoint was
    stored in (`metrics_mod.zero_tolerance`), so a cn near the float32 noise floor is inf in
    dynlab and a large finite number in the reference: those are counted, not compared."""
    import xarray as xr

    ds = xr.open_zarr(out).load()
    worst, judged = 0.0, 0
    for (step, name), (per, cn) in ref.items():
        kind, rest = name.split(".", 1)
        if rest in ("embedding_proj", "de_embedding_proj"):
            got = [ds[f"emb_{m}"].sel(run=out_run(ds), kind=kind, step=step, embedding=rest)
                   for m in ("per", "cn")]
        else:
            layer, part = rest.split(".", 1)
            sel = dict(run=out_run(ds), kind=kind, step=step, layer=int(layer))
            if part.startswith("head"):
                got = [ds[f"head_{m}"].sel(**sel, head=int(part[4:])) for m in ("per", "cn")]
            else:
                got = [ds[m].sel(**sel, matrix=part) for m in ("per", "cn")]
        for metric, a, b in zip(("per", "cn"), (float(got[0]), float(got[1])), (per, cn),
                                strict=True):
            if math.isinf(b) or math.isinf(a):
                if a != b and metric == "cn":
                    judged += 1
                elif a != b:
                    worst = math.inf
            else:
                worst = max(worst, abs(a - b) / abs(b))
    return worst, judged


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of a subprocess, sampled every 20 ms."""
    import psutil

    t0 = time.perf_counter()
    proc = psutil.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with {proc.returncode}")
    return time.perf_counter() - t0, peak / 2**20


def read_only(run: Path) -> float:
    t0 = time.perf_counter()
    for d in ckpt_files(run):
        read_checkpoint(d)
    return time.perf_counter() - t0


def scaling(args) -> None:
    exe = Path(sys.executable).parent / "dynlab"
    rows = []
    for n in (5, 20):
        run = args.workdir / f"pico-small-{n}"
        print(f"generating {run} ...", flush=True)
        generate(run, SMALL, n)
        out = args.workdir / f"scaling-{n}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        t_read = read_only(run)
        t_an, rss = peak_rss_of([str(exe), "analyze", str(run), "--metrics", "per,cn", "-o",
                                 str(out), "--device", args.device, "--no-progress"])
        one = ckpt_files(run)[0]
        ckpt_mib = sum(f.stat().st_size for f in one.glob("*.safetensors")) / 2**20
        rows.append((n, t_an, t_read, rss, ckpt_mib))
    print(f"\nmachine: {os.cpu_count()} CPU threads, torch {torch.__version__}, "
          f"device {args.device}")
    for n, t_an, t_read, rss, ckpt_mib in rows:
        print(f"  {n:2d} checkpoints: analyze {t_an:7.1f} s, read only {t_read:6.1f} s, "
              f"ratio {t_an / t_read:5.2f}; peak RSS {rss:7.0f} MiB = "
              f"{rss / ckpt_mib:4.1f} checkpoints ({ckpt_mib:.0f} MiB each)")


def out_run(ds) -> str:
    return str(ds.run.values[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dynlab-bench"))
    ap.add_argument("--skip-a", action="store_true", help="skip the slow pico-analyze baseline")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scaling", action="store_true", help="5 vs 20 checkpoints: I/O ratio, RSS")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.scaling:
        return scaling(args)
    run = args.workdir / f"pico-small-{args.checkpoints}"
    print(f"generating {run} ...", flush=True)
    generate(run, SMALL, args.checkpoints)
    exe = Path(sys.executable).parent / "dynlab"
    t0 = time.perf_counter()
    subprocess.run([str(exe), "--help"], check=True, capture_output=True)
    t_help = time.perf_counter() - t0
    t_dyn = time_dynlab(run, args.workdir / "bench.zarr", args.device)
    t_b, ref = baseline_b(run, SMALL)
    t_read, t_gram = floor_c(run, SMALL)
    t_floor = t_read + t_gram
    t_a = math.nan if args.skip_a else baseline_a(run, SMALL)
    worst, judged = compare(args.workdir / "bench.zarr", ref, SMALL)
    print(f"\nmachine: {os.cpu_count()} CPU threads, torch {torch.__version__}, "
          f"device {args.device}; {args.checkpoints} checkpoints, {len(ref)} matrices")
    print(f"  dynlab analyze (whole process) {t_dyn:8.1f} s   (`dynlab --help`: {t_help:.2f} s)")
    print(f"  (a) pico-analyze way           {t_a:8.1f} s   a/dynlab = {t_a / t_dyn:5.2f}x")
    print(f"  (b) plain float64 loop         {t_b:8.1f} s   b/dynlab = {t_b / t_dyn:5.2f}x")
    print(f"  (c) floor: reads {t_read:.1f} s + Gram/eigvalsh {t_gram:.1f} s = {t_floor:.1f} s"
          f"   dynlab/c = {t_dyn / t_floor:5.2f}x")
    print(f"  max relative difference dynlab vs (b), per and cn: {worst:.2e}; cn judged "
          f"rank-deficient at the storage precision by dynlab only: {judged} of {len(ref)}")


if __name__ == "__main__":
    main()
