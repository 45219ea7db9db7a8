"""Figures of WeightWatcher's heavy-tailed self-regularisation family over a run
(dynlab.analysis.heavytail): the ESD of one matrix at chosen steps on log-log axes with its
fitted power-law tail and Marchenko–Pastur bulk, the family's metrics over steps per layer,
and the under-/over-trained flags as a table.

Every figure is a plotly Figure whose data traces carry meta {"run", "role"} (roles "spectrum"
for the ESD, "fit" for the fitted curves, "series" for trajectories, "table" for the flags)
and whose layout meta {"notes"} lists what the store lacked, as the other dynlab figures."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from dynlab.analysis.heavytail import OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA, tpl_normaliser
from dynlab.viz.figures import PANEL_HEIGHT

#: The trajectories drawn by default: the tail exponent, the MP spikes, the correlation traps.
TRAJECTORY_METRICS: tuple[str, ...] = ("alpha", "num_spikes", "rand_distance")


def _done(fig: go.Figure, title: str, notes: list[str], height: int) -> go.Figure:
    sub = "; ".join(notes)
    fig.update_layout(
        title={"text": title, "subtitle": {"text": f"note: {sub}" if sub else ""}},
        height=height, meta={"notes": list(notes)}, template="plotly_white",
        margin={"t": 110 if sub else 90})
    return fig


def _run(ds: xr.Dataset, run: str | None) -> str | None:
    runs = [str(r) for r in ds["run"].values] if "run" in ds.coords else []
    if run is None:
        return runs[0] if runs else None
    return run if run in runs else None


def pick_steps(steps: Sequence[int], n: int = 4) -> list[int]:
    """At most n of `steps` (sorted), evenly spaced, first and last included."""
    s = sorted(int(x) for x in steps)
    if len(s) <= n:
        return s
    idx = np.unique(np.round(np.linspace(0, len(s) - 1, n)).astype(int))
    return [s[i] for i in idx]


def power_law_density(lam: np.ndarray, alpha: float, xmin: float, frac: float) -> np.ndarray:
    """The fitted tail's share of the ESD density: frac·(α − 1)/x_min·(λ/x_min)^(−α) for
    λ ≥ x_min (Clauset et al. 2009, eq. 2.2), frac = n_tail/n."""
    return frac * (alpha - 1) / xmin * (lam / xmin) ** (-alpha)


def tpl_density(lam: np.ndarray, alpha: float, lam_: float, xmin: float,
                frac: float) -> np.ndarray:
    """The fitted truncated power law's share of the ESD density: frac·C·λ^(−α)·e^(−Λλ) for
    λ ≥ x_min, C = Λ^(1−α)/Γ(1−α, Λ·x_min) (Clauset et al. 2009, table 1;
    `heavytail.tpl_normaliser`), frac = n_tail/n."""
    with np.errstate(all="ignore"):
        return frac * tpl_normaliser(alpha, lam_, xmin) * lam ** (-alpha) * np.exp(-lam_ * lam)


def mp_density_lambda(lam: np.ndarray, q: float, sigma: float, scale2: float) -> np.ndarray:
    """The MP density in the eigenvalues' own units: the fit was made on x = s²·λ (mean 1),
    ρ_x(x) = Q·√((λ₊ − x)(x − λ₋))/(2π σ² x), λ± = σ²(1 ± 1/√Q)², so ρ_λ(λ) = s²·ρ_x(s²·λ)."""
    x = scale2 * lam
    b, a = (sigma * (1 + 1 / math.sqrt(q))) ** 2, (sigma * (1 - 1 / math.sqrt(q))) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = q * np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * np.pi * sigma ** 2 * x)
    return scale2 * np.where((x > a) & (x < b), rho, 0.0)


def esd(ds: xr.Dataset, kind: str = "weights", matrix: str = "swiglu.w_2", layer: int = 0,
        steps: Sequence[int] | None = None, run: str | None = None) -> go.Figure:
    """The empirical spectral density of one matrix's eigenvalues λ = σ² at `steps` (default:
    up to four, first and last included), one panel per step, log-log: the histogram on
    log-spaced bins, the fitted power-law tail from x_min (dashed), the MP bulk fitted by
    `mp_fit` (solid) and its edge λ₊ (dotted), and the truncated power law from the same x_min
    (dash-dot) when the store holds `tpl_alpha` and `tpl_lambda`."""
    run_ = _run(ds, run)
    title = f"ESD of {kind} · {matrix}, layer {layer}" + (f" ({run_})" if run_ else "")
    notes: list[str] = []
    if run_ is None or "sigma" not in ds.data_vars:
        return _done(go.Figure(), title, ["no spectra in store"], PANEL_HEIGHT + 140)
    if kind not in [str(k) for k in ds["kind"].values] or matrix not in [
            str(m) for m in ds["matrix"].values]:
        return _done(go.Figure(), title, [f"{kind} · {matrix} not in store"], PANEL_HEIGHT + 140)
    cell = ds.sel(run=run_, kind=kind, matrix=matrix, layer=layer)
    sig = cell["sigma"].load()
    ok_steps = [int(s) for s in sig["step"].values
                if np.isfinite(sig.sel(step=s).values).any()]
    chosen = [s for s in (steps if steps is not None else pick_steps(ok_steps)) if s in ok_steps]
    if not chosen:
        return _done(go.Figure(), title, ["no finite spectrum at the chosen steps"],
                     PANEL_HEIGHT + 140)
    fig = make_subplots(rows=1, cols=len(chosen), subplot_titles=[f"step {s}" for s in chosen],
                        shared_yaxes=True, horizontal_spacing=0.03)
    for j, step in enumerate(chosen):
        s = sig.sel(step=step).values
        s = s[np.isfinite(s)]
        lam_all = np.sort(s ** 2)
        lam = lam_all[lam_all > 0]
        if lam.size < 2:
            notes.append(f"step {step}: fewer than 2 positive eigenvalues")
            continue
        nb = int(min(40, max(8, lam.size // 3)))
        edges = np.logspace(math.log10(lam.min()), math.log10(lam.max()), nb + 1)
        edges[-1] *= 1 + 1e-12
        counts, _ = np.histogram(lam, bins=edges)
        dens = counts / (lam_all.size * np.diff(edges))
        centres = np.sqrt(edges[:-1] * edges[1:])
        keep = counts > 0
        fig.add_trace(go.Scatter(
            x=centres[keep], y=dens[keep], mode="markers", marker={"color": "#444", "size": 6},
            name="ESD", showlegend=j == 0, meta={"run": run_, "role": "spectrum", "step": step},
            hovertemplate="λ %{x:.3g}<br>density %{y:.3g}<extra></extra>"), row=1, col=j + 1)
        grid = np.logspace(math.log10(lam.min()), math.log10(lam.max()), 200)
        v = {m: float(cell[m].sel(step=step)) if m in cell.data_vars else math.nan
             for m in ("alpha", "alpha_n_tail", "mp_sigma", "mp_bulk_max", "num_spikes",
                       "tpl_alpha", "tpl_lambda")}
        if np.isfinite(v["alpha"]) and np.isfinite(v["alpha_n_tail"]) and v["alpha_n_tail"] > 0:
            n_tail = int(v["alpha_n_tail"])
            xmin = float(lam[-n_tail]) if n_tail <= lam.size else float(lam[0])
            g = grid[grid >= xmin]
            fig.add_trace(go.Scatter(
                x=g, y=power_law_density(g, v["alpha"], xmin, n_tail / lam_all.size),
                mode="lines", line={"color": "#d62728", "dash": "dash"},
                name=f"power law (α = {v['alpha']:.2f})" if j == 0 else "power law",
                showlegend=True, legendgroup=f"pl{j}",
                meta={"run": run_, "role": "fit", "fit": "power_law", "step": step,
                      "alpha": v["alpha"], "xmin": xmin}), row=1, col=j + 1)
            fig.add_vline(x=xmin, line={"color": "#d62728", "dash": "dot", "width": 1},
                          row=1, col=j + 1)
            if np.isfinite(v["tpl_alpha"]) and np.isfinite(v["tpl_lambda"]):
                fig.add_trace(go.Scatter(
                    x=g, y=tpl_density(g, v["tpl_alpha"], v["tpl_lambda"], xmin,
                                       n_tail / lam_all.size),
                    mode="lines", line={"color": "#ff7f0e", "dash": "dashdot"},
                    name=f"truncated power law (α = {v['tpl_alpha']:.2f}, "
                         f"Λ = {v['tpl_lambda']:.3g})" if j == 0 else "truncated power law",
                    showlegend=True, legendgroup=f"tpl{j}",
                    meta={"run": run_, "role": "fit", "fit": "truncated_power_law",
                          "step": step, "alpha": v["tpl_alpha"], "Lambda": v["tpl_lambda"],
                          "xmin": xmin}), row=1, col=j + 1)
        else:
            notes.append(f"step {step}: no power-law fit (alpha not in store or NaN)")
        if np.isfinite(v["mp_sigma"]) and np.isfinite(v["mp_bulk_max"]):
            scale2 = lam_all.size / float(np.sum(lam_all))
            inv_sqrt_q = math.sqrt(v["mp_bulk_max"] * scale2) / v["mp_sigma"] - 1
            if inv_sqrt_q > 0:
                q = 1 / inv_sqrt_q ** 2
                fig.add_trace(go.Scatter(
                    x=grid, y=mp_density_lambda(grid, q, v["mp_sigma"], scale2), mode="lines",
                    line={"color": "#1f77b4"}, name="MP bulk", showlegend=j == 0,
                    meta={"run": run_, "role": "fit", "fit": "mp", "step": step,
                          "num_spikes": v["num_spikes"]}), row=1, col=j + 1)
            fig.add_vline(x=v["mp_bulk_max"], line={"color": "#1f77b4", "dash": "dot",
                                                    "width": 1}, row=1, col=j + 1)
        else:
            notes.append(f"step {step}: no MP fit (mp_sigma not in store or NaN)")
        fig.update_xaxes(type="log", title_text="λ = σ²", row=1, col=j + 1)
        fig.update_yaxes(type="log", row=1, col=j + 1)
    fig.update_yaxes(title_text="density", row=1, col=1)
    return _done(fig, title, sorted(set(notes)), PANEL_HEIGHT + 160)


def over_steps(ds: xr.Dataset, kind: str = "weights", matrix: str = "swiglu.w_2",
               metrics: Sequence[str] = TRAJECTORY_METRICS, run: str | None = None
               ) -> go.Figure:
    """`metrics` (default α, num_spikes, rand_distance) of one matrix over steps, one line
    per layer (colour = depth), one panel per metric the store holds; for α the flag
    thresholds 2 and 6 are drawn."""
    run_ = _run(ds, run)
    title = f"Heavy-tail metrics of {kind} · {matrix} over steps" + (f" ({run_})" if run_ else "")
    have = [m for m in metrics if m in ds.data_vars]
    notes = [f"{m} not in store" for m in metrics if m not in ds.data_vars]
    if run_ is None or not have or kind not in [str(k) for k in ds["kind"].values]:
        return _done(go.Figure(), title, notes or ["nothing to draw"], PANEL_HEIGHT + 140)
    fig = make_subplots(rows=len(have), cols=1, shared_xaxes=True, subplot_titles=have,
                        vertical_spacing=0.08)
    layers = [int(v) for v in ds["layer"].values]
    for i, m in enumerate(have):
        da = ds[m].sel(run=run_, kind=kind, matrix=matrix).sortby("step").load()
        for layer in layers:
            y = da.sel(layer=layer).values
            if not np.isfinite(y).any():
                continue
            frac = layer / max(len(layers) - 1, 1)
            fig.add_trace(go.Scatter(
                x=da["step"].values, y=y, mode="lines+markers", name=f"layer {layer}",
                line={"color": sample_colorscale("Viridis", [frac])[0]},
                showlegend=i == 0, legendgroup=f"layer{layer}",
                meta={"run": run_, "role": "series", "metric": m, "layer": layer}),
                row=i + 1, col=1)
        if m == "alpha":
            for thr in (OVER_TRAINED_ALPHA, UNDER_TRAINED_ALPHA):
                fig.add_hline(y=thr, line={"color": "#999", "dash": "dot", "width": 1},
                              row=i + 1, col=1)
    fig.update_xaxes(title_text="step", row=len(have), col=1)
    return _done(fig, title, notes, 220 * len(have) + 160)


def trained_flags(ds: xr.Dataset, kind: str = "weights") -> list[dict]:
    """One row per (run, layer, matrix) at each run's last step with a finite α: α, the flag
    ('over-trained' for α < 2, 'under-trained' for α > 6, WeightWatcher's thresholds, '' else)
    and num_spikes / rand_distance where the store holds them."""
    if "alpha" not in ds.data_vars or kind not in [str(k) for k in ds["kind"].values]:
        return []
    rows = []
    for run in [str(r) for r in ds["run"].values]:
        a = ds["alpha"].sel(run=run, kind=kind).sortby("step").load()
        finite = [int(s) for s in a["step"].values if np.isfinite(a.sel(step=s).values).any()]
        if not finite:
            continue
        step = finite[-1]
        for layer in [int(v) for v in a["layer"].values]:
            for matrix in [str(m) for m in a["matrix"].values]:
                v = float(a.sel(step=step, layer=layer, matrix=matrix))
                if not np.isfinite(v):
                    continue
                flag = ("over-trained" if v < OVER_TRAINED_ALPHA else
                        "under-trained" if v > UNDER_TRAINED_ALPHA else "")
                row = {"run": run, "step": step, "layer": layer, "matrix": matrix, "alpha": v,
                       "flag": flag}
                for m in ("num_spikes", "rand_distance"):
                    if m in ds.data_vars:
                        row[m] = float(ds[m].sel(run=run, kind=kind, step=step, layer=layer,
                                                 matrix=matrix))
                rows.append(row)
    return rows


def flags_table(ds: xr.Dataset, kind: str = "weights") -> go.Figure:
    """`trained_flags` as a table figure: the flagged matrices first."""
    rows = sorted(trained_flags(ds, kind), key=lambda r: (r["flag"] == "", r["run"],
                                                          r["layer"], r["matrix"]))
    title = f"Under-/over-trained flags of {kind} (WeightWatcher: α < 2 over, α > 6 under)"
    if not rows:
        return _done(go.Figure(), title, ["no α in store"], PANEL_HEIGHT)
    cols = ["run", "step", "layer", "matrix", "alpha", "flag"] + [
        m for m in ("num_spikes", "rand_distance") if m in rows[0]]
    fill = ["#fde0c5" if r["flag"] == "over-trained" else "#d6e6f7" if r["flag"] else "white"
            for r in rows]

    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    fig = go.Figure(go.Table(
        header={"values": cols, "fill_color": "#f3f3f3", "align": "left"},
        cells={"values": [[fmt(r.get(c, "")) for r in rows] for c in cols],
               "fill_color": [fill] * len(cols), "align": "left"},
        meta={"role": "table", "n_flagged": sum(bool(r["flag"]) for r in rows)}))
    n = sum(bool(r["flag"]) for r in rows)
    return _done(fig, title, [f"{n} of {len(rows)} matrices flagged"],
                 min(160 + 24 * len(rows), 900))


def _default_matrix(ds: xr.Dataset) -> str:
    matrices = [str(m) for m in ds["matrix"].values] if "matrix" in ds.coords else []
    return "swiglu.w_2" if "swiglu.w_2" in matrices else (matrices[0] if matrices else "")


def htsr_sections(ds: xr.Dataset) -> list[tuple[str, str, Callable[[], go.Figure]]]:
    """(title, caption, figure maker) of the report's heavy-tail figures: present when the
    store holds α (and the ESD figure when it holds the MP fit too); none otherwise."""
    if "alpha" not in ds.data_vars:
        return []
    matrix = _default_matrix(ds)
    last = int(ds["layer"].values[-1]) if "layer" in ds.coords and ds["layer"].size else 0
    out: list[tuple[str, str, Callable[[], go.Figure]]] = []
    if "alpha_n_tail" in ds.data_vars or "mp_sigma" in ds.data_vars:
        out.append((
            "Heavy tails: ESD of the weights",
            f"Eigenvalues σ² of {matrix} in the last layer at up to four steps, on log-log "
            "axes: the histogram, the power-law tail fitted from x_min (dashed, α as "
            "WeightWatcher's), and the Marchenko–Pastur bulk fitted to the ESD (solid) with its "
            "edge λ₊ (dotted; with -m num_spikes,mp_sigma,mp_bulk_max or -m all); eigenvalues "
            "right of λ₊ are spikes (learned correlations). With -m tpl_alpha,tpl_lambda (or "
            "-m all) the truncated power law λ^(−α)·e^(−Λλ) fitted from the same x_min is drawn "
            "dash-dot: an exponential cut-off bends the tail down at large λ (tpl_llr < 0 when "
            "it fits better than the plain power law).",
            lambda: esd(ds, "weights", matrix, last)))
    out.append((
        "Heavy tails over steps",
        f"α (dotted lines at 2 and 6), MP spikes and the Jensen–Shannon distance to the "
        f"element-wise shuffled matrix (correlation traps; these two opt-in: -m num_spikes,"
        f"rand_distance or -m all) of {matrix}, one line per layer.",
        lambda: over_steps(ds, "weights", matrix)))
    out.append((
        "Heavy tails: under-/over-trained flags",
        "α of every weight matrix at each run's last analysed step; WeightWatcher calls α < 2 "
        "over-trained (orange) and α > 6 under-trained (blue).",
        lambda: flags_table(ds, "weights")))
    return out
