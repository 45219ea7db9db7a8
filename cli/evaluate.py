"""`dynlab eval`: perplexity and BLiMP accuracy of one checkpoint or every checkpoint of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynlab_cli.options import Device, OnError, Progress


def evaluate(
    target: Annotated[Path, typer.Argument(
        help="RUN directory (all its checkpoints) or RUN/checkpoints/step_N.",
        show_default=False)],
    ppl: Annotated[str | None, typer.Option(
        "--ppl", show_default=False,
        help="Held-out text: directory (one domain per .txt/.jsonl file), file (jsonl may "
        "carry a 'source' field) or glob. Default: the embedded grammar's domains; 'none' "
        "skips perplexity.")] = None,
    blimp: Annotated[str | None, typer.Option(
        "--blimp", show_default=False,
        help="BLiMP jsonl: directory, file or glob, or 'nyu-mll/blimp' (needs `datasets`). "
        "Default: the embedded grammar's minimal pairs; 'none' skips BLiMP.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Also write the results to this JSON file (one object for a checkpoint, a list "
        "for a run).")] = None,
    device: Device = "auto",
    tokenizer: Annotated[Path | None, typer.Option(
        "--tokenizer", show_default=False,
        help="tokenizer.json (default: RUN/tokenizer.json).")] = None,
    uid: Annotated[str | None, typer.Option(
        "--uid", show_default=False,
        help="Comma list of BLiMP UIDs or glob patterns, e.g. 'anaphor_*,island*'.")] = None,
    on_error: Annotated[OnError, typer.Option(
        "--on-error", help="Malformed input lines, empty or too long pairs, failing "
        "checkpoints: fail at once, or skip them (exit 1 at the end).")] = OnError.fail,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Sequences per forward pass.")] = 32,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, show_default=False,
        help="At most this many pairs per BLiMP UID (first in file order).")] = None,
    stride: Annotated[int | None, typer.Option(
        "--stride", min=1, show_default=False,
        help="Overlapping perplexity windows advancing by this many tokens (default: "
        "non-overlapping windows of the model's context).")] = None,
    progress: Progress = True,
) -> None:
    """Perplexity per domain and BLiMP accuracy at checkpoints; writes step_N/eval.json.

    Exit status (dynlab_cli.console): 2 for bad input (a missing run, tokenizer or data file,
    a malformed line, a truncated checkpoint under --on-error fail), 1 when --on-error skip
    skipped a checkpoint (after evaluating the others and writing -o), 130 on Ctrl-C."""
    from dynlab_cli.console import guarded
    with guarded("eval"):
        from dynlab_cli.options import resolve

        results, skipped = evaluate_target(target, ppl=ppl, blimp=blimp, out=out,
                                           device=resolve(device), tokenizer=tokenizer,
                                           uid=uid, on_error=on_error.value,
                                           batch_size=batch_size, limit=limit, stride=stride,
                                           progress=progress)
    print_tables(results)
    if out is not None and results:
        from dynlab_cli.console import note

        note(f"wrote {out}")
    if skipped:
        from dynlab.errors import DynlabFailure

        with guarded("eval"):
            raise DynlabFailure(f"{len(skipped)} checkpoint(s) skipped: {', '.join(skipped)}")



def evaluate_target(target: Path, *, ppl: str | None, blimp: str | None, out: Path | None,
                    device: str, tokenizer: Path | None, uid: str | None, on_error: str,
                    batch_size: int, limit: int | None, stride: int | None,
                    progress: bool = True) -> tuple[list[dict], list[str]]:
    """dynlab.eval.evaluate_run with a progress bar and warnings on the console; writes `out`
    (JSON: an object for a checkpoint, a list for a run) with what was evaluated, also when a
    checkpoint fails under on_error 'fail' (which then raises). Returns (results, skipped)."""
    import warnings

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dynlab.eval import CheckpointEvalError, EvalDataWarning, evaluate_run, find_checkpoints
    from dynlab.runs.files import write_json
    from dynlab_cli.console import checkpoint_error, console, warn

    ckpts = find_checkpoints(target)
    single = len(ckpts) == 1 and ckpts[0].resolve() == target.resolve()

    def finish(results: list[dict]) -> None:
        if out is not None and results:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, results[0] if len(results) == 1 and single else results)

    passed_over: list[str] = []
    tasks: dict[Path, object] = {}
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with warnings.catch_warnings(), Progress(*columns, console=console, transient=False,
                                             disable=not progress) as bar:
        warnings.simplefilter("always", EvalDataWarning)
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
            warn(f"skipped {ckpt}: {err}")
            passed_over.append(str(ckpt))

        try:
            results = evaluate_run(target, ppl, blimp, tokenizer=tokenizer, uid=uid,
                                   limit=limit, device=device, batch_size=batch_size,
                                   stride=stride, on_error=on_error, progress=tick,
                                   finished=finished, skipped=skipped)
        except CheckpointEvalError as err:
            bar.stop()
            finish(err.results)
            raise checkpoint_error(err.checkpoint, err.error) from err.error
    finish(results)
    return results, passed_over


def print_tables(results: list[dict]) -> None:
    """`dynlab eval`'s tables on stdout: a row per step (macro perplexity, BLiMP overall and
    per field), then the last step's perplexity by domain and BLiMP by UID (up to 20)."""
    from rich.table import Table

    if not results:
        return
    from dynlab_cli.console import plain
    from dynlab_cli.console import stdout as out

    fields = sorted({f for r in results for f in r.get("blimp", {}).get("by_field", {})})
    summary = Table(title="evaluation")
    for col in ["step", "ppl macro", "BLiMP overall", *fields]:
        summary.add_column(plain(col), justify="right")
    for r in results:
        ppl = r.get("perplexity", {}).get("macro")
        bl = r.get("blimp", {})
        summary.add_row(str(r["step"]), "-" if ppl is None else f"{ppl:.3f}",
                        "-" if "overall" not in bl else f"{bl['overall']:.3f}",
                        *[f"{bl.get('by_field', {}).get(f, float('nan')):.3f}" for f in fields])
    out.print(summary)
    last = results[-1]
    if "perplexity" in last:
        table = Table(title=f"perplexity by domain (step {last['step']})")
        table.add_column("domain")
        table.add_column("ppl", justify="right")
        for dom, v in last["perplexity"]["by_domain"].items():
            table.add_row(plain(dom), f"{v:.3f}")
        out.print(table)
    if "blimp" in last and len(last["blimp"]["by_uid"]) <= 20:
        table = Table(title=f"BLiMP by UID (step {last['step']})")
        table.add_column("UID")
        table.add_column("accuracy", justify="right")
        for u, v in last["blimp"]["by_uid"].items():
            table.add_row(plain(u), f"{v:.3f}")
        out.print(table)
