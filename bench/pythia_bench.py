"""The field's sizes on one CPU machine: Pythia-shaped Hugging Face step-runs, analysed.

For each size it writes (once) a run of 3 revisions `step0`, `step1000`, `step2000`, each a
GPT-NeoX model directory saved by transformers' own `save_pretrained` (config.json and
model.safetensors, vocabulary 50 304, Pythia's shapes), with weights structured as a trained
model's rather than i.i.d. noise: every matrix a few strong directions over a noise bulk
(a spiked spectrum, W = G·s/√n + A·diag(σ)·B with σ_i ∝ 1/(i+1) for i < 32, as trained
weights show: Martin & Mahoney, JMLR 2021), embedding rows scaled by a Zipf law of token
frequency, norms 1 and biases 0; each revision drifts from the last by a small update of the
same structure. Then, in one process per size:

  analysis  `dynlab.analyze(RUN, metrics="per,cn")` (the default kinds of such a run: weights
            and updates; every matrix, OV and QK circuit, both embeddings), timed; peak
            resident memory of the process (the kernel's VmHWM) at its end, in checkpoint
            files (one revision's model.safetensors), and the same above what the process
            held before the analysis (interpreter, torch, zarr). Goal: <= 3.
  floor     the same Gram/eigvalsh work on the same matrices already in memory, in the same
            process (each revision's tensors read into memory first, untimed): each dense
            matrix (projections; embeddings; updates W_t - W_prev; circuits whose rank
            bound is their full size) as eigvalsh of its float64 Gram matrix of the shorter
            side, batched by shape; each low-rank product L·R (per-head OV and QK circuits
            and their updates) as eigvalsh of the Gram matrix of its r x r core R_L·R_R^T
            from thin QRs, batched. Goal: analysis <= 1.2 x floor.

Sizes: 70m (d 512, 6 layers, 8 heads), 160m (d 768, 12 layers, 12 heads), 410m (d 1024, 24
layers, 16 heads); `quick`: a tiny GPT-NeoX for the test. Prints a table of seconds per
checkpoint, floor, ratio and peak memory, with the machine's load.

    python bench/pythia_bench.py [--sizes 70m,160m,410m] [--workdir /tmp/dynlab-pythia]
    python bench/pythia_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # hidden_size, layers, heads, intermediate
    "quick": (64, 2, 4, 256),
    "70m": (512, 6, 8, 2048),
    "160m": (768, 12, 12, 3072),
    "410m": (1024, 24, 16, 4096),
}
VOCAB = 50304
STEPS = (0, 1000, 2000)
SPIKES = 32


def structured(shape: tuple[int, ...], g, scale: float = 0.02):
    """A matrix with a spiked spectrum: noise bulk + SPIKES directions of decaying strength."""
    import torch

    m, n = shape
    r = min(SPIKES, m, n)
    sig = 3.0 * scale * torch.arange(1, r + 1, dtype=torch.float32).reciprocal() * (m * n) ** 0.25
    a = torch.randn(m, r, generator=g) / m ** 0.5
    b = torch.randn(r, n, generator=g) / n ** 0.5
    return scale * torch.randn(m, n, generator=g) + (a * sig) @ b


def state_for(shapes: dict[str, tuple[int, ...]], g, prev: dict | None):
    """Revision weights: structured at step 0, then prev + a small structured update."""
    import torch

    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            base = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
            out[name] = base if prev is None else prev[name] + 1e-3 * torch.randn(shape,
                                                                                  generator=g)
            continue
        if prev is None:
            w = structured(shape, g)
            if "embed" in name:  # Zipf: frequent tokens (low ids) have larger rows
                w *= (torch.arange(1, shape[0] + 1, dtype=torch.float32) ** -0.3)[:, None] * 4
        else:
            w = prev[name] + 0.05 * structured(shape, g, scale=0.002)
        out[name] = w
    return out


def write_run(run: Path, size: str) -> None:
    """RUN/step{0,1000,2000}/ (config.json, model.safetensors) through save_pretrained."""
    import torch
    import transformers

    if all((run / f"step{s}" / "model.safetensors").exists() for s in STEPS):
        return
    shutil.rmtree(run, ignore_errors=True)
    d, layers, heads, inter = SIZES[size]
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB if size != "quick" else 1000, hidden_size=d, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=inter, rotary_pct=0.25,
        use_parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.GPTNeoXForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    prev = None
    for step in STEPS:
        sd = state_for(shapes, g, prev)
        model.load_state_dict(sd, assign=True)
        model.save_pretrained(run / f"step{step}")
        prev = sd


def proc_status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """The process's peak resident memory so far (the kernel's VmHWM)."""
    return proc_status("VmHWM")


def resident() -> int:
    """Resident memory now (VmRSS): before the analysis, the interpreter and its imports."""
    return proc_status("VmRSS")


def matrices(w: dict, prev: dict | None, spec) -> tuple[list, list]:
    """(dense matrices as (x, minus) pairs: x − minus for an update, minus None otherwise;
    low-rank (L, R) pairs) of weights and updates, as dynlab forms them: projections,
    embeddings, OV and QK circuits (the layer's and each head's)."""
    import torch

    from dynlab.analysis import components as C

    dense, lowrank = [], []
    pairs = [(w, w, 1.0)] if prev is None else [(w, w, 1.0), (prev, prev, -1.0)]
    for layer in range(spec.n_layers):
        for m in C.LAYER_MATRICES:
            key = f"layers.{layer}.{m}.weight"
            if key in w:
                dense.append((w[key], None if prev is None else prev[key]))
        for circuit in (C.OV, C.QK):
            whole_l, whole_r, head_l, head_r = [], [], [], []
            for lt, rt, sign in pairs:
                f, s = C.weight(lt, layer, circuit.first), C.weight(rt, layer, circuit.second)
                wl, wr = circuit.whole_factors(f, s, spec)
                hl, hr = circuit.head_factors(f.double(), s.double(), spec)
                whole_l.append(sign * wl)
                whole_r.append(wr)
                head_l.append(sign * hl)
                head_r.append(hr)
            wl, wr = torch.cat(whole_l, -1), torch.cat(whole_r, -2)
            hl, hr = torch.cat(head_l, -1), torch.cat(head_r, -2)
            (dense.append((wl @ wr, None)) if wl.shape[-1] >= min(wl.shape[0], wr.shape[1])
             else lowrank.append((wl, wr)))
            lowrank.extend(zip(hl, hr, strict=True))
    for e in C.EMBEDDINGS:
        key = f"{e}.weight"
        dense.append((w[key], None if prev is None else prev[key]))
    return dense, lowrank


def floor(dense: list, lowrank: list) -> float:
    """Seconds of the Gram/eigvalsh work on these matrices, batched by shape (float64)."""
    import torch

    t0 = time.perf_counter()
    groups: dict[tuple, list] = {}
    for x, minus in dense:
        groups.setdefault(tuple(x.shape), []).append((x, minus))
    for shape, xs in groups.items():  # float64 (differences formed) one group at a time
        x = torch.stack([t.double() if m is None else t.double() - m.double() for t, m in xs])
        x = x if shape[0] <= shape[1] else x.mT
        torch.linalg.eigvalsh(x @ x.mT)
        del x
    lgroups: dict[tuple, list] = {}
    for lt, rt in lowrank:
        lgroups.setdefault((tuple(lt.shape), tuple(rt.shape)), []).append((lt, rt))
    for items in lgroups.values():
        lt = torch.stack([a for a, _ in items]).double()
        rt = torch.stack([b for _, b in items]).double()
        core = torch.linalg.qr(lt).R @ torch.linalg.qr(rt.mT).R.mT
        torch.linalg.eigvalsh(core @ core.mT)
    return time.perf_counter() - t0


def measure(run: Path, store: Path) -> dict:
    """In this process: the analysis (time, peak memory), then the floor."""
    import torch

    import dynlab
    from dynlab.sources import load_source_weights, open_sources

    torch.set_num_threads(int(os.environ.get("DYNLAB_BENCH_THREADS", torch.get_num_threads())))
    shutil.rmtree(store, ignore_errors=True)
    file_bytes = (run / f"step{STEPS[0]}" / "model.safetensors").stat().st_size
    import zarr  # noqa: F401  (imported by the analysis: counted in the base, not the work)

    base = resident()
    t0 = time.perf_counter()
    dynlab.analyze([run], store, metrics="per,cn", device="cpu", progress=False)
    t_analysis = time.perf_counter() - t0
    peak = peak_rss()
    (src,) = open_sources([run])
    t_floor, prev = 0.0, None
    for ckpt in src.checkpoints:
        w = {k: v.clone() for k, v in load_source_weights(src, ckpt).items()}  # in memory
        dense, lowrank = matrices(w, None, src.spec)
        t_floor += floor(dense, lowrank)
        del dense, lowrank
        if prev is not None:
            dense, lowrank = matrices(w, prev, src.spec)
            t_floor += floor(dense, lowrank)
            del dense, lowrank
        prev = w
    ds = dynlab.open_store(store)
    finite = float(ds["per"].notnull().mean())
    return {"checkpoints": len(src.checkpoints), "analysis_s": t_analysis, "floor_s": t_floor,
            "peak_bytes": peak, "base_bytes": base, "file_bytes": file_bytes,
            "per_finite_fraction": finite,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="70m,160m,410m")
    ap.add_argument("--quick", action="store_true", help="the tiny size only (the test's)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    ap.add_argument("--measure", nargs=2, type=Path, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    sizes = ["quick"] if args.quick else args.sizes.split(",")
    work = args.workdir or Path(tempfile.gettempdir()) / "dynlab-pythia"
    rows = {}
    print(f"load before: {os.getloadavg()}", flush=True)
    for size in sizes:
        run = work / f"pythia-{size}"
        write_run(run, size)
        p = subprocess.run([sys.executable, __file__, "--measure", str(run),
                            str(work / f"pythia-{size}.zarr")], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{size}: the measuring process failed:\n{p.stderr[-3000:]}")
        rows[size] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{size}: {json.dumps(rows[size])}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{'size':6s} {'file MB':>8s} {'s/ckpt':>8s} {'floor s/ckpt':>13s} "
          f"{'analysis/floor':>15s} {'peak RSS (files)':>17s} {'above imports':>14s}")
    for size, r in rows.items():
        n = r["checkpoints"]
        above = (r["peak_bytes"] - r.get("base_bytes", 0)) / r["file_bytes"]
        print(f"{size:6s} {r['file_bytes'] / 1e6:8.0f} {r['analysis_s'] / n:8.2f} "
              f"{r['floor_s'] / n:13.2f} {r['analysis_s'] / r['floor_s']:15.2f} "
              f"{r['peak_bytes'] / r['file_bytes']:17.2f} {above:14.2f}")
    print(f"threads {next(iter(rows.values()))['threads']}; load after: {os.getloadavg()}")
    for size, r in rows.items():
        n, above = r["checkpoints"], r["peak_bytes"] - r.get("base_bytes", 0)
        print(f"SUMMARY size={size} s_per_checkpoint={r['analysis_s'] / n:.2f} "
              f"analysis/floor={r['analysis_s'] / r['floor_s']:.2f} "
              f"peak_files={r['peak_bytes'] / r['file_bytes']:.2f} "
              f"above_imports_files={above / r['file_bytes']:.2f} "
              f"load={os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
