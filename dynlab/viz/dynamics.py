"""Figures of the function-space dynamics (dynlab.analysis.dynamics): sharpness against the
adaptive edge-of-stability threshold, the loss barrier per consecutive pair (ReLoRA reset
pairs marked), the gradient noise scale beside the run's batch size, attention entropy and
sink rate per layer, and the update-to-weight ratio. Each takes a store Dataset and returns a
plotly Figure; `dynamics_sections` lists those the store has data for."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from dynlab.viz.figures import PANEL_HEIGHT
from dynlab.viz.representations import finish, run_color, run_names


def series(fig: go.Figure, ds: xr.Dataset, run: str, x: np.ndarray, y: np.ndarray, *,
           name: str, row: int = 1, col: int = 1, dash: str | None = None,
           show: bool = True, role: str = "series") -> bool:
    keep = np.isfinite(y)
    if not keep.any():
        return False
    fig.add_trace(go.Scatter(
        x=x[keep], y=y[keep], mode="lines+markers", name=name, legendgroup=run,
        showlegend=show, line={"color": run_color(ds, run), "dash": dash},
        meta={"run": run, "role": role}), row=row, col=col)
    return True


def sharpness_figure(ds: xr.Dataset) -> go.Figure:
    """Left: λ_max(H) and tr(H)/dim-free trace per run. Right: the preconditioned sharpness
    λ_max(P⁻¹H) against (2 + 2β₁)/((1 − β₁)·η) (log axis)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "Hessian: top eigenvalue (solid), trace (dotted, right scale)",
        "preconditioned sharpness λ_max(P⁻¹H) vs threshold (2+2β₁)/((1−β₁)η)"],
        specs=[[{"secondary_y": True}, {}]])
    notes: list[str] = []
    if "hess_top" not in ds.data_vars:
        return finish(fig, "Sharpness", ["no sharpness in the store"], PANEL_HEIGHT + 120)
    steps = ds["step"].values
    for run in run_names(ds):
        r = ds.sel(run=run)
        series(fig, ds, run, steps, r["hess_top"].isel(hess_k=0).values, name=run)
        keep = np.isfinite(r["hess_trace"].values)
        if keep.any():
            fig.add_trace(go.Scatter(
                x=steps[keep], y=r["hess_trace"].values[keep], mode="lines", name=f"{run} trace",
                legendgroup=run, showlegend=False, line={"color": run_color(ds, run),
                                                         "dash": "dot"},
                error_y={"type": "data", "array": r["hess_trace_se"].values[keep]},
                meta={"run": run, "role": "series"}), row=1, col=1, secondary_y=True)
        if series(fig, ds, run, steps, r["precond_sharpness"].values, name=f"{run} λ(P⁻¹H)",
                  col=2, show=False):
            series(fig, ds, run, steps, r["eos_threshold"].values, name=f"{run} threshold",
                   col=2, dash="dash", show=False)
        elif np.isfinite(r["hess_top"].values).any():
            notes.append(f"{run}: no Adam state (preconditioned sharpness needs a dynlab "
                         "decoder run's trainer_state.pt)")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="step")
    return finish(fig, "Sharpness against the adaptive edge-of-stability threshold", notes,
                  PANEL_HEIGHT + 160)


def barrier_figure(ds: xr.Dataset) -> go.Figure:
    """The barrier of each consecutive pair (plotted at the later step); pairs that straddle
    a ReLoRA merge-and-reset drawn as open diamonds."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "barrier max_α L(θ(α)) − chord", "loss along the line, last pair (α from prev to step)"])
    notes: list[str] = []
    if "barrier" not in ds.data_vars:
        return finish(fig, "Loss barriers", ["no barrier in the store"], PANEL_HEIGHT + 120)
    steps = ds["step"].values
    for run in run_names(ds):
        r = ds.sel(run=run)
        b = r["barrier"].values
        series(fig, ds, run, steps, b, name=run)
        reset = (r["reset_pair"].values == 1) & np.isfinite(b)
        if reset.any():
            fig.add_trace(go.Scatter(
                x=steps[reset], y=b[reset], mode="markers", name=f"{run}: reset pairs",
                legendgroup=run, marker={"symbol": "diamond-open", "size": 12,
                                         "color": run_color(ds, run)},
                meta={"run": run, "role": "series"}), row=1, col=1)
        ll = r["line_loss"].values
        done = np.where(np.isfinite(ll).all(axis=-1))[0]
        if done.size:
            j = done[-1]
            fig.add_trace(go.Scatter(
                x=ds["line_alpha"].values, y=ll[j], mode="lines+markers",
                name=f"{run} step {int(steps[j])}", legendgroup=run, showlegend=False,
                line={"color": run_color(ds, run)}, meta={"run": run, "role": "series"}),
                row=1, col=2)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="α", row=1, col=2)
    return finish(fig, "Loss barrier between consecutive checkpoints", notes,
                  PANEL_HEIGHT + 140)


def noise_figure(ds: xr.Dataset) -> go.Figure:
    """B_simple (whole model, log axis) over steps beside the batch size the run trained
    with (dashed)."""
    fig = make_subplots(rows=1, cols=1)
    if "gns_b_simple" not in ds.data_vars:
        return finish(fig, "Gradient noise scale", ["no gns in the store"], PANEL_HEIGHT + 120)
    steps = ds["step"].values
    notes = []
    for run in run_names(ds):
        r = ds.sel(run=run)
        b = r["gns_b_simple"].values
        if np.any(np.isfinite(b) & (b <= 0)):
            notes.append(f"{run}: B_simple ≤ 0 at some steps (|G|² estimate ≤ 0: noise "
                         "dominates) not drawn on the log axis")
        series(fig, ds, run, steps, np.where(b > 0, b, np.nan), name=run)
        series(fig, ds, run, steps, r["train_batch_size"].values, name=f"{run} batch size",
               dash="dash", show=False)
    fig.update_yaxes(type="log", title_text="sequences")
    fig.update_xaxes(title_text="step")
    return finish(fig, "Gradient noise scale B_simple = tr(Σ)/|G|² (critical batch size) "
                  "beside the batch size used (dashed)", notes, PANEL_HEIGHT + 140)


def attention_figure(ds: xr.Dataset) -> go.Figure:
    """Per layer: mean attention entropy over heads (top) and sink rate (bottom) over
    steps, one line per run."""
    layers = [int(v) for v in ds["layer"].values] if "layer" in ds.coords else []
    cols = max(1, min(4, len(layers)))
    fig = make_subplots(rows=2, cols=cols, subplot_titles=[f"layer {i}" for i in layers[:cols]],
                        shared_yaxes=True, vertical_spacing=0.15, horizontal_spacing=0.04)
    if "attn_entropy" not in ds.data_vars:
        return finish(fig, "Attention", ["no attention in the store"], PANEL_HEIGHT + 120)
    steps = ds["step"].values
    notes = [f"layers beyond {cols} not shown"] if len(layers) > cols else []
    for n, layer in enumerate(layers[:cols]):
        for run in run_names(ds):
            r = ds.sel(run=run, layer=layer)
            ent = np.nanmean(np.where(np.isfinite(r["attn_entropy"].values),
                                      r["attn_entropy"].values, np.nan), axis=-1) \
                if np.isfinite(r["attn_entropy"].values).any() else \
                np.full(len(steps), np.nan)
            series(fig, ds, run, steps, ent, name=run, row=1, col=n + 1, show=n == 0)
            series(fig, ds, run, steps, r["sink_rate"].values, name=run, row=2, col=n + 1,
                   show=False)
    fig.update_yaxes(title_text="entropy (nats)", row=1, col=1)
    fig.update_yaxes(title_text="sink rate (ε = 0.3)", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2)
    return finish(fig, "Attention entropy (mean over heads) and sink rate per layer", notes,
                  2 * PANEL_HEIGHT + 160)


def update_ratio_figure(ds: xr.Dataset) -> go.Figure:
    """‖ΔW‖_F/‖W_prev‖_F (log axis), median over layers and matrices, per run."""
    fig = make_subplots(rows=1, cols=1)
    if "update_ratio" not in ds.data_vars:
        return finish(fig, "Update-to-weight ratio", ["no update_ratio in the store"],
                      PANEL_HEIGHT + 120)
    steps = ds["step"].values
    for run in run_names(ds):
        v = ds["update_ratio"].sel(run=run).values.reshape(len(steps), -1)
        med = np.array([np.nanmedian(row) if np.isfinite(row).any() else np.nan for row in v])
        series(fig, ds, run, steps, med, name=run)
    fig.update_yaxes(type="log", title_text="‖ΔW‖/‖W‖")
    fig.update_xaxes(title_text="step")
    return finish(fig, "Update-to-weight ratio between checkpoints (median over matrices)",
                  [], PANEL_HEIGHT + 120)


def has_values(ds: xr.Dataset, name: str) -> bool:
    return name in ds.data_vars and bool(np.isfinite(ds[name].values).any())


def dynamics_sections(ds: xr.Dataset) -> list[tuple[str, str, Callable[[], go.Figure]]]:
    """(title, caption, figure maker) of the report's function-space figures the store has
    data for (none for a store without --dynamics results, so such reports are as before);
    the update-to-weight ratio joins them when the store has dynamics."""
    out: list[tuple[str, str, Callable[[], go.Figure]]] = []
    if not any(has_values(ds, n) for n in ("hess_top", "barrier", "gns_b_simple",
                                           "attn_entropy")):
        return out
    if has_values(ds, "update_ratio"):
        out.append(("Update-to-weight ratio",
                    "‖W_t − W_prev‖_F / ‖W_prev‖_F of every matrix between consecutive "
                    "checkpoints, median over layers and matrices: the relative size of the "
                    "steps taken between checkpoints.", lambda: update_ratio_figure(ds)))
    if has_values(ds, "hess_top"):
        out.append(("Sharpness and the edge of stability",
                    "Largest Hessian eigenvalue (Lanczos) and Hutchinson trace ± standard "
                    "error on the fixed batch (left); Adam's preconditioned sharpness "
                    "λ_max(P⁻¹H) against the stability threshold (2 + 2β₁)/((1 − β₁)·η) of the "
                    "checkpoint's learning rate (right, Cohen et al. 2022): training at the "
                    "edge of stability keeps the two together.", lambda: sharpness_figure(ds)))
    if has_values(ds, "barrier"):
        out.append(("Loss barriers between checkpoints",
                    "max_α of the loss on the straight line from the previous checkpoint "
                    "minus the chord between the two losses (0: one basin), plotted at the "
                    "later step; ReLoRA pairs that straddle a merge-and-reset as diamonds. "
                    "Right: the loss along the line of the last pair.",
                    lambda: barrier_figure(ds)))
    if has_values(ds, "gns_b_simple"):
        out.append(("Gradient noise scale",
                    "B_simple = tr(Σ)/|G|² from per-sequence gradients of the fixed batch "
                    "(McCandlish et al. 2018), an estimate of the critical batch size, beside "
                    "the batch size the run trained with.", lambda: noise_figure(ds)))
    if has_values(ds, "attn_entropy"):
        out.append(("Attention entropy and sinks",
                    "Mean attention entropy over heads and the share of heads whose mean "
                    "attention to the first token exceeds 0.3 (Gu et al. 2024), per layer "
                    "over steps.", lambda: attention_figure(ds)))
    return out
