"""Evaluate every checkpoint of any source (`dynlab.sources`), optionally into an analysis
store.

    results = evaluate_sources(["runs/pythia-mini", "hf://ORG/NAME"], data, options)
    evaluate_sources(paths, data, options, store="analysis.zarr")

Each checkpoint runs as `dynlab.sources.models.load_causal_lm` gives it (PicoDecoder for
dynlab / pico-train / relora-pico runs, transformers' own class for Hugging Face checkpoints)
with its own tokenizer (or `options.tokenizer`), and is scored by `dynlab.eval.evaluate`
(windows of `max_length` tokens advancing by `stride`; the tokenised data is made once per
tokenizer). A dynlab run's result is also merged into its step_N/eval.json, as `dynlab eval
RUN` does; nothing is written into the directories of other sources.

Into a store (`store=`), under its lock (`dynlab.analysis.storelock`), checkpoint by
checkpoint: the store is created or grown for these runs, steps and labels (as `dynlab
analyze` would: the same template), then each checkpoint's values are written as a (run, step)
region (`dynlab.analysis.store.write_meta_regions`) and its flag (`ppl_evaluated` /
`blimp_evaluated`, int8) set last. A rerun skips flagged cells, so a killed evaluation resumes
and loses nothing; the store's `evaluation` attribute records the data and windows of each part
and a rerun with other ones is refused (use another store). A checkpoint is evaluated only
once its store region is reachable: the store is opened first, so a refused store costs
nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dynlab.errors import InputError
from dynlab.eval.core import EvalData, evaluate
from dynlab.faults import fault_point
from dynlab.runs.checkpoints import Checkpoint, CheckpointError, Run

#: the (run, step) flags of the evaluation parts, set once a checkpoint's part is written
FLAGS = {"perplexity": "ppl_evaluated", "blimp": "blimp_evaluated"}
#: what open_sources says of a run that has no complete checkpoint yet (--follow waits)
NOT_YET = ("no complete", "no such directory", "no step_<N>", "no run.json here",
           "run.json: missing")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = ("none", "bf16", "fp16")


@dataclass(frozen=True)
class EvalOptions:
    """How checkpoints are scored. max_length: the window (default: each model's context, at
    most it); stride: tokens a window advances (default max_length: non-overlapping);
    autocast: bf16 / fp16 forward passes on CUDA ("none" on CPU); dtype: the model's
    parameters."""

    device: str = "cpu"
    batch_size: int = 32
    max_length: int | None = None
    stride: int | None = None
    autocast: str = "none"
    dtype: str = "float32"
    tokenizer: Path | None = None
    on_error: str = "fail"

    def check(self) -> EvalOptions:
        if self.autocast not in AUTOCAST:
            raise InputError(f"--autocast must be one of {', '.join(AUTOCAST)}, not "
                             f"{self.autocast!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.max_length is not None and self.max_length < 1:
            raise InputError(f"--max-length must be ≥ 1, got {self.max_length}")
        if self.stride is not None and self.max_length is not None and not (
                1 <= self.stride <= self.max_length):
            raise InputError(f"--stride must be in [1, --max-length {self.max_length}], got "
                             f"{self.stride}")
        return self


@dataclass(frozen=True)
class DataSpec:
    """What the data was, as the store records it (a rerun must match)."""

    ppl: str | None = None
    blimp: str | None = None
    split: str = "val"
    uid: str | None = None
    limit: int | None = None
    extra: dict = field(default_factory=dict)


def autocast_dtype(name: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


def window(lm_context: int, options: EvalOptions, source: str) -> tuple[int, int]:
    """(max_length, stride) for a model of context `lm_context`; a --max-length above the
    model's context is refused (documents longer than the window are scored in strided
    windows, never truncated)."""
    length = lm_context if options.max_length is None else options.max_length
    if length > lm_context:
        raise InputError(f"--max-length {length} exceeds the context of {source} "
                         f"({lm_context} tokens)")
    stride = length if options.stride is None else options.stride
    if not 1 <= stride <= length:
        raise InputError(f"--stride {stride} must be in [1, the window {length}] ({source})")
    return length, stride


def evaluate_checkpoint(run: Run, ckpt: Checkpoint, data: EvalData, options: EvalOptions, *,
                        cache: dict | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """{"step", "perplexity", "blimp"} of one checkpoint of any source (module docstring).
    A Hub checkpoint's download is released once its model is loaded."""
    from dynlab.eval.perplexity import PretokenizedDocs
    from dynlab.sources import SourceRun, release
    from dynlab.sources.models import load_causal_lm

    pretokenized = bool(data.ppl_domains) and not data.blimp_pairs and all(
        isinstance(d, PretokenizedDocs) for d in data.ppl_domains.values())
    load = dict(device=options.device, dtype=DTYPES[options.dtype],
                tokenizer=options.tokenizer, what="eval")
    try:
        try:
            lm = load_causal_lm(run, ckpt, **load)
        except InputError:
            if not pretokenized:
                raise
            # pre-tokenised data needs no tokenizer (bits per byte is then NaN)
            lm = load_causal_lm(run, ckpt, **load | {"tokenizer": None}, need_tokenizer=False)
    finally:
        release(run, ckpt)
    if lm.bos_id is None and not pretokenized:
        raise InputError(f"eval: the tokenizer of {ckpt.path} has no beginning- or "
                         "end-of-sequence token to condition documents on")
    length, stride = window(lm.context_length, options, str(ckpt.path))
    result = evaluate(lm.model, lm.tokenizer, data, device=options.device,
                      batch_size=options.batch_size, max_seq_len=length, stride=stride,
                      on_error=options.on_error, progress=progress,
                      bos=lm.bos_id if lm.bos_id is not None else 0,
                      autocast=autocast_dtype(options.autocast), cache=cache)
    if "blimp" in result:
        result["blimp"]["max_length"] = length
    if not isinstance(run, SourceRun):  # a dynlab run keeps its result in eval.json
        from dynlab.runs.files import store_eval

        store_eval(Path(ckpt.path), result)
        fault_point("eval.stored")
    return {"step": ckpt.step, **result}


def evaluate_sources(paths: Sequence[str | Path], data: EvalData, options: EvalOptions, *,
                     spec: DataSpec | None = None, store: str | Path | None = None,
                     fmt: str | None = None, revisions: str | None = None,
                     keep_downloads: bool = False, cache_dir: str | Path | None = None,
                     follow: bool = False, until: int | None = None, poll: float = 2.0,
                     wait: bool | float = False, metrics: str | Sequence[str] | None = None,
                     progress: Callable[[str, int, int, int], None] | None = None,
                     started: Callable[[Run, Checkpoint], None] | None = None,
                     skipped: Callable[[Run, Checkpoint, BaseException], None] | None = None,
                     sleep: Callable[[float], None] = time.sleep) -> dict[str, list[dict]]:
    """Evaluate every complete checkpoint of the runs named by `paths` (any source; see
    `dynlab.sources.open_sources` for fmt / revisions / keep_downloads / cache_dir), in step
    order; into `store` when given (module docstring). follow: keep evaluating checkpoints as
    they complete until every run's last step (or `until`) is done (local runs only).
    metrics: the spectral metrics of a store created here (default all; a store's own are
    kept), so that a later `dynlab analyze -m ...` finds the store it would make.
    A checkpoint that cannot be evaluated (dynlab.eval.runs.CHECKPOINT_ERRORS, e.g. truncated
    weights) raises under options.on_error "fail"; under "skip" it is reported to
    `skipped(run, ckpt, error)` and passed over (left unflagged in a store).
    Returns {run name: [result per checkpoint evaluated now]}. `progress(run, step, done,
    total)` counts scored sequences; `started(run, ckpt)` precedes each checkpoint."""
    from dynlab.sources import open_sources
    from dynlab.sources.base import FOLLOWING, SourceError

    options = options.check()
    spec = spec or DataSpec()
    if follow and any(str(p).startswith("hf://") for p in paths):
        raise SourceError("--follow applies to local runs; hf:// revisions are already "
                          "complete")
    results: dict[str, list[dict]] = {}
    passed: set[tuple[str, int]] = set()  # skipped checkpoints (on_error "skip")
    cache: dict = {}
    token = FOLLOWING.set({"until": until}) if follow else None
    try:
        while True:
            try:
                runs = open_sources(paths, fmt, revisions=revisions,
                                    keep_downloads=keep_downloads, cache_dir=cache_dir)
            except CheckpointError as err:  # a live run with no complete checkpoint yet
                if not (follow and any(s in str(err) for s in NOT_YET)):
                    raise
                sleep(poll)
                continue
            if store is None:
                todo = [(r, c) for r in runs for c in r.checkpoints
                        if c.step not in {x["step"] for x in results.get(r.name, [])}
                        and (r.name, c.step) not in passed]
                for run, ckpt in todo:
                    if started:
                        started(run, ckpt)
                    result = guarded(run, ckpt, data, options, cache, progress, skipped)
                    if result is None:
                        passed.add((run.name, ckpt.step))
                    else:
                        results.setdefault(run.name, []).append(result)
            else:
                for name, res in evaluate_into_store(
                        Path(store), runs, data, options, spec, cache=cache, wait=wait,
                        metrics=metrics, progress=progress, started=started,
                        skipped=skipped, passed=passed).items():
                    results.setdefault(name, []).extend(res)
            if not follow or all(_finished(r, until) for r in runs):
                return results
            sleep(poll)
    finally:
        if token is not None:
            FOLLOWING.reset(token)


def guarded(run: Run, ckpt: Checkpoint, data: EvalData, options: EvalOptions, cache: dict | None,
            progress, skipped) -> dict | None:
    """evaluate_checkpoint, or None for a checkpoint that failed under on_error "skip"
    (reported to `skipped`)."""
    from dynlab.eval.runs import CHECKPOINT_ERRORS

    try:
        return evaluate_checkpoint(run, ckpt, data, options, cache=cache,
                                   progress=_tick(progress, run, ckpt))
    except CHECKPOINT_ERRORS as err:
        if options.on_error != "skip":
            raise
        if skipped is not None:
            skipped(run, ckpt, err)
        return None


def _finished(run: Run, until: int | None) -> bool:
    from dynlab.sources.follow import last_step

    target = until if until is not None else last_step(run)
    return target is not None and bool(run.checkpoints) and run.checkpoints[-1].step >= target


def _tick(progress, run: Run, ckpt: Checkpoint):
    if progress is None:
        return None
    return lambda done, total: progress(run.name, ckpt.step, done, total)


def store_record(data: EvalData, options: EvalOptions, spec: DataSpec) -> dict[str, dict]:
    """What the store's `evaluation` attribute records per part: the data, the windows and
    the tokenizer override (parts with no data are absent)."""
    common = {"max_length": options.max_length or "model context",
              "stride": options.stride or "max_length",
              "tokenizer": None if options.tokenizer is None else str(options.tokenizer)}
    out = {}
    if data.ppl_domains:
        out["perplexity"] = {"data": spec.ppl or "default", "split": spec.split, **common,
                             **spec.extra}
    if data.blimp_pairs:
        out["blimp"] = {"data": spec.blimp or "default", "uid": spec.uid, "limit": spec.limit,
                        **common}
    return out


def evaluate_into_store(path: Path, runs: Sequence[Run], data: EvalData, options: EvalOptions,
                        spec: DataSpec, *, cache: dict | None = None, wait: bool | float = False,
                        metrics: str | Sequence[str] | None = None,
                        skipped: Callable[[Run, Checkpoint, BaseException], None] | None = None,
                        passed: set[tuple[str, int]] | None = None,
                        progress: Callable[[str, int, int, int], None] | None = None,
                        started: Callable[[Run, Checkpoint], None] | None = None
                        ) -> dict[str, list[dict]]:
    """Evaluate the checkpoints of `runs` that the store at `path` does not hold yet (module
    docstring); returns the results written now."""
    from dynlab.analysis import metrics as metrics_mod
    from dynlab.analysis import store as S
    from dynlab.analysis.plan import parse_kinds, plan_layout
    from dynlab.analysis.storelock import StoreAccess

    record = store_record(data, options, spec)
    if not record:
        raise InputError("eval: no data to evaluate (both --ppl and --blimp are 'none')")
    wanted = plan_layout(runs, metrics_mod.parse_metrics(metrics), parse_kinds(None, runs),
                         "dynlab")
    if not pending(path, runs, record):
        return {}  # everything evaluated: nothing loaded, nothing locked
    validate_first(runs, data, options)
    done: dict[str, list[dict]] = {}
    with StoreAccess(path, wait=wait) as access:
        layout = S.ensure_store(path, wanted, metrics_given=metrics is not None,
                                kinds_given=False, access=access)
        layout = ensure_flags(path, layout, record, access)
        writer = S.RegionWriter(path)
        run_index = {r: i for i, r in enumerate(layout.runs)}
        step_index = {s: j for j, s in enumerate(layout.steps)}
        with S.quiet_zarr():
            flags = {part: writer.read(FLAGS[part]) for part in record}
        for run in runs:
            i = run_index[run.name]
            for ckpt in run.checkpoints:
                j = step_index[ckpt.step]
                if all(flags[part][i, j] for part in record) or (
                        passed is not None and (run.name, ckpt.step) in passed):
                    continue
                access.need(f"write the evaluation of {run.name} step {ckpt.step}")
                if started:
                    started(run, ckpt)
                result = guarded(run, ckpt, data, options, cache, progress, skipped)
                if result is None:
                    if passed is not None:
                        passed.add((run.name, ckpt.step))
                    continue
                layout = write_result(path, layout, run, ckpt, result, access)
                done.setdefault(run.name, []).append(result)
                fault_point("eval.checkpoint")
    return done


def pending(path: Path, runs: Sequence[Run], record: dict[str, dict]) -> bool:
    """Whether some checkpoint of `runs` lacks a flag of a part in `record` (read without
    the lock: a hint; the locked pass decides). True when the store cannot tell."""
    from dynlab.analysis import store as S

    try:
        ds = S.open_store(path)
    except S.StoreError:
        return True
    if any(FLAGS[p] not in ds.data_vars for p in record):
        return True
    stored = json.loads(ds.attrs.get("evaluation", "{}"))
    if any(stored.get(p) != rec for p, rec in record.items()):
        return True  # the locked pass refuses or records it
    runs_in = {str(r) for r in ds["run"].values}
    steps_in = {int(s) for s in ds["step"].values}
    for run in runs:
        if run.name not in runs_in or any(c.step not in steps_in for c in run.checkpoints):
            return True
        for p in record:
            flags = ds[FLAGS[p]].sel(run=run.name, step=[c.step for c in run.checkpoints])
            if not bool((flags.values == 1).all()):
                return True
    return False


def validate_first(runs: Sequence[Run], data: EvalData, options: EvalOptions) -> None:
    """Load the first checkpoint of each run as evaluation will (its tokenizer, the window),
    so that an evaluation that cannot run is refused before the store is created or
    changed."""
    from dynlab.eval.perplexity import PretokenizedDocs
    from dynlab.sources import release
    from dynlab.sources.models import load_causal_lm

    pretokenized = bool(data.ppl_domains) and not data.blimp_pairs and all(
        isinstance(d, PretokenizedDocs) for d in data.ppl_domains.values())
    for run in runs:
        ckpt = run.checkpoints[0]
        try:
            lm = load_causal_lm(run, ckpt, dtype=DTYPES[options.dtype],
                                tokenizer=options.tokenizer, what="eval",
                                need_tokenizer=not pretokenized)
        finally:
            release(run, ckpt)
        window(lm.context_length, options, str(ckpt.path))
        del lm


def ensure_flags(path: Path, layout, record: dict[str, dict], access) -> object:
    """Create the (run, step) flags of the parts evaluated, and check (or record) the store's
    `evaluation` attribute: the same part evaluated on other data or windows is refused."""
    from dynlab.analysis import store as S

    group = S.open_group_for_update(path)
    stored = json.loads(group.attrs.get("evaluation", "{}"))
    for part, rec in record.items():
        if part in stored and stored[part] != rec:
            raise S.StoreError(
                f"{path}: its {part} values come from {json.dumps(stored[part])}, not "
                f"{json.dumps(rec)}; use another store (--store) for this evaluation")
    missing = [FLAGS[p] for p in record if FLAGS[p] not in group]
    changed = any(p not in stored for p in record)
    if missing or changed:
        access.need("record the evaluation in the store")
        with S.quiet_zarr():
            n_run, n_step = group["analyzed"].shape
            for name in missing:
                S.create_variable(group, name, ("run", "step"), shape=(n_run, n_step),
                                  chunks=(1, 1), dtype="int8", fill_value=0,
                                  attrs={"long_name": f"1 once the checkpoint's "
                                                      f"{name.split('_')[0]} evaluation is "
                                                      "written (dynlab eval --store)"})
            group.attrs.update({"evaluation": json.dumps({**stored, **record}, sort_keys=True)})
        S.consolidate(path)
    return layout


def write_result(path: Path, layout, run: Run, ckpt: Checkpoint, result: dict,
                 access) -> object:
    """One checkpoint's evaluation into the store: grow the label dims for new domains /
    UIDs / fields, write its (run, step) region with its training values, then its flags.
    Returns the store's (possibly grown) layout."""
    from dynlab.analysis import store as S

    meta = {**dict(ckpt.meta()), "eval": {k: v for k, v in result.items() if k != "step"}}
    metas = {(run.name, ckpt.step): meta}
    labels = S.meta_labels(metas)
    if any(set(v) - set(layout.labels.get(d, [])) for d, v in labels.items()):
        wanted = S.Layout(layout.runs, layout.steps, layout.kinds, layout.metrics,
                          layout.n_layers, layout.n_heads, layout.n_sv, layout.n_head_sv,
                          layout.n_emb_sv, {}, labels, layout.convention)
        layout = S.ensure_store(path, wanted, metrics_given=False, kinds_given=False,
                                access=access)  # the flags grow with the store's dims
    S.write_meta_regions(path, layout, metas, access)
    fault_point("eval.write")  # values written, flags not yet
    writer = S.RegionWriter(path)
    i, j = layout.runs.index(run.name), layout.steps.index(ckpt.step)
    with S.quiet_zarr():
        for part in S.eval_parts(meta):
            if writer.has(FLAGS[part]):
                writer.write({"run": i, "step": j}, {FLAGS[part]: np.int8(1)})
    return layout


def result_json(results: dict[str, list[dict]]) -> dict:
    """The results as JSON (NaN as null)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x
    return clean(results)


__all__ = ["DataSpec", "EvalOptions", "evaluate_checkpoint", "evaluate_into_store",
           "evaluate_sources"]
