"""What `dynlab study run` costs over calling the library by hand, and what --jobs gains.

Baseline (same process): a grid of 2 conditions × SEEDS seeds of a tiny model trained with
dynlab.train, evaluated with dynlab.eval.evaluate_run and analysed with dynlab.analyze, one
after another. Then the same grid through `run_study` sequentially and with --jobs 2, each into
a fresh folder. Prints wall times and the ratios to the baseline.

    python bench/study_bench.py [--seeds 2] [--steps 40]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml

COMMON = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=64,
              seq_len=32, batch_size=4, ld_batch_size=4, vocab_size=300, n_documents=300,
              eval_every=0, checkpoint_every=10, warmup_steps=2, log_every=1, threads=1)
RELORA = dict(reset_every=10, restart_warmup_steps=2, lora_rank=4)


def by_hand(root: Path, seeds: int, steps: int) -> float:
    import dynlab
    from dynlab.eval import evaluate_run

    t = time.perf_counter()
    runs = []
    for s in range(seeds):
        for kind in ("decoder", "relora"):
            run = root / f"{kind}-s{s}"
            dynlab.train(kind, out=str(run), seed=s, steps=steps, progress=False, **COMMON,
                         **(RELORA if kind == "relora" else {}))
            evaluate_run(run, limit=5)
            runs.append(run)
    dynlab.analyze(runs, root / "analysis.zarr", metrics="per,cn,cn_nz", progress=False)
    return time.perf_counter() - t


def study(root: Path, seeds: int, steps: int, jobs: int) -> float:
    from dynlab.experiment import load_study, run_study

    spec = {"seeds": list(range(seeds)), "common": {**COMMON, "steps": steps},
            "conditions": {"decoder": {"kind": "decoder"},
                           "relora": {"kind": "relora", "overrides": RELORA}},
            "eval": {"limit": 5}, "analyze": {"metrics": "per,cn,cn_nz"}}
    path = root / "study.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    t = time.perf_counter()
    run_study(load_study(path), root / "out", jobs=jobs, progress=False, say=lambda s: None)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dynlab-study-bench-"))
    try:
        base = by_hand(tmp / "hand", args.seeds, args.steps)
        seq = study(tmp / "seq", args.seeds, args.steps, 1)
        par = study(tmp / "jobs2", args.seeds, args.steps, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"grid: 2 conditions x {args.seeds} seeds, {args.steps} steps")
    print(f"by hand (train, eval, analyze)   {base:8.1f} s   1.00")
    print(f"dynlab study run                 {seq:8.1f} s   {seq / base:.2f}")
    print(f"dynlab study run --jobs 2        {par:8.1f} s   {par / base:.2f}")


if __name__ == "__main__":
    main()
