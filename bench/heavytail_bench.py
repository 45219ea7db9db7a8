"""Cost of WeightWatcher's heavy-tail family (dynlab.analysis.heavytail) in `dynlab analyze`.

Writes a `make demo`-sized pair of runs (the micro preset: 4 layers, d_model 64, 4 heads sharing
2 kv heads, hidden 256, vocabulary 2048; a decoder and a ReLoRA run, checkpoints every 50 of 600
steps, weights and grads; dynlab.testing.make_run) and times, in this one process and
alternating the order, the analysis of both runs with

  before   the default metrics without the family (what `dynlab analyze` computed before it)
  after    the default metrics (the family's spectral metrics included)
  + rand   the defaults plus the opt-in correlation traps (-m all)
  + tails  the defaults plus the other tail fits (--tails: xmin_peak's alpha_peak* and the
           truncated power law tpl_*)

Prints seconds (median of --repeats) and the ratios after/before and +rand/before; record them
in bench/RESULTS.md with the machine and its load (`uptime`).

    python bench/heavytail_bench.py [--checkpoints 13] [--repeats 2] [--no-rand] [--tails]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

FAMILY = ("log_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "mp_sigma",
          "mp_sigma2", "mp_bulk_max", "num_spikes", "mp_softrank", "over_trained",
          "under_trained")
TAILS = ("alpha_peak", "alpha_peak_ks", "alpha_peak_n_tail", "tpl_alpha", "tpl_lambda",
         "tpl_llr", "tpl_p")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=13)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-rand", action="store_true", help="skip the +rand timing")
    ap.add_argument("--tails", action="store_true", help="add the +tails timing")
    args = ap.parse_args()

    import dynlab
    from dynlab.analysis.metrics import DEFAULT_METRICS, METRICS
    from dynlab.runs.checkpoints import ModelSpec
    from dynlab.testing import make_run

    spec = ModelSpec(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, activation_hidden_dim=256,
                     vocab_size=2048)
    steps = [50 * i for i in range(args.checkpoints)]
    before = [m for m in DEFAULT_METRICS if m not in FAMILY]
    routes = {"before": before, "after": list(DEFAULT_METRICS)}
    if not args.no_rand:
        routes["+rand"] = [m for m in METRICS if m not in TAILS]
    if args.tails:
        routes["+tails"] = list(DEFAULT_METRICS) + list(TAILS)
    root = Path(tempfile.mkdtemp(prefix="dynlab-htsr-bench-"))
    try:
        runs = [make_run(root / "decoder", spec, steps, seed=1),
                make_run(root / "relora", spec, steps, seed=2,
                         relora={"r": 8, "alpha": 16, "reset_every": 100})]
        times: dict[str, list[float]] = {k: [] for k in routes}
        for rep in range(args.repeats):
            order = list(routes) if rep % 2 == 0 else list(reversed(routes))
            for name in order:
                out = root / f"{name}-{rep}.zarr"
                t = time.perf_counter()
                dynlab.analyze(runs, out, metrics=routes[name], progress=False, device="cpu")
                times[name].append(time.perf_counter() - t)
                shutil.rmtree(out)
                print(f"  {name:7s} repeat {rep}: {times[name][-1]:.1f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{len(steps)} checkpoints x 2 runs, metrics before: {len(before)}, after: "
              f"{len(DEFAULT_METRICS)}")
        for k, v in med.items():
            print(f"{k:7s} {v:8.1f} s   ratio to before {v / med['before']:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
