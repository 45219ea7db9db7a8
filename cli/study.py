"""`dynlab study run|report`: a grid of conditions × seeds trained, evaluated and analysed
into one store, and the study's claims judged across seeds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from dynlab_cli.options import Progress

app = typer.Typer(
    help="Studies: a grid of conditions × seeds (one YAML file) run anywhere, and its claims "
    "with confidence intervals across seeds.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


@app.command("run")
def run(
    study: Annotated[Path, typer.Argument(help="The study file (YAML: seeds, conditions, ...).",
                                          show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: runs/, "
                                      "analysis.zarr, study.json.")] = Path("study_out"),
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Local processes training "
                                      "runs at once (CPU threads divided among them).")] = 1,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", show_default=False,
        help="Dask: 'local:N' or 'tcp://HOST:PORT' (runs and analysis on the cluster).")] = None,
    slurm: Annotated[bool, typer.Option(
        "--slurm", help="One submitit job per run, with the study file's `slurm:` "
        "parameters.")] = False,
    device: Annotated[str | None, typer.Option(
        "--device", show_default=False, help="Where the analysis computes spectra (default: "
        "the study file's analyze.device, else auto).")] = None,
    progress: Progress = True,
    report: Annotated[bool, typer.Option("--report/--no-report",
                                         help="Print the claims table at the end.")] = True,
) -> None:
    """Train, evaluate and analyse every (condition, seed) of STUDY into OUT. Completed runs
    are skipped and interrupted ones continued: rerun the same command after Ctrl-C."""
    from dynlab_cli.console import console, guarded

    with guarded("study run"):
        from dynlab.experiment.runner import run_study
        from dynlab.experiment.studyfile import load_study

        if device is not None:
            from dynlab_cli.options import resolve

            resolve(device)
        result = run_study(load_study(study), out, jobs=jobs, scheduler=scheduler,
                           slurm=slurm, progress=progress, device=device,
                           say=lambda s: console.print(s, markup=False))
        if report and result.store is not None:
            show_claims(out)
    print(out)


def show_claims(out: Path, json_out: Path | None = None) -> list:
    """Judge the claims of the study in OUT, print the table, write OUT/claims.json."""
    from dynlab.experiment.claims import claims_json, judge, observe
    from dynlab.experiment.runner import STORE_NAME, read_design
    from dynlab.runs.files import write_json
    from dynlab.viz.report import open_store

    design = read_design(out)
    ds = open_store(Path(out) / STORE_NAME)
    runs = {r: Path(out) / "runs" / r for r in design["runs"]}
    results = judge(observe(ds, design, runs), design)
    write_json(json_out or Path(out) / "claims.json", claims_json(results, design))
    print_claims(results, design)
    return results


def _num(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:.3g}"


def print_claims(results: list, design: dict) -> None:
    """The claims table (rich) on stdout."""
    from rich.table import Table

    from dynlab_cli.console import stdout

    colours = {"supported": "green", "contradicted": "red", "inconclusive": "yellow"}
    level = results[0].verdict_level if results else 0.95
    table = Table(
        title=f"claims of study {design.get('name')} (95% CI across seeds; verdict at the "
        f"family level {level:.4g})",
        caption="method: paired t (ReLoRA − decoder by seed), t (one sample), bootstrap "
        "percentile (median), Welch t (between scales)")
    for col in ("claim", "scale", "effect", "95% CI", "n", "method", "verdict"):
        table.add_column(col, justify="right" if col in ("effect", "n") else "left")
    for r in results:
        ci = f"[{_num(r.lo)}, {_num(r.hi)}]"
        table.add_row(r.id, r.scale, _num(r.effect), ci, str(r.n), r.method,
                      f"[{colours[r.verdict]}]{r.verdict}[/]")
    stdout.print(table)
    for r in results:
        if r.note:
            stdout.print(f"{r.id} ({r.scale}): {r.note}", markup=False)


@app.command("report")
def report(
    out: Annotated[Path, typer.Argument(help="The --out folder of `dynlab study run`.",
                                        show_default=False)],
    json_out: Annotated[Path | None, typer.Option(
        "--json", show_default=False, help="Also write the table here (default "
        "OUT/claims.json).")] = None,
    html: Annotated[Path | None, typer.Option(
        "--html", show_default=False, help="Write the HTML report (Claims first) here.")] = None,
) -> None:
    """The study's claims: effect size, 95% confidence interval across seeds, number of
    seeds and verdict for each (table on stdout, JSON in OUT/claims.json)."""
    from dynlab_cli.console import guarded

    with guarded("study report"):
        results = show_claims(out, json_out)
        if html is not None:
            from dynlab.experiment.runner import STORE_NAME, read_design
            from dynlab.viz.report import write_report

            design = read_design(out)
            write_report([Path(out) / STORE_NAME], html, title=f"study {design.get('name')}",
                         claims=[r.as_dict() for r in results])
            print(html)
