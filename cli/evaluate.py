"""`dynlab eval`: perplexity and BLiMP accuracy of one checkpoint or every checkpoint of a run."""

from __future__ import annotations

from pathlib import Path

import typer


def evaluate(
    target: Path = typer.Argument(..., help="RUN directory (all its checkpoints) or "
                                  "RUN/checkpoints/step_N."),
    ppl: str | None = typer.Option(
        None, "--ppl", help="Held-out text: directory (one domain per .txt/.jsonl file), file "
        "(jsonl may carry a 'source' field) or glob. Default: the embedded grammar's domains; "
        "'none' skips perplexity."),
    blimp: str | None = typer.Option(
        None, "--blimp", help="BLiMP jsonl: directory, file or glob, or 'nyu-mll/blimp' (needs "
        "`datasets`). Default: the embedded grammar's minimal pairs; 'none' skips BLiMP."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results here "
                                         "(one object for a checkpoint, a list for a run)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps or auto."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer",
                                          help="tokenizer.json (default: RUN/tokenizer.json)."),
    uid: str | None = typer.Option(None, "--uid", help="Comma-separated BLiMP UIDs or glob "
                                   "patterns, e.g. 'anaphor_*,island*'."),
    on_error: str = typer.Option("fail", "--on-error", help="skip|fail: malformed input lines, "
                                 "empty or too long pairs, failing checkpoints."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Sequences per forward pass."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many pairs "
                                     "per BLiMP UID (first in file order)."),
    stride: int | None = typer.Option(None, "--stride", min=1, help="Overlapping perplexity "
                                      "windows advancing by this many tokens (default: "
                                      "non-overlapping windows of the model's context)."),
) -> None:
    """Perplexity per domain and BLiMP accuracy at checkpoints; writes step_N/eval.json.

    Exit status (dynlab_cli.console): 2 for bad input (a missing run, tokenizer or data file,
    a malformed line, a truncated checkpoint under --on-error fail), 1 when --on-error skip
    skipped a checkpoint (after evaluating the others and writing --json), 130 on Ctrl-C."""
    from dynlab_cli.console import guarded

    if on_error not in ("skip", "fail"):
        raise typer.BadParameter("expected 'skip' or 'fail'", param_hint="--on-error")
    with guarded("eval"):
        _evaluate(target, ppl, blimp, json_out, device, tokenizer, uid, on_error, batch_size,
                  limit, stride)


def _evaluate(target: Path, ppl: str | None, blimp: str | None, json_out: Path | None,
              device: str, tokenizer: Path | None, uid: str | None, on_error: str,
              batch_size: int, limit: int | None, stride: int | None) -> None:
    import warnings

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from dynlab.eval import CheckpointEvalError, EvalDataWarning, evaluate_run, find_checkpoints
    from dynlab.runs.files import write_json
    from dynlab_cli.console import error, exit_code

    console = Console(stderr=True, soft_wrap=True)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        console.print(f"[yellow]warning:[/] {escape(str(message))}", markup=True,
                      highlight=False)

    ckpts = find_checkpoints(target)
    single = len(ckpts) == 1 and ckpts[0].resolve() == target.resolve()

    def finish(results: list[dict]) -> None:
        if json_out is not None and results:
            payload = results[0] if len(results) == 1 and single else results
            json_out.parent.mkdir(parents=True, exist_ok=True)
            write_json(json_out, payload)
            console.print(f"wrote {json_out}")

    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    failed: list[str] = []
    tasks: dict[Path, object] = {}
    with warnings.catch_warnings(), Progress(*columns, console=console,
                                             transient=False) as bar:
        warnings.simplefilter("always", EvalDataWarning)
        warnings.showwarning = show_warning
        run_task = bar.add_task("checkpoints", total=len(ckpts))

        def tick(ckpt: Path, done: int, total: int) -> None:
            if ckpt not in tasks:
                tasks[ckpt] = bar.add_task(f"  {ckpt.name}", total=None)
            bar.update(tasks[ckpt], completed=done, total=total)

        def finished(ckpt: Path) -> None:
            if ckpt in tasks:
                bar.remove_task(tasks.pop(ckpt))
            bar.advance(run_task)

        def skipped(ckpt: Path, err: BaseException) -> None:
            console.print(f"[yellow]skipped[/] {escape(f'{ckpt}: {err}')}", markup=True,
                          highlight=False)
            failed.append(str(ckpt))

        try:
            results = evaluate_run(target, ppl, blimp, tokenizer=tokenizer, uid=uid, limit=limit,
                                   device=device, batch_size=batch_size, stride=stride,
                                   on_error=on_error, progress=tick, finished=finished,
                                   skipped=skipped)
        except CheckpointEvalError as err:
            bar.stop()
            error(f"{err.checkpoint}: {err.error}", "eval ")
            finish(err.results)
            raise typer.Exit(exit_code(err.error)) from None

    _print_tables(Console(), results, Table)
    finish(results)
    if failed:
        console.print(f"[yellow]{len(failed)} checkpoint(s) skipped[/]: {', '.join(failed)}")
        raise typer.Exit(1)


def _print_tables(console, results: list[dict], Table) -> None:
    """A row per step (macro perplexity, BLiMP overall and per field); details of the last."""
    if not results:
        return
    fields = sorted({f for r in results for f in r.get("blimp", {}).get("by_field", {})})
    summary = Table(title="evaluation")
    for col in ["step", "ppl macro", "BLiMP overall", *fields]:
        summary.add_column(col, justify="right")
    for r in results:
        ppl = r.get("perplexity", {}).get("macro")
        bl = r.get("blimp", {})
        summary.add_row(str(r["step"]), "-" if ppl is None else f"{ppl:.3f}",
                        "-" if "overall" not in bl else f"{bl['overall']:.3f}",
                        *[f"{bl.get('by_field', {}).get(f, float('nan')):.3f}" for f in fields])
    console.print(summary)
    last = results[-1]
    if "perplexity" in last:
        table = Table(title=f"perplexity by domain (step {last['step']})")
        table.add_column("domain")
        table.add_column("ppl", justify="right")
        for dom, v in last["perplexity"]["by_domain"].items():
            table.add_row(dom, f"{v:.3f}")
        console.print(table)
    if "blimp" in last and len(last["blimp"]["by_uid"]) <= 20:
        table = Table(title=f"BLiMP by UID (step {last['step']})")
        table.add_column("UID")
        table.add_column("accuracy", justify="right")
        for u, v in last["blimp"]["by_uid"].items():
            table.add_row(u, f"{v:.3f}")
        console.print(table)
