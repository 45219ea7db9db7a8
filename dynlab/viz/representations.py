"""Figures of representations and circuits: CKA / PWCCA heatmaps (layer × step), anisotropy
over steps, the QK circuit's PER beside the OV circuit's, and the heavy-tail α over steps.

Every figure is a plotly Figure whose data traces carry meta {"run", "role"} (role "mean",
"series" or "heatmap") and whose layout meta {"notes"} lists what the store lacked, as the
other dynlab figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from dynlab.analysis.heavytail import MIN_EIGENVALUES
from dynlab.viz.figures import PALETTE, PANEL_HEIGHT, layer_mean_ci

DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def run_names(ds: xr.Dataset) -> list[str]:
    """The store's runs, in store order (none for a store without runs)."""
    return [str(r) for r in ds["run"].values] if "run" in ds.coords else []


def run_color(ds: xr.Dataset, run: str) -> str:
    """One colour per run, the same in every figure of a store."""
    runs = run_names(ds)
    return PALETTE[runs.index(run) % len(PALETTE)] if run in runs else PALETTE[0]


def finish(fig: go.Figure, title: str, notes: list[str], height: int) -> go.Figure:
    """Title, notes (as a subtitle and in `layout.meta["notes"]`), height and style."""
    sub = "; ".join(notes)
    fig.update_layout(
        title={"text": title, "subtitle": {"text": f"note: {sub}" if sub else ""}},
        height=height, meta={"notes": list(notes)}, template="plotly_white",
        margin={"t": 110 if sub else 90}, legend={"title": {"text": "run"}})
    return fig


def _values(v: np.ndarray) -> list:
    return [None if not np.isfinite(x) else float(x) for x in v]


#: titles' names of the metrics
METRIC_LABELS = {"cka": "CKA", "cka_debiased": "debiased CKA", "svcca": "SVCCA",
                 "pwcca": "PWCCA", "anisotropy": "anisotropy", "isoscore": "IsoScore"}


def site_label(site: str) -> str:
    """`residual stream`, or `<module> output`."""
    return "residual stream" if site == "residual" else f"{site} output"


def colour_range(values: np.ndarray, top: float = 1.0, span: float = 0.1) -> tuple[float, float]:
    """(cmin, cmax) of a similarity heatmap: up to `top` (1, identical representations), from
    the smallest finite value rounded down to 0.05 and at least `span` below the top, so that
    indices that stay near 1 keep visible contrast; (0, 1) when nothing is finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, top
    hi = max(top, float(finite.max()))
    lo = min(np.floor(float(finite.min()) * 20) / 20, hi - span)
    return float(lo), float(hi)


def default_site(ds: xr.Dataset, metric: str) -> str:
    """The residual stream, or, where the store has no finite `metric` for it (pico-train runs
    save only some modules' outputs), the first site that has one."""
    if metric not in ds.data_vars or "act_site" not in ds.coords:
        return "residual"
    sites = [str(s) for s in ds["act_site"].values]
    for site in ["residual"] + [s for s in sites if s != "residual"]:
        if bool(np.isfinite(ds[metric].sel(act_site=site).values).any()):
            return site
    return "residual"


def similarity_heatmap(ds: xr.Dataset, metric: str = "cka", target: str = "final",
                       site: str | None = None) -> go.Figure:
    """Layer × step heatmap of a comparative index (cka, cka_debiased, svcca, pwcca) against
    `target` at `site` (default: `default_site`), one panel per run sharing one colour scale:
    up to 1, from the smallest value rounded down to 0.05 (`colour_range`), so that values
    near 1 stay distinguishable."""
    site = site or default_site(ds, metric)
    runs = run_names(ds)
    notes: list[str] = []
    fig = make_subplots(rows=1, cols=max(len(runs), 1), subplot_titles=runs or [""],
                        shared_yaxes=True, horizontal_spacing=0.04)
    label = METRIC_LABELS.get(metric, metric)
    cmin, cmax = 0.0, 1.0
    if metric not in ds.data_vars:
        notes.append(f"variable '{metric}' not in store")
    elif target not in [str(t) for t in ds["target"].values]:
        notes.append(f"target '{target}' not in store")
    else:
        da = ds[metric].sel(target=target, act_site=site).sortby("step").load()
        cmin, cmax = colour_range(da.sel(run=runs).values)
        for j, run in enumerate(runs):
            z = da.sel(run=run).transpose("layer", "step").values
            if not np.isfinite(z).any():
                notes.append(f"{run} has no finite {metric}")
            fig.add_trace(go.Heatmap(
                x=da["step"].values, y=da["layer"].values, z=[_values(r) for r in z],
                coloraxis="coloraxis", meta={"run": run, "role": "heatmap"},
                hovertemplate=f"{run}<br>step %{{x}}<br>layer %{{y}}<br>{label} %{{z:.4g}}"
                              "<extra></extra>"), row=1, col=j + 1)
            fig.update_xaxes(title_text="step", row=1, col=j + 1)
            fig.update_yaxes(dtick=1, row=1, col=j + 1)
        fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": cmin, "cmax": cmax,
                                 "colorbar": {"title": {"text": label}}})
    return finish(fig, f"{label} of the {site_label(site)} against the {target} "
                 "checkpoint: layer × step", notes, PANEL_HEIGHT + 140)


def anisotropy_over_steps(ds: xr.Dataset, metric: str = "anisotropy",
                          site: str | None = None) -> go.Figure:
    """`metric` (anisotropy or isoscore) of `site` (default: `default_site`) over steps: one
    panel per layer, one line per run (decoder against relora in the same panel)."""
    site = site or default_site(ds, metric)
    runs = run_names(ds)
    notes: list[str] = []
    layers = [int(v) for v in ds["layer"].values] if "layer" in ds.coords else []
    cols = max(1, min(4, len(layers)))
    rows = max(1, -(-len(layers) // cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {i}" for i in layers],
                        shared_yaxes=True, vertical_spacing=0.15, horizontal_spacing=0.04)
    if metric not in ds.data_vars:
        notes.append(f"variable '{metric}' not in store")
    else:
        da = ds[metric].sel(act_site=site).sortby("step").load()
        for n, layer in enumerate(layers):
            r, c = n // cols + 1, n % cols + 1
            for run in runs:
                y = da.sel(run=run, layer=layer).values
                keep = np.isfinite(y)
                if not keep.any():
                    continue
                fig.add_trace(go.Scatter(
                    x=da["step"].values[keep], y=y[keep], mode="lines+markers", name=run,
                    legendgroup=run, showlegend=n == 0, line={"color": run_color(ds, run)},
                    meta={"run": run, "role": "series"}), row=r, col=c)
            fig.update_xaxes(title_text="step", row=r, col=c)
        fig.update_yaxes(title_text=METRIC_LABELS.get(metric, metric), row=1, col=1)
    return finish(fig, f"{METRIC_LABELS.get(metric, metric)} of the "
                 f"{site_label(site)} over steps, per layer", notes,
                 PANEL_HEIGHT * rows + 120)


def _mean_trace(fig, ds, da: xr.DataArray, run: str, row: int, col: int, show: bool,
                label: str) -> bool:
    st = layer_mean_ci(da)
    r = st.sel(run=run)
    keep = r["n"].values > 0
    if not keep.any():
        return False
    fig.add_trace(go.Scatter(
        x=r["step"].values[keep], y=r["mean"].values[keep], mode="lines+markers", name=run,
        legendgroup=run, showlegend=show, line={"color": run_color(ds, run)},
        hovertemplate=f"{run}<br>step %{{x}}<br>{label} %{{y:.4g}}<extra></extra>",
        meta={"run": run, "role": "mean"}), row=row, col=col)
    return True


def qk_beside_ov(ds: xr.Dataset, metric: str = "per", kinds: Sequence[str] = ("weights",
                 "updates")) -> go.Figure:
    """The whole-layer QK circuit's metric beside the OV circuit's, mean over layers, one row
    per kind."""
    runs = run_names(ds)
    have_kinds = [str(k) for k in ds["kind"].values] if "kind" in ds.coords else []
    kinds = [k for k in kinds if k in have_kinds]
    notes: list[str] = []
    fig = make_subplots(rows=max(1, len(kinds)), cols=2, shared_xaxes=True,
                        subplot_titles=[f"{k} · {c}" for k in kinds
                                        for c in ("QK circuit", "OV circuit")] or ["", ""],
                        vertical_spacing=0.12, horizontal_spacing=0.06)
    qk, ov = f"qk_{metric}", metric
    if qk not in ds.data_vars or ov not in ds.data_vars:
        notes.append(f"variable '{qk if qk not in ds.data_vars else ov}' not in store")
        kinds = []
    shown: set[str] = set()
    for i, kind in enumerate(kinds):
        panels = (ds[qk].sel(kind=kind).sortby("step").transpose("run", "step", "layer").load(),
                  ds[ov].sel(kind=kind, matrix="ov_circuit").sortby("step")
                  .transpose("run", "step", "layer").load())
        for j, da in enumerate(panels):
            for run in runs:
                if _mean_trace(fig, ds, da, run, i + 1, j + 1, run not in shown, metric):
                    shown.add(run)
            fig.update_yaxes(title_text=metric.upper(), row=i + 1, col=j + 1)
        fig.update_xaxes(title_text="step", row=len(kinds), col=1)
        fig.update_xaxes(title_text="step", row=len(kinds), col=2)
    return finish(fig, f"{metric.upper()} of the QK circuit beside the OV circuit (mean over "
                 "layers)", notes, PANEL_HEIGHT * max(1, len(kinds)) + 120)


def alpha_over_steps(ds: xr.Dataset, kind: str = "weights",
                     matrices: Sequence[str] = ("attention.q_proj", "attention.v_proj",
                                                "swiglu.w_0", "swiglu.w_2")) -> go.Figure:
    """Heavy-tail α of the eigenvalues σ² over steps, mean over layers, one panel per matrix."""
    runs = run_names(ds)
    notes: list[str] = []
    fig = make_subplots(rows=1, cols=len(matrices), subplot_titles=[f"{kind} · {m}"
                                                                    for m in matrices],
                        shared_yaxes=True, horizontal_spacing=0.04)
    if "alpha" not in ds.data_vars:
        notes.append("variable 'alpha' not in store (dynlab recompute STORE --metrics alpha)")
    elif kind not in [str(k) for k in ds["kind"].values]:
        notes.append(f"kind '{kind}' not in store")
    else:
        shown: set[str] = set()
        for j, m in enumerate(matrices):
            da = ds["alpha"].sel(kind=kind, matrix=m).sortby("step").transpose(
                "run", "step", "layer").load()
            drawn = False
            for run in runs:
                if _mean_trace(fig, ds, da, run, 1, j + 1, run not in shown, "alpha"):
                    shown.add(run)
                    drawn = True
            if not drawn:
                notes.append(f"{m}: no finite α (the fit needs at least {MIN_EIGENVALUES} "
                             "non-zero eigenvalues)")
            fig.update_xaxes(title_text="step", row=1, col=j + 1)
        fig.update_yaxes(title_text="α", row=1, col=1)
    return finish(fig, f"Heavy-tail α of the {kind}' eigenvalue spectra (mean over layers)",
                 notes, PANEL_HEIGHT + 140)


def has_representations(ds: xr.Dataset) -> bool:
    """Whether the store holds activation results (the report's Representations part)."""
    return any(name in ds.data_vars for name in ("cka", "anisotropy"))


def representation_sections(ds: xr.Dataset) -> list[tuple[str, str, Callable[[], go.Figure]]]:
    """(title, caption, figure maker) of the report's "Representations" figures: when the
    store holds activation results, those of its figures whose variables it has (the QK and
    α figures included); none otherwise, so reports of parameter-only stores are as before."""
    out: list[tuple[str, str, Callable[[], go.Figure]]] = []
    if not has_representations(ds):
        return out
    if "cka" in ds.data_vars:
        out.append((
            "Representations: CKA against the final checkpoint",
            "Linear CKA (biased HSIC estimator, as pico-analyze) between each layer's residual "
            "stream at each step and at the run's final checkpoint, on the same tokens of the "
            "learning-dynamics batch: where and when the representations settle. (Runs that "
            "saved no residual stream, such as pico-train's: the first module it saved.)",
            lambda: similarity_heatmap(ds, "cka", "final")))
    if "pwcca" in ds.data_vars:
        out.append((
            "Representations: PWCCA against the final checkpoint",
            "Projection-weighted CCA of the same pairs (NaN, blank, where the samples are too "
            "few for CCA to be defined).",
            lambda: similarity_heatmap(ds, "pwcca", "final")))
    if "anisotropy" in ds.data_vars:
        out.append((
            "Representations: anisotropy",
            "Mean cosine similarity between the residual-stream vectors of different tokens, "
            "per layer: 1 means every token sits in one narrow cone.",
            lambda: anisotropy_over_steps(ds, "anisotropy")))
    if "qk_per" in ds.data_vars:
        out.append((
            "QK circuit beside OV circuit",
            "PER of the whole-layer QK circuit Σ_h Q_hᵀK_g(h) (what attention compares) beside "
            "that of the OV circuit Σ_h O_hV_g(h) (what it writes), for weights and updates.",
            lambda: qk_beside_ov(ds, "per")))
    if "alpha" in ds.data_vars:
        out.append((
            "Heavy-tail α",
            "Power-law exponent α of the tail of each matrix's eigenvalue spectrum σ² "
            "(WeightWatcher's fit); smaller α means a heavier tail.",
            lambda: alpha_over_steps(ds)))
    return out
