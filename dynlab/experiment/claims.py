"""The study's claims, judged across seeds: each claim's effect size, its 95% confidence
interval, the number of seeds and a verdict.

Two stages:

    observe(ds, design, run_dirs)  one row of numbers per run, read from the analysis store
                                   (and each run's metrics.jsonl for the loss around resets)
    judge(table, design)           the claims of every scale, from those rows (pure)

Observations (per run):

    final_loss     train_loss at the run's last step with a value
    ppl, blimp     ppl_macro, blimp_overall at the last step with a value
    per_weights    PER of the weights, mean over layers and matrices at the last analysed step
    per_updates    PER of the updates, mean over layers, matrices and steps
    per_grads      PER of the gradients, mean over layers, matrices and steps
    digits_lost    max over steps of log10 of the geometric mean over layers and matrices of
                   the updates' cn_nz = σ₁/σ_r (the digits of accuracy a solve with the update
                   loses, for the directions it has; finite for rank-deficient updates)
    rank_deficient the fraction of update matrices with cn = inf: rank-deficient at the
                   precision the weights were stored in (numerical rank below the bound)
    worst_at       the step of digits_lost's maximum as a fraction of the run's last step
    anisotropy     the residual stream's anisotropy, mean over layers at the last step
    jump           mean over the relora condition's resets r of the loss just after r minus
                   the loss just before it (metrics.jsonl; window w = max(1, R/10) steps)
    recovery       mean over resets of the loss at the end of r's cycle minus before r

Claims of a scale with a decoder condition D and a relora condition R (direction: the sign
the study reports for R − D):

    loss_higher, ppl_higher (+), blimp_lower (−), per_weights_lower (−), per_updates_lower (−),
    per_grads_lower (−), updates_ill_conditioned (+: digits_lost), anisotropy_higher (+),
    reset_jump (+: R's jump minus D's loss change at the same steps, the same data order),
    reset_recovery (−: R's recovery, one sample), worst_early (median of R's worst_at
    below ½: bootstrap), and across consecutive scales loss_gap_grows (+: Welch).

Effect sizes are differences of means, paired by seed when both conditions ran the seed
(`stats.paired_difference`), one-sample means (`stats.t_interval`), Welch's difference
between scales, or a percentile bootstrap of the median. Verdict rule: the claim is
"supported" when its interval at the family level 1 − 0.05/m (Bonferroni over the m claims of
the table that have an interval) lies entirely on the claimed side of the null value,
"contradicted" when entirely on the other side, else "inconclusive" — so with m claims the
chance that any null effect is called supported or contradicted is at most 5%. The reported
interval is the plain 95% one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynlab.experiment import stats as S

CONFIDENCE = 0.95
SCALE_ORDER = ("nano", "micro", "tiny", "small", "medium", "large")
OBSERVATIONS = ("final_loss", "ppl", "blimp", "per_weights", "per_updates", "per_grads",
                "digits_lost", "rank_deficient", "worst_at", "anisotropy", "jump", "recovery")


@dataclass(frozen=True)
class ClaimSpec:
    """One claim: what it compares, how, and which sign the study reports."""

    id: str
    text: str
    observation: str
    design: str  # "paired" (R − D by seed), "one-sample" (R), "median" (R, bootstrap)
    direction: int
    null: float = 0.0


CLAIMS = (
    ClaimSpec("loss_higher", "ReLoRA's final training loss is higher", "final_loss", "paired", 1),
    ClaimSpec("ppl_higher", "ReLoRA's final perplexity is higher", "ppl", "paired", 1),
    ClaimSpec("blimp_lower", "ReLoRA's final BLiMP accuracy is lower", "blimp", "paired", -1),
    ClaimSpec("reset_jump", "the loss jumps at each ReLoRA reset", "jump", "paired", 1),
    ClaimSpec("reset_recovery", "the loss recovers within each cycle", "recovery",
              "one-sample", -1),
    ClaimSpec("per_weights_lower", "PER of ReLoRA's weights is lower", "per_weights", "paired",
              -1),
    ClaimSpec("per_updates_lower", "PER of ReLoRA's updates is lower", "per_updates", "paired",
              -1),
    ClaimSpec("per_grads_lower", "PER of ReLoRA's gradients is lower", "per_grads", "paired", -1),
    ClaimSpec("updates_ill_conditioned", "ReLoRA's updates lose more digits (log10 cn_nz)",
              "digits_lost", "paired", 1),
    ClaimSpec("worst_early", "ReLoRA's updates are worst conditioned early (median step "
              "fraction < 0.5)", "worst_at", "median", -1, 0.5),
    ClaimSpec("anisotropy_higher", "ReLoRA's representations are more anisotropic",
              "anisotropy", "paired", 1),
)
GAP = ClaimSpec("loss_gap_grows", "the loss gap R − D grows with model size", "final_loss",
                "gap", 1)


# ---------------------------------------------------------------- observations (I/O)


def _mean_finite(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _has(ds, name: str, kind: str | None = None) -> bool:
    if name not in ds.data_vars:
        return False
    return kind is None or kind in [str(k) for k in ds["kind"].values]


def last_finite(values: np.ndarray) -> np.ndarray:
    """The last finite value of each row of a (runs, steps) array (NaN for a row without)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    idx = v.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
    out = v[np.arange(v.shape[0]), idx]
    return np.where(ok.any(axis=1), out, np.nan)


def finite_mean(values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The mean of the finite values over `axes` (NaN where there are none)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    n = ok.sum(axis=axes)
    total = np.where(ok, v, 0.0).sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def loss_around(records: Sequence[Mapping], steps: Sequence[int], window: int,
                ends: Sequence[int]) -> tuple[float, float]:
    """(jump, recovery) of a loss curve around `steps`: for each step r, before = mean loss
    of the logged steps in (r − w, r], after = mean in (r, r + w], end = mean in (e − w, e]
    with e the matching entry of `ends`; jump = mean over r of after − before, recovery =
    mean of end − before (resets without logged steps on both sides are left out)."""
    s = np.asarray([r["step"] for r in records], dtype=np.float64)
    y = np.asarray([r.get("loss", math.nan) for r in records], dtype=np.float64)
    jumps, recs = [], []
    for r, e in zip(steps, ends, strict=True):
        before = y[(s > r - window) & (s <= r)]
        after = y[(s > r) & (s <= r + window)]
        end = y[(s > e - window) & (s <= e)]
        if before.size and after.size:
            jumps.append(after.mean() - before.mean())
        if before.size and end.size and e > r + window:
            recs.append(end.mean() - before.mean())
    return (float(np.mean(jumps)) if jumps else math.nan,
            float(np.mean(recs)) if recs else math.nan)


def reset_windows(run_config: Mapping) -> tuple[list[int], list[int], int]:
    """(reset steps, the end of each reset's cycle, window w) of a relora run.json."""
    from dynlab.runs.config import reset_steps

    resets = reset_steps(run_config)
    train = run_config.get("train") or {}
    last = int(train.get("steps") or (resets[-1] + 1 if resets else 0))
    every = int((run_config.get("relora") or {}).get("reset_every") or 0) or max(1, last)
    ends = [*resets[1:], last]
    return resets, ends, max(1, every // 10)


def observe(ds, design: Mapping, run_dirs: Mapping[str, Path] | None = None
            ) -> dict[str, dict[str, float]]:
    """{run: {observation: value}} for every run of `design` (OUT/study.json) in the store
    `ds` (module docstring), computed for all runs at once. A value the store cannot give is
    NaN. run_dirs: where each run's metrics.jsonl is (for jump/recovery); without it those
    are NaN."""
    from dynlab.runs.metrics import read_metrics
    from dynlab.viz.figures import run_configs

    have = [str(r) for r in ds["run"].values]
    runs = [r for r in design["runs"] if r in have]
    ds = ds.sortby("step")
    sub = ds.sel(run=runs) if runs else None
    steps = ds["step"].values.astype(np.float64)
    cols: dict[str, np.ndarray] = {}
    nan = np.full(len(runs), np.nan)
    if sub is not None:
        for obs, var in (("final_loss", "train_loss"), ("ppl", "ppl_macro"),
                         ("blimp", "blimp_overall")):
            if var in ds.data_vars:
                cols[obs] = last_finite(sub[var].transpose("run", "step").values)
        if _has(ds, "per", "weights"):
            w = sub["per"].sel(kind="weights").transpose("run", "step", ...).values
            cols["per_weights"] = last_finite(finite_mean(w, (2, 3)))
        for obs, kind in (("per_updates", "updates"), ("per_grads", "grads")):
            if _has(ds, "per", kind):
                cols[obs] = finite_mean(sub["per"].sel(kind=kind).values, (1, 2, 3))
        if _has(ds, "cn_nz", "updates"):
            c = np.asarray(sub["cn_nz"].sel(kind="updates").transpose("run", "step", ...)
                           .values, dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                logs = np.where(np.isfinite(c) & (c > 0), np.log10(np.abs(c)), np.nan)
            per_step = finite_mean(logs, (2, 3))  # (run, step)
            has = np.isfinite(per_step)
            best = np.argmax(np.where(has, per_step, -np.inf), axis=1)
            last_idx = per_step.shape[1] - 1 - np.argmax(has[:, ::-1], axis=1)
            any_ = has.any(axis=1)
            cols["digits_lost"] = np.where(any_, per_step[np.arange(len(runs)), best], np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = steps[best] / steps[last_idx]
            cols["worst_at"] = np.where(any_ & (steps[last_idx] > 0), frac, np.nan)
        if _has(ds, "cn", "updates"):
            c = np.asarray(sub["cn"].sel(kind="updates").values, dtype=np.float64)
            present = (~np.isnan(c)).reshape(len(runs), -1)
            inf = np.isinf(c).reshape(len(runs), -1)
            with np.errstate(invalid="ignore", divide="ignore"):
                cols["rank_deficient"] = np.where(present.any(axis=1),
                                                  inf.sum(axis=1) / present.sum(axis=1), np.nan)
        if "anisotropy" in ds.data_vars and "residual" in [str(a) for a in
                                                         ds["act_site"].values]:
            a = sub["anisotropy"].sel(act_site="residual").transpose("run", "step", "layer")
            cols["anisotropy"] = last_finite(finite_mean(a.values, (2,)))
    rows: dict[str, dict[str, float]] = {}
    for run in design["runs"]:
        rows[run] = dict.fromkeys(OBSERVATIONS, math.nan)
    for i, run in enumerate(runs):
        for obs, values in cols.items():
            rows[run][obs] = float(values[i] if values is not None else nan[i])
    configs = run_configs(ds)
    for run in runs:
        run_dir = (run_dirs or {}).get(run)
        if run_dir is not None and (Path(run_dir) / "metrics.jsonl").is_file():
            rows[run]["_records"] = read_metrics(run_dir)  # type: ignore[assignment]
            rows[run]["_config"] = configs.get(run) or {}  # type: ignore[assignment]
    _add_reset_observations(rows, design)
    for row in rows.values():
        row.pop("_records", None)
        row.pop("_config", None)
    return rows


def _add_reset_observations(rows: dict, design: Mapping) -> None:
    """jump and recovery of each relora run at its own resets, and of the decoder run of
    the same scale and seed at the same steps (its loss change without a reset)."""
    runs = design["runs"]
    scale = {c["name"]: c["scale"] for c in design["conditions"]}
    for run, info in runs.items():
        row = rows[run]
        if info["kind"] != "relora" or "_records" not in row:
            continue
        resets, ends, w = reset_windows(row["_config"])
        if not resets:
            continue
        row["jump"], row["recovery"] = loss_around(row["_records"], resets, w, ends)
        for other, oinfo in runs.items():
            if (oinfo["kind"] == "decoder" and oinfo["seed"] == info["seed"]
                    and scale[oinfo["condition"]] == scale[info["condition"]]
                    and "_records" in rows[other]):
                rows[other]["jump"], rows[other]["recovery"] = loss_around(
                    rows[other]["_records"], resets, w, ends)


# ---------------------------------------------------------------- judging (pure)


@dataclass
class ClaimResult:
    """One row of the claims table."""

    id: str
    claim: str
    scale: str
    effect: float
    lo: float
    hi: float
    n: int
    method: str
    verdict: str
    verdict_level: float
    note: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def scales_of(design: Mapping) -> list[tuple[str, str, str]]:
    """(scale, decoder condition, relora condition) for every scale that has both, smallest
    first (SCALE_ORDER, then file order)."""
    by: dict[str, dict[str, str]] = {}
    for c in design["conditions"]:
        by.setdefault(c["scale"], {}).setdefault(c["kind"], c["name"])
    order = {s: i for i, s in enumerate(SCALE_ORDER)}
    names = [s for s in by if {"decoder", "relora"} <= set(by[s])]
    names.sort(key=lambda s: order.get(s, len(order)))
    return [(s, by[s]["decoder"], by[s]["relora"]) for s in names]


def by_seed(table: Mapping[str, Mapping[str, float]], design: Mapping, condition: str,
            observation: str) -> dict[int, float]:
    """{seed: value} of one condition's runs."""
    return {int(info["seed"]): float(table[run][observation])
            for run, info in design["runs"].items()
            if info["condition"] == condition and run in table}


def _median(x, axis=-1):
    return np.median(x, axis=axis)


def interval(spec: ClaimSpec, d: Mapping[int, float], r: Mapping[int, float],
             confidence: float, d_small: Mapping[int, float] | None = None,
             r_small: Mapping[int, float] | None = None) -> S.Interval:
    """The interval of `spec` at `confidence` from the decoder's and relora's values by
    seed (and, for the gap, those of the smaller scale)."""
    if spec.design == "paired":
        seeds = sorted(set(d) & set(r))
        return S.paired_difference([r[s] for s in seeds], [d[s] for s in seeds], confidence)
    if spec.design == "one-sample":
        return S.t_interval(list(r.values()), confidence)
    if spec.design == "median":
        return S.bootstrap_percentile(list(r.values()), _median, confidence)
    if spec.design == "gap":
        big = [r[s] - d[s] for s in sorted(set(d) & set(r))]
        small = [r_small[s] - d_small[s] for s in sorted(set(d_small) & set(r_small))]
        return S.welch_difference(big, small, confidence)
    raise ValueError(f"unknown claim design {spec.design!r}")


def judge(table: Mapping[str, Mapping[str, float]], design: Mapping,
          confidence: float = CONFIDENCE) -> list[ClaimResult]:
    """The claims table (module docstring) from per-run observations."""
    rows: list[tuple[ClaimSpec, str, tuple]] = []
    scales = scales_of(design)
    for scale, dc, rc in scales:
        for spec in CLAIMS:
            rows.append((spec, scale, (by_seed(table, design, dc, spec.observation),
                                       by_seed(table, design, rc, spec.observation))))
    for (s0, d0, r0), (s1, d1, r1) in zip(scales, scales[1:], strict=False):
        obs = GAP.observation
        rows.append((GAP, f"{s0} → {s1}", (by_seed(table, design, d1, obs),
                                            by_seed(table, design, r1, obs),
                                            by_seed(table, design, d0, obs),
                                            by_seed(table, design, r0, obs))))
    ivs = [interval(spec, *args, confidence) if len(args) == 2 else
           interval(spec, args[0], args[1], confidence, args[2], args[3])
           for spec, _, args in rows]
    m = sum(math.isfinite(iv.lo) for iv in ivs)
    level = S.family_confidence(confidence, m)
    out = []
    for (spec, scale, args), iv in zip(rows, ivs, strict=True):
        wide = (interval(spec, *args, level) if len(args) == 2 else
                interval(spec, args[0], args[1], level, args[2], args[3]))
        est = iv.estimate - spec.null if spec.design == "median" else iv.estimate
        v = S.verdict(wide.lo - spec.null, wide.hi - spec.null, spec.direction)
        out.append(ClaimResult(spec.id, spec.text, scale, iv.estimate, iv.lo, iv.hi, iv.n,
                               iv.method, v, level, note_for(spec, table, design, args, est)))
    return out


def note_for(spec: ClaimSpec, table, design, args, est: float) -> str:
    """Context a reader needs beside the number (digits lost, rank deficiency)."""
    if spec.id != "updates_ill_conditioned":
        return ""
    r = args[1]
    if not r:
        return ""
    relora_runs = [run for run, info in design["runs"].items()
                   if info["kind"] == "relora" and run in table
                   and int(info["seed"]) in r]
    deficient = _mean_finite([table[x]["rank_deficient"] for x in relora_runs])
    digits = _mean_finite(list(r.values()))
    text = f"ReLoRA loses up to {digits:.1f} digits (mean over seeds of the worst step)"
    if math.isfinite(deficient):
        text += (f"; {deficient:.0%} of its update matrices are rank-deficient at the storage "
                 "precision (cn = inf; their digits are from cn_nz)")
    return text


def claims_json(results: Sequence[ClaimResult], design: Mapping) -> dict:
    """The claims table as JSON (OUT/claims.json)."""
    return {"study": design.get("name"), "confidence": CONFIDENCE,
            "verdict_rule": ("supported / contradicted when the interval at the family level "
                             "1 - 0.05/m (Bonferroni over the m claims with an interval) lies "
                             "entirely on the claimed / the other side of the null value; "
                             "else inconclusive"),
            "claims": [r.as_dict() for r in results]}
