"""`make demo`: the whole study in one command, offline, on a laptop CPU.

Trains a micro pico-decoder and a micro pico-relora on the embedded grammar corpus (same data,
same seed, same number of steps; ReLoRA resets scaled down to every 100 steps), evaluates them
at every checkpoint (perplexity on held-out domains, BLiMP-format grammar minimal pairs),
analyses both runs into one store, writes the offline HTML report (and a PNG of its top when
Chromium is available) and prints the paths and a table of what the runs produced.

    python -m dynlab.demo [--out demo_out] [--steps 600] [--reset-every 100]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

DEFAULTS = {"steps": 600, "checkpoint_every": 50, "reset_every": 100, "restart_warmup_steps": 10,
            "warmup_steps": 25, "seed": 0}
#: the function-space dynamics of the demo (dynlab.analysis.dynamics.DynamicsOptions): the
#: learning-dynamics batch cropped to 8 × 32 tokens (the Hessian on 4 of them), 8 Lanczos
#: steps, 4 Hutchinson probes — sized so that every checkpoint of both runs costs about as
#: much as the demo's analysis (bench/dynamics_bench.py)
DEMO_DYNAMICS = {"n_seq": 8, "seq_len": 32, "hessian_seq": 4, "iters": 8, "probes": 4}


def _fmt(v: float, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def demo_table(ds) -> list[dict]:
    """Per run: final train loss, macro perplexity, grammar-BLiMP accuracy and mean PER of
    weights and of updates (over layers and matrices at the last analysed step), read from
    the store."""
    from dynlab.viz.figures import summary_table

    tab = summary_table(ds)
    return [{"run": run, "step": row["final step"], "loss": row["final loss"],
             "ppl": row["perplexity"], "blimp": row["BLiMP"], "per_w": row["PER weights"],
             "per_u": row["PER updates"]} for run, row in tab.iterrows()]


def print_table(rows: list[dict]) -> None:
    """The demo's summary table (rich), every number as read from the store."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="what the two runs produced (last checkpoint)")
    for col in ("run", "step", "train loss", "perplexity", "grammar BLiMP", "PER weights",
                "PER updates"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        table.add_row(str(r["run"]), _fmt(r["step"], 6), _fmt(r["loss"]), _fmt(r["ppl"]),
                      _fmt(r["blimp"], 3), _fmt(r["per_w"], 3), _fmt(r["per_u"], 3))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dynlab.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    for name, value in DEFAULTS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=value,
                        help=f"default {value}")
    ap.add_argument("--no-screenshot", action="store_true", help="skip report.png")
    ap.add_argument("--no-dynamics", action="store_true",
                    help="skip the function-space dynamics (sharpness, barriers, gradient "
                    "noise, attention)")
    args = ap.parse_args(argv)

    import dynlab
    from dynlab.viz import report as R

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"decoder": out / "decoder", "relora": out / "relora"}
    store, html, png = out / "analysis.zarr", out / "report.html", out / "report.png"
    timings: dict[str, float] = {}
    # activations at 16 seeded positions of each of the 16 learning-dynamics sequences (256
    # samples: enough for CKA/PWCCA of the 64-wide residual stream), for the report's
    # Representations sections
    common = dict(steps=args.steps, checkpoint_every=args.checkpoint_every,
                  warmup_steps=args.warmup_steps, seed=args.seed, overwrite=True,
                  save_activations=True, activation_positions="sample:16")
    t_all = time.perf_counter()
    for kind, path in runs.items():
        print(f"\n== training {kind}: {args.steps} steps, checkpoints every "
              f"{args.checkpoint_every}" + (f", resets every {args.reset_every}"
                                            if kind == "relora" else "") + f" -> {path}")
        t = time.perf_counter()
        extra = (dict(reset_every=args.reset_every,
                      restart_warmup_steps=args.restart_warmup_steps)
                 if kind == "relora" else {})
        dynlab.train(kind, out=str(path), **common, **extra)
        timings[f"train {kind}"] = time.perf_counter() - t

    print(f"\n== analysing both runs -> {store}")
    if store.exists():
        shutil.rmtree(store)  # the runs were just retrained: stale results must go
    t = time.perf_counter()
    dynlab.analyze([runs["decoder"], runs["relora"]], out=store)
    timings["analyze"] = time.perf_counter() - t
    if not args.no_dynamics:
        print(f"\n== function-space dynamics of both runs -> {store}")
        t = time.perf_counter()
        dynlab.analyze([runs["decoder"], runs["relora"]], out=store, dynamics="all",
                       dynamics_options=DEMO_DYNAMICS)
        timings["dynamics"] = time.perf_counter() - t

    print(f"\n== report -> {html}")
    t = time.perf_counter()
    _, ds, sections = R.write_report(
        [store], html, title="dynlab demo: micro decoder vs micro ReLoRA (embedded grammar "
                              f"corpus, {args.steps} steps)")
    timings["report"] = time.perf_counter() - t
    shot = None
    if not args.no_screenshot:
        try:
            shot = R.screenshot(html, png, width=1280, height=1700)
        except (RuntimeError, OSError) as e:
            print(f"no screenshot: {e}")
    timings["total"] = time.perf_counter() - t_all

    print_table(demo_table(ds))
    print("PER: proportional effective rank, mean over layers and matrices at the last analysed "
          "step (updates: change since the previous checkpoint). One seed, micro model: "
          "differences between the runs are not evidence beyond this setting.")
    print("\nwrote:")
    for label, path in [("decoder run", runs["decoder"]), ("relora run", runs["relora"]),
                        ("analysis store", store),
                        (f"report ({R.n_figures(sections)} figures)", html),
                        ("report screenshot", shot)]:
        if path is not None:
            print(f"  {label:<22} {path}")
    print("  " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"\nexplore: DYNLAB_STORE={store.resolve()} jupyter lab notebooks/explore.ipynb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
