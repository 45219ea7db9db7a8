"""The study's figures: functions that take an analysis store (`dynlab.analysis.store`)
and return plotly Figures.

Conventions shared by every figure:
- `step` may be unsorted in the input; every function sorts it.
- Runs may have different step sets: the missing steps are NaN and simply not drawn.
- Layer means ignore non-finite values (NaN, inf: an infinite condition number is a
  rank-deficient matrix). A step where some but not all layers are finite is drawn with a
  HOLLOW marker at the mean of the finite layers (hover shows how many layers were finite); a
  step where no layer is finite is omitted (the line joins its neighbours). The band is the
  95% Student-t interval over the finite layers and is absent where fewer than two layers are
  finite. Metrics drawn on a log axis (LOG_METRICS) are averaged in log space: the line is
  the geometric mean and the band the t-interval of the log values, mapped back (so it is
  never <= 0). Every band is clipped to the metric's possible range (METRIC_RANGES: a
  condition number is >= 1, PER lies in (0, 1]).
- Something missing from the store (a variable, a kind, a matrix, a run without data) never
  raises: the panel is omitted and a note says why. Notes are shown as the figure's subtitle
  and kept in `fig.layout.meta["notes"]`.
- Traces carry `meta = {"run": ..., "role": ...}` (roles: mean, band_hi, band_lo, series,
  spectrum, heatmap) so that tests and notebooks can find them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots
from scipy import stats

from dynlab.runs.config import reset_steps as reset_steps_of

LOG_METRICS = frozenset({"cn", "cn_nz"})
"""Metrics drawn on a logarithmic axis (condition numbers span orders of magnitude); their
layer means are geometric means with the t-interval built in log space."""

METRIC_RANGES: dict[str, tuple[float, float]] = {
    "per": (0.0, 1.0), "er": (1.0, np.inf), "cn": (1.0, np.inf), "cn_nz": (1.0, np.inf),
    "stable_rank": (1.0, np.inf), "spectral_norm": (0.0, np.inf),
    "frobenius_norm": (0.0, np.inf), "nuclear_norm": (0.0, np.inf),
    "numerical_rank": (0.0, np.inf), "rank_deficit": (0.0, np.inf), "hoyer": (0.0, 1.0),
    "gini": (0.0, 1.0),
}
"""The values each metric can take: confidence bands are clipped to them."""

PALETTE = qualitative.Plotly
PANEL_HEIGHT = 320


# ---------------------------------------------------------------- statistics


def layer_mean_ci(da: xr.DataArray, dim: str = "layer", confidence: float = 0.95, *,
                  log: bool = False, bounds: tuple[float, float] | None = None) -> xr.Dataset:
    """Mean over `dim` of the finite values, with a Student-t confidence interval.

    n = number of finite values along `dim`;  mean = (1/n) sum x_i;
    s = sqrt(sum (x_i - mean)^2 / (n - 1));  half = t_{(1+confidence)/2, n-1} * s / sqrt(n);
    lo = mean - half, hi = mean + half.  `half` is NaN where n < 2, `mean` where n = 0.

    log=True (for metrics on a log axis): the same in log space, y_i = ln x_i over the finite
    positive x_i: mean = exp(mean_y) (the geometric mean), lo = exp(mean_y − half_y),
    hi = exp(mean_y + half_y), `half` = half_y. bounds=(a, b): lo and hi are clipped to
    [a, b], the range the metric can take. Also returns n_bad = number of values along `dim`
    left out (non-finite, or <= 0 under log).
    """
    x = da.where(np.isfinite(da))
    if log:
        x = np.log(x.where(x > 0))
    n = x.count(dim)
    mean = x.mean(dim)
    s = x.std(dim, ddof=1)
    dof = (n - 1).where(n >= 2)
    tq = xr.apply_ufunc(stats.t.ppf, (1 + confidence) / 2, dof)
    half = tq * s / np.sqrt(n)
    lo, hi = mean - half, mean + half
    if log:
        mean, lo, hi = np.exp(mean), np.exp(lo), np.exp(hi)
    if bounds is not None:
        lo, hi = lo.clip(*bounds), hi.clip(*bounds)
    return xr.Dataset({"mean": mean, "half": half, "lo": lo, "hi": hi,
                       "n": n, "n_bad": da.sizes[dim] - n})


def average_label(metric: str, confidence: float = 0.95) -> str:
    """How a figure averages `metric` over layers, for its caption."""
    if metric in LOG_METRICS:
        return (f"geometric mean over layers, {confidence:.0%} t-interval of the log values; "
                "infinite values (rank-deficient matrices) left out")
    return f"mean over layers, {confidence:.0%} t-interval"


def last_finite(da: xr.DataArray, dim: str = "step") -> tuple[float, float]:
    """(coordinate, value) of the last finite value of a 1-D array along `dim`; NaNs if none."""
    da = da.sortby(dim)
    v = np.asarray(da.values, dtype=float)
    ok = np.flatnonzero(np.isfinite(v))
    if ok.size == 0:
        return float("nan"), float("nan")
    return float(da[dim].values[ok[-1]]), float(v[ok[-1]])


# ---------------------------------------------------------------- store helpers


def run_configs(ds: xr.Dataset) -> dict[str, dict]:
    """The store's `run_configs` attribute (a JSON string, or already a dict) as a dict."""
    raw = ds.attrs.get("run_configs", "{}")
    if isinstance(raw, dict):
        return raw
    try:
        out = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def is_relora(ds: xr.Dataset, run: str) -> bool:
    """A run is ReLoRA when its run.json says so, or else when it has a finite relora_cycle."""
    cfg = run_configs(ds).get(run)
    if cfg and "kind" in cfg:
        return cfg["kind"] == "relora"
    if "relora_cycle" in ds:
        return bool(np.isfinite(ds["relora_cycle"].sel(run=run).values).any())
    return False


def _runs(ds: xr.Dataset, runs: Sequence[str] | None) -> list[str]:
    if "run" not in ds.coords:
        return []
    have = [str(r) for r in ds["run"].values]
    return have if runs is None else [r for r in runs if r in have]


def _color(ds: xr.Dataset, run: str) -> str:
    have = [str(r) for r in ds["run"].values]
    return PALETTE[have.index(run) % len(PALETTE)] if run in have else PALETTE[0]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def missing(ds: xr.Dataset, name: str, kind: str, matrix: str) -> str | None:
    """A note saying what of (variable, kind, matrix) the store lacks, or None."""
    if name not in ds.data_vars:
        return f"variable '{name}' not in store"
    for dim, val in (("kind", kind), ("matrix", matrix)):
        if dim not in ds[name].dims or val not in [str(v) for v in ds[dim].values]:
            return f"{dim} '{val}' not in store"
    from dynlab.analysis.selection import not_analysed

    return not_analysed(ds, matrix)


def select_metric(ds: xr.Dataset, metric: str, kind: str, matrix: str) -> xr.DataArray | str:
    """`ds[metric]` at (kind, matrix), dims (run, step, layer), step sorted; or a note saying
    what is missing."""
    note = missing(ds, metric, kind, matrix)
    if note is not None:
        return note
    da = ds[metric].sel(kind=kind, matrix=matrix).sortby("step")
    return da.transpose("run", "step", "layer").load()


def _finish(fig: go.Figure, title: str, notes: list[str], height: int) -> go.Figure:
    sub = "; ".join(notes)
    fig.update_layout(
        title={"text": title, "subtitle": {"text": f"note: {sub}" if sub else ""}},
        height=height, meta={"notes": list(notes)}, template="plotly_white",
        margin={"t": 110 if sub else 90}, legend={"title": {"text": "run"}},
    )
    return fig


def _log_axis(values: np.ndarray) -> dict:
    """Log-axis settings: label 1-2-5 per decade when the data span 1 to 3 decades (plotly's
    default then labels every digit), else plotly's automatic ticks."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    span = float(np.log10(v.max() / v.min())) if v.size else 0.0
    return {"type": "log", **({"dtick": "D2"} if 1.0 <= span <= 3.0 else {})}


def _label(metric: str) -> str:
    if metric == "cn_nz":
        return "CN_nz"
    return metric.upper() if metric in ("per", "cn", "er") else metric.replace("_", " ")


# ---------------------------------------------------------------- 1. trajectories


def _add_trajectory(fig: go.Figure, ds: xr.Dataset, metric: str, kind: str, matrix: str,
                    runs: list[str], row: int, col: int, legend_done: set[str],
                    confidence: float = 0.95) -> list[str]:
    """Add mean ± t-band traces of one (metric, kind, matrix) panel; return notes."""
    da = select_metric(ds, metric, kind, matrix)
    if isinstance(da, str):
        return [f"{kind} · {matrix}: {da}"]
    st = layer_mean_ci(da, confidence=confidence, log=metric in LOG_METRICS,
                       bounds=METRIC_RANGES.get(metric))
    notes = []
    n_inf = np.isinf(da).sum("layer")
    for run in runs:
        r = st.sel(run=run)
        steps = r["step"].values
        mean, n, bad = r["mean"].values, r["n"].values, r["n_bad"].values
        keep = n > 0
        present = da.sel(run=run).notnull().sum("layer").values
        all_inf = (present > 0) & (n_inf.sel(run=run).values == present)
        if all_inf.any():
            notes.append(f"{run}: {metric} of {kind} {matrix} is inf in every layer at "
                         f"{int(all_inf.sum())} step(s) (rank-deficient; not drawn)")
        if not keep.any():
            notes.append(f"{run} has no finite {metric} of {kind} {matrix}")
            continue
        color = _color(ds, run)
        lo, hi = r["lo"].values, r["hi"].values
        band = keep & np.isfinite(lo) & np.isfinite(hi)
        group = f"{run}"
        if band.any():
            fig.add_trace(go.Scatter(
                x=steps[band], y=hi[band], mode="lines", line={"width": 0, "color": color},
                showlegend=False, legendgroup=group, hoverinfo="skip",
                meta={"run": run, "role": "band_hi"}), row=row, col=col)
            fig.add_trace(go.Scatter(
                x=steps[band], y=lo[band], mode="lines", line={"width": 0, "color": color},
                fill="tonexty", fillcolor=_rgba(color, 0.2), showlegend=False,
                legendgroup=group, hoverinfo="skip", meta={"run": run, "role": "band_lo"}),
                row=row, col=col)
        hollow = bad[keep] > 0
        stat = "geometric mean " if metric in LOG_METRICS else ""
        fig.add_trace(go.Scatter(
            x=steps[keep], y=mean[keep], mode="lines+markers", name=run, legendgroup=group,
            showlegend=run not in legend_done, line={"color": color},
            marker={"color": color, "size": 7,
                    "symbol": np.where(hollow, "circle-open", "circle").tolist()},
            customdata=np.stack([n[keep], n[keep] + bad[keep]], -1),
            hovertemplate=(f"{run}<br>step %{{x}}<br>{stat}{metric} %{{y:.4g}}"
                           "<br>finite layers %{customdata[0]}/%{customdata[1]}<extra></extra>"),
            meta={"run": run, "role": "mean"}), row=row, col=col)
        legend_done.add(run)
    if metric in LOG_METRICS:
        shown = np.concatenate([st["mean"].values.ravel(), st["hi"].values.ravel()])
        fig.update_yaxes(**_log_axis(shown), row=row, col=col)
    fig.update_yaxes(title_text=_label(metric), row=row, col=col)
    fig.update_xaxes(title_text="step", row=row, col=col)
    return notes


def trajectory(ds: xr.Dataset, metric: str = "per", kind: str = "weights",
               matrix: str = "ov_circuit", runs: Sequence[str] | None = None,
               confidence: float = 0.95) -> go.Figure:
    """A metric over steps: mean over layers with a Student-t band, one line per run."""
    return trajectory_grid(ds, metric, [kind], [matrix], runs, confidence,
                           title=f"{_label(metric)} of {kind} · {matrix} "
                                 f"({average_label(metric, confidence)}; hollow marker: some "
                                 "layers non-finite)")


def trajectory_grid(ds: xr.Dataset, metric: str, kinds: Sequence[str], matrices: Sequence[str],
                    runs: Sequence[str] | None = None, confidence: float = 0.95,
                    title: str | None = None) -> go.Figure:
    """Trajectories of one metric in a grid: rows = kinds, columns = matrices."""
    runs_ = _runs(ds, runs)
    ds = ds.sortby("step") if "step" in ds.dims else ds
    fig = make_subplots(rows=len(kinds), cols=len(matrices), shared_xaxes=True,
                        subplot_titles=[f"{k} · {m}" for k in kinds for m in matrices],
                        vertical_spacing=0.12 if len(kinds) > 1 else 0.1,
                        horizontal_spacing=0.06)
    notes: list[str] = []
    done: set[str] = set()
    for i, kind in enumerate(kinds):
        for j, matrix in enumerate(matrices):
            notes += _add_trajectory(fig, ds, metric, kind, matrix, runs_, i + 1, j + 1, done,
                                     confidence)
            if i < len(kinds) - 1:  # shared x axes: the step label only under the last row
                fig.update_xaxes(title_text=None, row=i + 1, col=j + 1)
    title = title or (f"{_label(metric)} ({average_label(metric, confidence)}; "
                      "hollow marker: some layers non-finite)")
    return _finish(fig, title, notes, PANEL_HEIGHT * len(kinds) + 120)


def conditioning_grid(ds: xr.Dataset, matrices: Sequence[str], runs: Sequence[str] | None = None,
                      confidence: float = 0.95) -> go.Figure:
    """Condition numbers in a grid: rows CN of weights, CN of updates and (when the store has
    it) CN_nz of updates, the condition number of the non-zero part; columns = matrices."""
    rows = [("cn", "weights"), ("cn", "updates")]
    if "cn_nz" in ds.data_vars:
        rows.append(("cn_nz", "updates"))
    runs_ = _runs(ds, runs)
    ds = ds.sortby("step") if "step" in ds.dims else ds
    fig = make_subplots(rows=len(rows), cols=len(matrices), shared_xaxes=True,
                        subplot_titles=[f"{_label(m)} of {k} · {x}" for m, k in rows
                                        for x in matrices],
                        vertical_spacing=0.1, horizontal_spacing=0.06)
    notes: list[str] = []
    done: set[str] = set()
    for i, (metric, kind) in enumerate(rows):
        for j, matrix in enumerate(matrices):
            notes += _add_trajectory(fig, ds, metric, kind, matrix, runs_, i + 1, j + 1, done,
                                     confidence)
            if i < len(rows) - 1:
                fig.update_xaxes(title_text=None, row=i + 1, col=j + 1)
    title = (f"Condition numbers ({average_label('cn', confidence)}; hollow marker: some "
             "layers non-finite)")
    return _finish(fig, title, notes, PANEL_HEIGHT * len(rows) + 120)


# ---------------------------------------------------------------- 2. heatmap


def heatmap(ds: xr.Dataset, metric: str = "per", kind: str = "weights",
            matrix: str = "ov_circuit", runs: Sequence[str] | None = None) -> go.Figure:
    """Layer × step heatmap of one metric, one panel per run, shared colour scale
    (log10 of the value for LOG_METRICS; non-finite cells blank)."""
    runs_ = _runs(ds, runs)
    da = select_metric(ds, metric, kind, matrix)
    log = metric in LOG_METRICS
    label = f"log10 {_label(metric)}" if log else _label(metric)
    fig = make_subplots(rows=1, cols=max(len(runs_), 1), subplot_titles=runs_ or [""],
                        shared_yaxes=True, horizontal_spacing=0.04)
    notes = []
    if isinstance(da, str):
        notes.append(da)
    else:
        z_all = da.values.astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            z_all = np.log10(z_all) if log else z_all
        z_all = np.where(np.isfinite(z_all), z_all, np.nan)
        for j, run in enumerate(runs_):
            z = z_all[[str(r) for r in da["run"].values].index(run)].T  # (layer, step)
            if not np.isfinite(z).any():
                notes.append(f"{run} has no finite {metric} of {kind} {matrix}")
            fig.add_trace(go.Heatmap(
                x=da["step"].values, y=da["layer"].values,
                z=[[None if not np.isfinite(v) else float(v) for v in rowv] for rowv in z],
                coloraxis="coloraxis", meta={"run": run, "role": "heatmap"},
                hovertemplate=f"{run}<br>step %{{x}}<br>layer %{{y}}<br>{label} %{{z:.4g}}"
                              "<extra></extra>"), row=1, col=j + 1)
            fig.update_xaxes(title_text="step", row=1, col=j + 1)
        fig.update_yaxes(title_text="layer", row=1, col=1, dtick=1)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "colorbar": {"title": {"text": label}}})
    return _finish(fig, f"{_label(metric)} of {kind} · {matrix}: layer × step", notes,
                   PANEL_HEIGHT + 140)


# ---------------------------------------------------------------- 3. spectrum


SPECTRUM_FLOOR = 1e-12
"""Normalised singular values at or below this are numerical zeros in float64 (roundoff of
an exactly rank-deficient matrix is ~max(m, n)·2.2e-16) and are not drawn on the log axis."""


def normalised_spectrum(sigma: np.ndarray) -> np.ndarray:
    """sigma_i / sigma_1 for a descending, NaN-padded spectrum (NaN where undefined)."""
    s = np.asarray(sigma, dtype=float)
    top = s[..., :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = s / top
    return np.where(np.isfinite(out), out, np.nan)


def spectrum(ds: xr.Dataset, kind: str = "weights", matrix: str = "ov_circuit", layer: int = 0,
             runs: Sequence[str] | None = None) -> go.Figure:
    """Spectrum evolution: sigma_i / sigma_1 against i for every step (colour = step), one
    panel per run, log y axis."""
    runs_ = _runs(ds, runs)
    fig = make_subplots(rows=1, cols=max(len(runs_), 1), subplot_titles=runs_ or [""],
                        shared_yaxes=True, horizontal_spacing=0.04)
    notes: list[str] = []
    title = f"Spectrum of {kind} · {matrix}, layer {layer}: σᵢ/σ₁ over steps"
    note = missing(ds, "sigma", kind, matrix)
    if note is not None:
        return _finish(fig, title, [note], PANEL_HEIGHT + 140)
    if layer not in [int(v) for v in ds["layer"].values]:
        return _finish(fig, title, [f"layer {layer} not in store"], PANEL_HEIGHT + 140)
    sig = ds["sigma"].sel(kind=kind, matrix=matrix, layer=layer).sortby("step")
    sig = sig.transpose("run", "step", "sv").load()
    steps = sig["step"].values
    smin, smax = float(steps.min()), float(steps.max())
    n_zero = 0
    for j, run in enumerate(runs_):
        s = normalised_spectrum(sig.sel(run=run).values)
        drawn = 0
        for k, step in enumerate(steps):
            y = s[k]
            ok = np.isfinite(y) & (y > SPECTRUM_FLOOR)
            n_zero = max(n_zero, int((np.isfinite(y) & ~ok).sum()))
            if not ok.any():
                continue
            frac = 0.0 if smax == smin else (float(step) - smin) / (smax - smin)
            fig.add_trace(go.Scatter(
                x=np.arange(1, y.size + 1)[ok], y=y[ok], mode="lines",
                line={"color": sample_colorscale("Viridis", [frac])[0], "width": 1.5},
                showlegend=False, meta={"run": run, "role": "spectrum", "step": int(step)},
                hovertemplate=f"{run} step {int(step)}<br>i %{{x}}<br>σᵢ/σ₁ %{{y:.3g}}"
                              "<extra></extra>"), row=1, col=j + 1)
            drawn += 1
        if not drawn:
            notes.append(f"{run} has no finite spectrum")
        fig.update_xaxes(title_text="index i", row=1, col=j + 1)
    if n_zero:
        notes.append(f"up to {n_zero} numerically zero values (σᵢ/σ₁ ≤ {SPECTRUM_FLOOR:g}) per "
                     "spectrum not drawn")
    fig.add_trace(go.Scatter(
        x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
        meta={"role": "colorbar"},
        marker={"color": [smin, smax], "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": {"text": "step"}}}), row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=1, title_text="σᵢ / σ₁")
    for j in range(2, len(runs_) + 1):
        fig.update_yaxes(type="log", row=1, col=j)
    return _finish(fig, title, notes, PANEL_HEIGHT + 140)


# ---------------------------------------------------------------- 4. training curves


def _has(ds: xr.Dataset, name: str) -> bool:
    return name in ds.data_vars and bool(np.isfinite(ds[name].values).any())


TIME_AXES = {"wall": ("wall_seconds", 3600.0, "hours", "wall-clock hours"),
             "gpu": ("gpu_hours", 1.0, "gpu_hours", "GPU-hours")}


def training_curves(ds: xr.Dataset, runs: Sequence[str] | None = None,
                    time: str = "auto") -> go.Figure:
    """Training loss, perplexity (macro; per domain dotted) and BLiMP accuracy against steps
    (top row) and against time (bottom row): `time="gpu"` GPU-hours (wall-clock × devices,
    the study's x-axis), `"wall"` wall-clock hours, `"auto"` GPU-hours when the store
    records them, else wall-clock hours."""
    if time not in ("auto", *TIME_AXES):
        raise ValueError(f"time {time!r}: expected auto, wall or gpu")
    if time == "auto":
        time = "gpu" if _has(ds, "gpu_hours") else "wall"
    tvar, tscale, tname, tlabel = TIME_AXES[time]
    runs_ = _runs(ds, runs)
    ds = ds.sortby("step") if "step" in ds.dims else ds
    panels = [(name, label) for name, label in (
        ("train_loss", "train loss"), ("ppl_macro", "perplexity"),
        ("blimp_overall", "BLiMP accuracy")) if _has(ds, name)]
    notes = [f"no {name} in store: {label} panel omitted" for name, label in (
        ("train_loss", "train loss"), ("ppl_macro", "perplexity"),
        ("blimp_overall", "BLiMP")) if not _has(ds, name)]
    xs = [("step", "step")]
    if _has(ds, tvar):
        xs.append((tname, tlabel))
    else:
        notes.append(f"no {tvar} in store: {tlabel} row omitted")
    title = f"Training curves: against steps (top) and {tlabel} (bottom)"
    if not panels:
        return _finish(go.Figure(), title, notes, 200)
    fig = make_subplots(rows=len(xs), cols=len(panels), horizontal_spacing=0.07,
                        vertical_spacing=0.16,
                        subplot_titles=[f"{lab} vs {xl}" for _, xl in xs for _, lab in panels])
    done: set[str] = set()
    for i, (xname, xlabel) in enumerate(xs):
        for j, (name, label) in enumerate(panels):
            for run in runs_:
                color = _color(ds, run)
                x = ds["step"].values.astype(float)
                if xname == tname:
                    x = ds[tvar].sel(run=run).values.astype(float) / tscale
                y = ds[name].sel(run=run).values.astype(float)
                ok = np.isfinite(x) & np.isfinite(y)
                if not ok.any():
                    continue
                fig.add_trace(go.Scatter(
                    x=x[ok], y=y[ok], mode="lines+markers", name=run, legendgroup=run,
                    showlegend=run not in done, line={"color": color},
                    marker={"color": color, "size": 5},
                    meta={"run": run, "role": "series", "variable": name, "x": xname},
                    hovertemplate=f"{run}<br>{xlabel} %{{x:.4g}}<br>{label} %{{y:.4g}}"
                                  "<extra></extra>"), row=i + 1, col=j + 1)
                done.add(run)
                if name == "ppl_macro" and "ppl" in ds.data_vars and "domain" in ds["ppl"].dims:
                    for dom in ds["domain"].values:
                        yd = ds["ppl"].sel(run=run, domain=dom).values.astype(float)
                        okd = np.isfinite(x) & np.isfinite(yd)
                        if okd.any():
                            fig.add_trace(go.Scatter(
                                x=x[okd], y=yd[okd], mode="lines", legendgroup=run,
                                showlegend=False, line={"color": color, "dash": "dot",
                                                        "width": 1},
                                meta={"run": run, "role": "series", "variable": "ppl",
                                      "domain": str(dom), "x": xname},
                                hovertemplate=f"{run} · {dom}<br>{xlabel} %{{x:.4g}}"
                                              "<br>perplexity %{y:.4g}<extra></extra>"),
                                row=i + 1, col=j + 1)
            fig.update_xaxes(title_text=xlabel, row=i + 1, col=j + 1)
            axis = {"type": "linear"}
            if name == "ppl_macro":
                shown = [ds[n].values.ravel() for n in ("ppl_macro", "ppl") if n in ds.data_vars]
                axis = _log_axis(np.concatenate(shown))
            fig.update_yaxes(title_text=label, row=i + 1, col=j + 1, **axis)
    return _finish(fig, title, notes, PANEL_HEIGHT * len(xs) + 140)


# ---------------------------------------------------------------- 5. ReLoRA vs decoder


def config_reset_steps(cfg: dict, last_step: float) -> list[int]:
    """Reset steps of a run.json (`cfg`) up to `last_step`: the updates a reset follows, as
    dynlab.runs.config.reset_steps reads them (recorded by the trainer, or derived for older
    runs)."""
    return reset_steps_of(cfg, last_step)


def _last_step(ds: xr.Dataset, run: str) -> float:
    """Last step at which `run` has a finite train_loss / wall_seconds / relora_cycle or is
    analysed; the store's last step when it has none of them."""
    steps = ds["step"].values.astype(float)
    have = np.zeros(steps.shape, dtype=bool)
    for name in ("train_loss", "wall_seconds", "relora_cycle", "analyzed"):
        if name in ds.data_vars and ds[name].dims == ("run", "step"):
            v = ds[name].sel(run=run).values.astype(float)
            have |= np.isfinite(v) & ((v != 0) if name == "analyzed" else True)
    return float(steps[have].max()) if have.any() else float(np.nanmax(steps))


def reset_steps(ds: xr.Dataset, run: str) -> list[int]:
    """Steps at which a ReLoRA run merged and reset its adapters.

    Preferred source: increases of `relora_cycle` between consecutive checkpoints. A rise of
    c between checkpoints s0 < s1 is placed at the config's reset steps inside (s0, s1] (or
    [s0, s1) when the checkpoint was written before its reset) when their number is exactly c;
    otherwise at s1, the first checkpoint that shows it. Without `relora_cycle`, the reset
    steps come from `run_configs[run]["relora"]` (see config_reset_steps)."""
    cfg = run_configs(ds).get(run, {})
    from_cfg = config_reset_steps(cfg, _last_step(ds, run))
    if "relora_cycle" not in ds.data_vars:
        return from_cfg
    cyc = ds["relora_cycle"].sel(run=run).sortby("step")
    cs, cv = cyc["step"].values.astype(float), cyc.values.astype(float)
    ok = np.isfinite(cv)
    cs, cv = cs[ok], cv[ok]
    if cs.size == 0:
        return from_cfg
    out: list[int] = []
    prev_s, prev_c = -np.inf, 0.0
    for s1, c1 in zip(cs, cv, strict=True):
        rise = int(round(c1 - prev_c))
        if rise > 0:
            inside = [r for r in from_cfg if prev_s < r <= s1]
            before = [r for r in from_cfg if prev_s <= r < s1]
            if len(inside) == rise:
                out += inside
            elif len(before) == rise:
                out += before
            else:
                out.append(int(s1))
        prev_s, prev_c = s1, c1
    return sorted(set(out))


def relora_comparison(ds: xr.Dataset, metrics: Sequence[str] = ("per",), kind: str = "weights",
                      matrix: str = "ov_circuit", runs: Sequence[str] | None = None,
                      confidence: float = 0.95) -> go.Figure:
    """ReLoRA against decoder side by side (columns = runs, decoder runs first; rows = the
    metrics, then train loss), with ReLoRA reset steps as dotted vertical lines."""
    runs_ = sorted(_runs(ds, runs), key=lambda r: (is_relora(ds, r), _runs(ds, None).index(r)))
    ds = ds.sortby("step") if "step" in ds.dims else ds
    title = (f"ReLoRA vs decoder: {', '.join(_label(m) for m in metrics)} of {kind} · {matrix}"
             " and train loss (dotted: ReLoRA resets)")
    notes = []
    if not any(is_relora(ds, r) for r in runs_):
        notes.append("no ReLoRA run in store")
    rows = list(metrics) + (["train_loss"] if _has(ds, "train_loss") else [])
    if not runs_ or not rows:
        return _finish(go.Figure(), title, notes + ["nothing to compare"], 200)
    types = {r: "relora" if is_relora(ds, r) else "decoder" for r in runs_}
    labels = [r if r == types[r] else f"{r} ({types[r]})" for r in runs_]
    fig = make_subplots(rows=len(rows), cols=len(runs_), shared_yaxes=True, shared_xaxes=True,
                        subplot_titles=[lab if i == 0 else "" for i in range(len(rows))
                                        for lab in labels],
                        horizontal_spacing=0.04, vertical_spacing=0.1)
    done: set[str] = set()
    for j, run in enumerate(runs_):
        for i, name in enumerate(rows):
            if name == "train_loss":
                y = ds["train_loss"].sel(run=run).values.astype(float)
                x = ds["step"].values
                ok = np.isfinite(y)
                if ok.any():
                    color = _color(ds, run)
                    fig.add_trace(go.Scatter(
                        x=x[ok], y=y[ok], mode="lines+markers", name=run, legendgroup=run,
                        showlegend=run not in done, line={"color": color},
                        marker={"color": color, "size": 5},
                        meta={"run": run, "role": "series", "variable": "train_loss"}),
                        row=i + 1, col=j + 1)
                    done.add(run)
                if j == 0:
                    fig.update_yaxes(title_text="train loss", row=i + 1, col=1)
                fig.update_xaxes(title_text="step" if i == len(rows) - 1 else None,
                                 row=i + 1, col=j + 1)
            else:
                notes += _add_trajectory(fig, ds, name, kind, matrix, [run], i + 1, j + 1, done,
                                         confidence)
                if j > 0:
                    fig.update_yaxes(title_text=None, row=i + 1, col=j + 1)
                if i < len(rows) - 1:
                    fig.update_xaxes(title_text=None, row=i + 1, col=j + 1)
        if is_relora(ds, run):
            for s in reset_steps(ds, run):
                for i in range(len(rows)):
                    fig.add_vline(x=s, row=i + 1, col=j + 1, name="reset",
                                  line={"dash": "dot", "color": "grey", "width": 1},
                                  exclude_empty_subplots=False)
    return _finish(fig, title, notes, PANEL_HEIGHT * len(rows) + 120)


# ---------------------------------------------------------------- summary table


def final_mean(ds: xr.Dataset, metric: str, kind: str, run: str) -> tuple[float, float]:
    """(step, value): mean of the finite `metric` values over all layers and matrices at the
    last step where `run` has any finite value of it for `kind` (for LOG_METRICS the
    geometric mean exp(mean ln x) of the finite positive values); NaNs if none."""
    if metric not in ds.data_vars or kind not in [str(k) for k in ds["kind"].values]:
        return float("nan"), float("nan")
    da = ds[metric].sel(run=run, kind=kind).sortby("step").load()
    x = da.where(np.isfinite(da))
    if metric in LOG_METRICS:
        m = np.exp(np.log(x.where(x > 0)).mean([d for d in x.dims if d != "step"]))
    else:
        m = x.mean([d for d in x.dims if d != "step"])
    return last_finite(m)


def summary_table(ds: xr.Dataset, runs: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per run: final step, final train loss, perplexity (ppl_macro), BLiMP overall
    (each at the last step where it is finite), and PER / CN of weights and updates averaged
    over layers and matrices at the last step where they are finite (see final_mean; CN
    geometrically, over the finite values), and CN_nz of updates (the condition of their
    non-zero part, finite where CN is infinite) likewise."""
    rows = []
    for run in _runs(ds, runs):
        row: dict[str, float | str] = {"run": run,
                                       "type": "relora" if is_relora(ds, run) else "decoder"}
        steps = []
        for name, col in (("train_loss", "final loss"), ("ppl_macro", "perplexity"),
                          ("blimp_overall", "BLiMP")):
            s, v = (last_finite(ds[name].sel(run=run)) if name in ds.data_vars
                    else (float("nan"), float("nan")))
            row[col] = v
            steps.append(s)
        for metric, kind in (("per", "weights"), ("per", "updates"), ("cn", "weights"),
                             ("cn", "updates"), ("cn_nz", "updates")):
            s, v = final_mean(ds, metric, kind, run)
            row[f"{_label(metric)} {kind}"] = v
            steps.append(s)
        row["final step"] = float(np.nanmax(steps)) if np.isfinite(steps).any() else np.nan
        rows.append(row)
    cols = ["run", "type", "final step", "final loss", "perplexity", "BLiMP", "PER weights",
            "PER updates", "CN weights", "CN updates", "CN_nz updates"]
    return pd.DataFrame(rows, columns=cols).set_index("run")


# ---------------------------------------------------------------- metric against loss

#: the loss on the x axis of `metric_against_loss`, in order of preference with "auto"
LOSSES = {"eval_loss": "held-out mean token loss (nats)",
          "bpb_pooled": "held-out bits per byte",
          "train_loss": "training loss (nats)"}


def metric_against_loss(ds: xr.Dataset, metric: str = "per", kind: str = "weights",
                        matrix: str = "ov_circuit", loss: str = "auto",
                        runs: Sequence[str] | None = None) -> go.Figure:
    """A spectral metric (mean over layers) against a loss, one line per run through its
    checkpoints in step order: how conditioning moves as the model learns. loss: eval_loss
    (held-out mean token loss, written by `dynlab eval --store`), bpb_pooled (bits per
    byte, comparable across tokenizers), train_loss, or "auto" (the first of these the
    store holds). Works for any source: the loss comes from the evaluation, not training."""
    if loss != "auto" and loss not in LOSSES:
        raise ValueError(f"loss {loss!r}: expected auto, {', '.join(LOSSES)}")
    choice = next((n for n in LOSSES if _has(ds, n)), None) if loss == "auto" else loss
    title = f"{_label(metric)} of {kind} · {matrix} against loss"
    if choice is None or not _has(ds, choice):
        return _finish(go.Figure(), title, [f"no {loss if loss != 'auto' else 'loss'} in "
                                            "store: run `dynlab eval SOURCE --store STORE`"],
                       200)
    da = select_metric(ds, metric, kind, matrix)
    if isinstance(da, str):
        return _finish(go.Figure(), title, [da], 200)
    y_all = da.mean("layer", skipna=True)
    x_all = ds[choice].sortby("step")
    fig = go.Figure()
    notes = []
    for run in _runs(ds, runs):
        x = x_all.sel(run=run).values.astype(float)
        y = y_all.sel(run=run).values.astype(float)
        steps = da["step"].values
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            notes.append(f"{run}: no checkpoint with both {choice} and {metric}")
            continue
        color = _color(ds, run)
        fig.add_trace(go.Scatter(
            x=x[ok], y=y[ok], mode="lines+markers", name=run, line={"color": color},
            marker={"color": color, "size": 7}, customdata=steps[ok],
            hovertemplate=(f"{run}<br>step %{{customdata}}<br>{choice} %{{x:.4g}}"
                           f"<br>{metric} %{{y:.4g}}<extra></extra>"),
            meta={"run": run, "role": "series", "variable": metric, "x": choice}))
    fig.update_xaxes(title_text=LOSSES[choice], autorange="reversed")
    fig.update_yaxes(title_text=f"{_label(metric)} (mean over layers)")
    return _finish(fig, title + " (loss falls to the right)", notes, PANEL_HEIGHT + 140)
