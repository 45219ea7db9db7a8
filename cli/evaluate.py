"""`dynlab eval`: perplexity and BLiMP accuracy of one checkpoint or every checkpoint of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynlab_cli.options import (
    Device,
    OnError,
    Progress,
    follow_option,
    hub_cache_option,
    keep_downloads_option,
    metrics_option,
    poll_option,
    revisions_option,
    source_format_option,
    until_option,
)


def evaluate(
    targets: Annotated[list[str], typer.Argument(
        help="RUN directory (all its checkpoints) or RUN/checkpoints/step_N; or any source "
        "`dynlab analyze` reads: pico-train / relora-pico runs, Hugging Face model "
        "directories or runs of them, folders of runs, hf://ORG/NAME.",
        show_default=False, metavar="SOURCE...")],
    ppl: Annotated[str | None, typer.Option(
        "--ppl", show_default=False,
        help="Held-out text: directory (one domain per .txt/.jsonl/.jsonl.gz file), a folder "
        "in Paloma's layout (DOMAIN/val|test/*.jsonl.gz with 'text' or 'input_ids'), file "
        "(jsonl may carry a 'source' field), glob, or pre-tokenised .parquet/.arrow. Default: "
        "the embedded grammar's domains; 'none' skips perplexity.")] = None,
    blimp: Annotated[str | None, typer.Option(
        "--blimp", show_default=False,
        help="BLiMP jsonl: directory, file or glob, or 'nyu-mll/blimp' (needs `datasets`). "
        "Default: the embedded grammar's minimal pairs; 'none' skips BLiMP.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Also write the results to this JSON file (one object for a checkpoint, a list "
        "for a dynlab run; {run: [result per step]} for other sources, several sources or "
        "--store).")] = None,
    device: Device = "auto",
    tokenizer: Annotated[Path | None, typer.Option(
        "--tokenizer", show_default=False,
        help="tokenizer.json, or a directory of Hugging Face tokenizer files (default: the "
        "checkpoint's own: RUN/tokenizer.json, or the files beside a Hugging Face "
        "checkpoint).")] = None,
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
    # ---- any source, into a store (dynlab.eval.sources)
    store: Annotated[Path | None, typer.Option(
        "--store", show_default=False,
        help="Write the evaluation into this analysis store (a Zarr store of `dynlab "
        "analyze`, created if missing) as variables over (run, step[, domain/uid/field]); "
        "resumable.")] = None,
    metrics: Annotated[str | None, metrics_option(
        "--store: the spectral metrics of a store created here (default all), as the "
        "`dynlab analyze -m` that will share it.")] = None,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", min=1, show_default=False,
        help="Perplexity window in tokens (default and maximum: the model's context); longer "
        "documents are scored in strided windows.")] = None,
    split: Annotated[str, typer.Option(
        "--split", help="Paloma layout: the split folder scored (val or test).")] = "val",
    autocast: Annotated[str, typer.Option(
        "--autocast", help="none, bf16 or fp16: autocast the forward passes on CUDA.")] = "none",
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Model parameters: float32, bfloat16 or float16.")] = "float32",
    fmt: Annotated[str | None, source_format_option()] = None,
    revisions: Annotated[str | None, revisions_option()] = None,
    keep_downloads: Annotated[bool, keep_downloads_option("loaded")] = False,
    hub_cache: Annotated[Path | None, hub_cache_option()] = None,
    follow: Annotated[bool, follow_option("Evaluate", "evaluated")] = False,
    until: Annotated[int | None, until_option("evaluated")] = None,
    poll: Annotated[float, poll_option()] = 2.0,
    wait: Annotated[bool, typer.Option(
        "--wait", help="--store: if another dynlab command is writing the store, wait for it "
        "instead of exiting with an error.")] = False,
) -> None:
    """Perplexity, mean token loss and bits per byte per domain, and BLiMP accuracy, at the
    checkpoints of any source; a dynlab run's results go to step_N/eval.json, and with
    --store every source's go into an analysis store (resumable).

    Exit status (dynlab_cli.console): 2 for bad input (a missing run, tokenizer or data file,
    a malformed line, a truncated checkpoint under --on-error fail), 1 when --on-error skip
    skipped a checkpoint (after evaluating the others and writing -o), 130 on Ctrl-C."""
    from dynlab_cli.console import guarded
    source_options = dict(store=store, metrics=metrics, max_length=max_length, split=split,
                          autocast=autocast, dtype=dtype, fmt=fmt, revisions=revisions,
                          keep_downloads=keep_downloads, hub_cache=hub_cache, follow=follow,
                          until=until, poll=poll, wait=wait)
    if not plain_dynlab_target(targets, source_options):
        with guarded("eval"):
            from dynlab_cli.options import resolve

            results, skipped = evaluate_any(targets, ppl=ppl, blimp=blimp, out=out,
                                            device=resolve(device), tokenizer=tokenizer,
                                            uid=uid, on_error=on_error.value,
                                            batch_size=batch_size, limit=limit,
                                            stride=stride, progress=progress,
                                            **source_options)
        for name, res in results.items():
            if res:
                from dynlab_cli.console import note

                note(f"run {name}")
                print_tables(res)
        if store is not None:
            print(store)
        if skipped:
            from dynlab.errors import DynlabFailure

            with guarded("eval"):
                raise DynlabFailure(f"{len(skipped)} checkpoint(s) skipped: "
                                    f"{', '.join(skipped)}")
        return
    target = Path(targets[0])
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



def plain_dynlab_target(targets: list[str], source_options: dict) -> bool:
    """One local target, no store nor source option: the run (or checkpoint) evaluation that
    writes step_N/eval.json (a dynlab run, or a path whose error message it gives)."""
    defaults = dict(store=None, metrics=None, max_length=None, split="val", autocast="none",
                    dtype="float32", fmt=None, revisions=None, keep_downloads=False,
                    hub_cache=None, follow=False, until=None, poll=2.0, wait=False)
    if len(targets) != 1 or targets[0].startswith("hf://") or source_options != defaults:
        return False
    path = Path(targets[0])
    if not path.is_dir():
        return True
    from dynlab.sources import detect_format

    kind = detect_format(path)
    if kind == "dynlab" or (path / "weights.safetensors").is_file() or (
            path.parent.name == "checkpoints" and (path.parent.parent / "run.json").is_file()):
        return True
    if kind is not None:
        return False
    return not any(detect_format(c) not in (None, "dynlab") for c in path.iterdir()
                   if c.is_dir())


def evaluate_any(targets: list[str], *, ppl: str | None, blimp: str | None, out: Path | None,
                 device: str, tokenizer: Path | None, uid: str | None, on_error: str,
                 batch_size: int, limit: int | None, stride: int | None, progress: bool,
                 store: Path | None, metrics: str | None, max_length: int | None,
                 split: str, autocast: str, dtype: str, fmt: str | None,
                 revisions: str | None, keep_downloads: bool,
                 hub_cache: Path | None, follow: bool, until: int | None, poll: float,
                 wait: bool) -> tuple[dict[str, list[dict]], list[str]]:
    """dynlab.eval.sources.evaluate_sources with a progress bar; writes `out` (JSON: {run:
    [result per checkpoint]}). Returns (results, checkpoints skipped under --on-error skip)."""
    import warnings

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dynlab.eval import EvalDataWarning, load_eval_data
    from dynlab.eval.sources import DataSpec, EvalOptions, evaluate_sources, result_json
    from dynlab.runs.files import write_json
    from dynlab_cli.console import console, warn

    passed_over: list[str] = []
    options = EvalOptions(device=device, batch_size=batch_size, max_length=max_length,
                          stride=stride, autocast=autocast, dtype=dtype, tokenizer=tokenizer,
                          on_error=on_error).check()
    data = load_eval_data(ppl, blimp, uid_filter=uid, limit_per_uid=limit, on_error=on_error,
                          split=split)
    spec = DataSpec(ppl=ppl, blimp=blimp, split=split, uid=uid, limit=limit)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with warnings.catch_warnings(), Progress(*columns, console=console, transient=True,
                                             disable=not progress) as bar:
        warnings.simplefilter("always", EvalDataWarning)
        task = bar.add_task("evaluating", total=None)

        def started(run, ckpt) -> None:
            bar.update(task, description=f"{run.name} step {ckpt.step}", completed=0,
                       total=None)

        def tick(run: str, step: int, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def skipped(run, ckpt, err: BaseException) -> None:
            warn(f"skipped {run.name} step {ckpt.step} ({ckpt.path}): {err}")
            passed_over.append(f"{run.name}@{ckpt.step}")

        results = evaluate_sources(targets, data, options, spec=spec, store=store, fmt=fmt,
                                   revisions=revisions, keep_downloads=keep_downloads,
                                   cache_dir=hub_cache, follow=follow, until=until,
                                   poll=poll, wait=wait, metrics=metrics, progress=tick,
                                   started=started, skipped=skipped)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result_json(results))
    return results, passed_over


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
