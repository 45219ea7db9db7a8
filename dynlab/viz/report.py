"""One self-contained HTML report (plotly.js inlined, opens with no network) from one or more
analysis stores, and a PNG screenshot of an HTML file through headless Chromium."""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import xarray as xr
from plotly.offline import get_plotlyjs

from dynlab.atomic import replace_atomically, write_text_atomically
from dynlab.viz import figures as F

PLOT_CONFIG = {"displaylogo": False, "responsive": True}
#: trace roles that count as data ("table": dynlab.viz.heavytail.flags_table)
DATA_ROLES = ("mean", "series", "heatmap", "spectrum", "table")


@dataclass
class Section:
    """One report figure: a heading, a one-sentence explanation, the figure (or None when the
    whole figure had to be omitted) and the notes on what was missing."""

    title: str
    caption: str
    figure: go.Figure | None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- stores


def open_store(path: str | Path) -> xr.Dataset:
    """Open an analysis store with dynlab.open_store (lazy, sorted by step), with a clear
    error when the path does not exist (FileNotFoundError) or is not a readable store
    (dynlab.analysis.store.StoreError, saying what to do)."""
    from dynlab.analysis.store import open_store as open_analysis_store
    from dynlab.analysis.store import pending_work

    p = Path(path)
    if not p.exists():
        pending = pending_work(p)
        hint = f"; {pending}: rerun the same `dynlab analyze` to finish it" if pending else ""
        raise FileNotFoundError(f"store {p}: no such file or directory (expected a Zarr store "
                                f"written by `dynlab analyze`){hint}")
    ds = open_analysis_store(p)
    return ds.sortby("step") if "step" in ds.dims else ds


def combine_stores(datasets: Sequence[xr.Dataset], names: Sequence[str] | None = None
                   ) -> xr.Dataset:
    """Concatenate stores along `run` (outer join on steps and other coordinates, NaN where a
    store lacks something). Run names that occur in more than one store are prefixed with the
    store's name (`names[i]/run`). `run_configs` attributes are merged."""
    if len(datasets) == 1:
        return datasets[0]
    names = list(names or [f"store{i}" for i in range(len(datasets))])
    names = [n if names.count(n) == 1 else f"{n}-{i + 1}" for i, n in enumerate(names)]
    seen: dict[str, int] = {}
    for ds in datasets:
        for r in ds["run"].values:
            seen[str(r)] = seen.get(str(r), 0) + 1
    parts, configs = [], {}
    for ds, name in zip(datasets, names, strict=True):
        rename = {str(r): (f"{name}/{r}" if seen[str(r)] > 1 else str(r))
                  for r in ds["run"].values}
        cfg = F.run_configs(ds)
        configs.update({rename[r]: c for r, c in cfg.items() if r in rename})
        parts.append(ds.assign_coords(run=[rename[str(r)] for r in ds["run"].values]))
    out = xr.concat(parts, dim="run", join="outer", data_vars="all", coords="different",
                    compat="equals", combine_attrs="drop_conflicts", fill_value=float("nan"))
    out = out.sortby("step")
    out.attrs["run_configs"] = json.dumps(configs)
    metrics: list[str] = []
    for ds in datasets:
        metrics += [m for m in ds.attrs.get("metrics", []) if m not in metrics]
    out.attrs["metrics"] = metrics
    return out


def load_stores(paths: Sequence[str | Path]) -> xr.Dataset:
    """Open and combine one or more stores (see combine_stores)."""
    if not paths:
        raise ValueError("no store given: pass at least one Zarr store path")
    paths = [Path(p) for p in paths]
    dsets = [open_store(p) for p in paths]
    return combine_stores(dsets, [p.name.removesuffix(".zarr") for p in paths])


# ---------------------------------------------------------------- report content


def report_sections(ds: xr.Dataset) -> list[Section]:
    """The study's figures, in reading order. Runs with sibling seeds (dynlab.viz.seeds)
    are drawn per condition, banded across seeds, in the trajectory figures."""
    from dynlab.viz.seeds import band_caption, seed_view, sibling_groups

    groups = sibling_groups(ds) if "run" in ds.coords else {}
    by_seed = seed_view(ds, groups) if groups else ds
    seeds_note = band_caption(groups) if groups else ""
    specs = [
        ("Training curves",
         "Training loss, perplexity on the held-out domains (macro mean solid, each domain "
         "dotted) and BLiMP accuracy, against optimizer steps (top) and GPU-hours "
         "(bottom; wall-clock hours for stores without them).",
         lambda: F.training_curves(ds)),
        ("PER of weights",
         "Proportional effective rank of the OV circuit and of the MLP down-projection "
         "(swiglu.w_2), averaged over layers with a 95% t-interval: falling PER means the "
         "weights concentrate their energy in fewer directions." + seeds_note,
         lambda: F.trajectory_grid(by_seed, "per", ["weights"], ["ov_circuit", "swiglu.w_2"])),
        ("PER of updates and gradients",
         "Proportional effective rank of the parameter updates between checkpoints (top) and "
         "of the gradients on the fixed batch (bottom) for attention.o_proj, attention.v_proj "
         "and swiglu.w_2: low PER means learning happens in a low-dimensional subspace."
         + seeds_note,
         lambda: F.trajectory_grid(by_seed, "per", ["updates", "grads"],
                                   ["attention.o_proj", "attention.v_proj", "swiglu.w_2"])),
        ("Condition number of weights and updates",
         "Condition number σ₁/σ_k (log axis; k the rank bound, n_kv·hd for the OV circuit) of "
         "the weights (top) and the updates (middle) of the OV circuit, attention.o_proj, "
         "attention.v_proj and swiglu.w_2, and the condition number of the updates' non-zero "
         "part σ₁/σ_r, r the numerical rank (bottom): geometric mean over layers with a 95% "
         "t-interval of the log values; infinite values (rank-deficient matrices) are left "
         "out of the mean and make the marker hollow. " + conditioning_explanation(ds)
         + seeds_note,
         lambda: F.conditioning_grid(by_seed, ["ov_circuit", "attention.o_proj",
                                          "attention.v_proj", "swiglu.w_2"])),
        ("PER of weights, layer by layer",
         "PER of the OV circuit in every layer at every step, one panel per run: where in "
         "depth the rank changes.",
         lambda: F.heatmap(ds, "per", "weights", "ov_circuit")),
        ("Spectrum evolution",
         "Singular values of the last layer's OV circuit divided by the largest, one line per "
         "checkpoint from early (dark) to late (yellow): how the spectrum's tail decays.",
         lambda: F.spectrum(ds, "weights", "ov_circuit", layer=_last_layer(ds))),
        ("ReLoRA against decoder",
         "The same PER trajectory and training loss side by side for each run, with the "
         "ReLoRA merge-and-reset steps as dotted lines." + seeds_note,
         lambda: F.relora_comparison(by_seed, ("per",), "weights", "ov_circuit")),
    ]
    if "eval_loss" in ds.data_vars and bool(np.isfinite(ds["eval_loss"].values).any()):
        specs.append((
            "PER against loss",
            "Proportional effective rank of the OV circuit (mean over layers) against the "
            "held-out mean token loss written by `dynlab eval --store`, one line per run in "
            "step order: conditioning against how well the model has learned, for any source "
            "(dynlab, pico-train, relora-pico and Hugging Face runs alike).",
            lambda: F.metric_against_loss(ds, "per", "weights", "ov_circuit", "eval_loss")))
    from dynlab.viz.representations import representation_sections

    specs += representation_sections(ds)
    from dynlab.viz.heavytail import htsr_sections

    specs += htsr_sections(ds)
    from dynlab.viz.dynamics import dynamics_sections

    specs += dynamics_sections(ds)
    out = []
    for title, caption, make in specs:
        fig = make()
        if seeds_note and caption.endswith(seeds_note) and fig.layout.title.text:
            fig.layout.title.text = (fig.layout.title.text.replace("over layers", "over seeds")
                                     .replace("some layers", "some seeds"))
        notes = list((fig.layout.meta or {}).get("notes", []))
        has_data = any((t.meta or {}).get("role") in DATA_ROLES for t in fig.data)
        out.append(Section(title, caption, fig if has_data else None, notes))
    return out


@dataclass(frozen=True)
class RankDeficiency:
    """One rank-deficient update of a store, summarised over layers (medians)."""

    run: str
    matrix: str
    step: int
    prev_step: int | None
    rank: float      # numerical rank r
    bound: float     # k = min(m, n)
    cn_nz: float     # σ₁/σ_r
    zero_max: float  # largest σ_i/σ₁ counted as zero (max over layers)
    tol: float       # tol/σ₁ (max over layers)
    layers: int      # layers where it is rank-deficient (the medians are over these)
    of_layers: int   # layers analysed
    max_rank: float  # rank bound by construction (median; = bound when not stored)


def rank_deficiency(ds: xr.Dataset, kind: str = "updates", prefer: str = "swiglu.w_2"
                    ) -> RankDeficiency | None:
    """The latest rank-deficient `kind` matrix of the run with the most of them, preferring
    matrix `prefer`, from the stored spectra and tolerances: r = #{σ_i > tol},
    k = #{σ_i not NaN}, deficient where 0 < r < k. None when the store has no `tol` (older
    stores) or nothing is rank-deficient."""
    if not {"sigma", "tol"} <= set(ds.data_vars) or kind not in [str(k) for k in ds["kind"].values]:
        return None
    sig = ds["sigma"].sel(kind=kind).load()
    tol = ds["tol"].sel(kind=kind).load()
    k = sig.notnull().sum("sv")
    r = (sig > tol).sum("sv")
    deficient = (r > 0) & (r < k)
    if not bool(deficient.any()):
        return None
    per_matrix = deficient.sum(("run", "step", "layer"))
    matrices = [str(m) for m in ds["matrix"].values]
    matrix = prefer if prefer in matrices and int(per_matrix.sel(matrix=prefer)) > 0 else \
        matrices[int(np.argmax(per_matrix.values))]
    d = deficient.sel(matrix=matrix)
    run = str(d["run"].values[int(np.argmax(d.sum(("step", "layer")).values))])
    at = d.sel(run=run).any("layer")
    step = int(at["step"].values[np.flatnonzero(at.values)[-1]])
    cell = dict(run=run, matrix=matrix, step=step)
    s, t = sig.sel(**cell).values, tol.sel(**cell).values  # (layer, sv), (layer,)
    ok = d.sel(run=run, step=step).values
    s1 = s[:, 0]
    ranks = r.sel(**cell).values
    rows = np.flatnonzero(ok)
    cn_nz = [s1[i] / s[i, ranks[i] - 1] for i in rows]
    zeros = [np.nanmax(s[i, ranks[i]:]) / s1[i] for i in rows]
    max_rank = float(np.median(k.sel(**cell).values[rows]))
    if "max_rank" in ds.data_vars:
        max_rank = float(np.median(ds["max_rank"].sel(kind=kind, **cell).values[rows]))
    analysed = ds["sigma"].sel(run=run, kind="weights", matrix=matrix).notnull().any(
        ("layer", "sv")) if "weights" in [str(x) for x in ds["kind"].values] else None
    prev = None
    if analysed is not None:
        before = [int(x) for x, a in zip(ds["step"].values, analysed.values, strict=True)
                  if a and int(x) < step]
        prev = max(before) if before else None
    return RankDeficiency(run, matrix, step, prev, float(np.median(ranks[rows])),
                          float(np.median(k.sel(**cell).values[rows])),
                          float(np.median(cn_nz)), float(np.max(zeros)),
                          float(np.max(t[rows] / s1[rows])), len(rows),
                          int((k.sel(**cell).values > 0).sum()), max_rank)


def conditioning_explanation(ds: xr.Dataset) -> str:
    """Two sentences on what a rank-deficient update is and why its κ is infinite rather than
    large, with the numbers of the first rank-deficient update found (`rank_deficiency`)."""
    ex = rank_deficiency(ds)
    if ex is None:
        return ("No update in this store is rank-deficient: every singular value lies above "
                "the tolerance set by the storage precision (c·max(m, n)·eps·σ₁), so every κ "
                "shown is finite.")
    span = (f"between steps {ex.prev_step} and {ex.step}" if ex.prev_step is not None
            else f"at step {ex.step}")
    zeros = ("are exactly zero" if ex.zero_max == 0
             else f"are at most {ex.zero_max:.2g}·σ₁")
    bound = (f"; its factors bound it by {ex.max_rank:g}" if ex.max_rank < ex.bound else "")
    return (
        f"A rank-deficient update changes the matrix in fewer directions than its smaller "
        f"dimension: {ex.run}'s update of {ex.matrix} {span} has numerical rank {ex.rank:g} "
        f"of {ex.bound:g} (median over the {ex.layers} of {ex.of_layers} layers where it is "
        f"rank-deficient{bound}), and its other singular values {zeros}, at or below the "
        f"zero tolerance {ex.tol:.2g}·σ₁ set by the precision the weights were stored in, so "
        f"σ_k = 0 and κ = σ₁/σ_k is infinite, not merely large (a finite κ there would only "
        f"measure rounding noise). The condition of the directions it does change is "
        f"CN_nz = σ₁/σ_r = {ex.cn_nz:.3g} (median), shown in the bottom row.")


def _last_layer(ds: xr.Dataset) -> int:
    return int(ds["layer"].values.max()) if "layer" in ds.coords and ds["layer"].size else 0


def format_value(v: object) -> str:
    """A table cell: strings HTML-escaped, NaN/None as –, integral floats as integers, else 4
    significant digits."""
    if isinstance(v, str):
        return html.escape(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and float(v).is_integer() and abs(v) < 1e9:
        return f"{int(v)}"
    return f"{float(v):.4g}"


def summary_html(ds: xr.Dataset) -> str:
    """The per-run summary table as an HTML <table>."""
    tab = F.summary_table(ds)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run", *tab.columns])
    body = "".join(
        "<tr>" + f"<td>{html.escape(str(run))}</td>"
        + "".join(f"<td>{format_value(v)}</td>" for v in row) + "</tr>"
        for run, row in zip(tab.index, tab.itertuples(index=False), strict=True))
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1280px;padding:0 16px;color:#222}
h1{font-size:1.6em;margin-bottom:0.2em} h2{font-size:1.2em;margin:1.6em 0 0.3em}
p.meta,p.caption{color:#555;margin:0.2em 0 0.6em} p.note{color:#a15c00;font-size:0.9em}
table.summary{border-collapse:collapse;font-size:0.9em;margin:8px 0}
table.summary th,table.summary td{border:1px solid #ccc;padding:4px 8px;text-align:right}
table.summary th:first-child,table.summary td:first-child{text-align:left}
table.summary th{background:#f3f3f3}
"""


def build_report(ds: xr.Dataset, title: str = "dynlab report",
                 sources: Sequence[str] = (), claims: Sequence[dict] | None = None
                 ) -> tuple[str, list[Section]]:
    """The report as one HTML string (plotly.js inlined once) and its sections; `claims`
    (dynlab.experiment.claims results as dicts) adds the Claims section first."""
    from dynlab.viz.claims import claims_html

    sections = report_sections(ds)
    runs = ", ".join(html.escape(str(r)) for r in ds["run"].values)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>',
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">runs: {runs} · stores: '
        f'{html.escape(", ".join(map(str, sources))) or "in memory"} · '
        f'dynlab {html.escape(str(ds.attrs.get("dynlab_version", "?")))} · {when}</p>',
        claims_html(claims or []),
        "<h2>Summary</h2>",
        '<p class="caption">Final train loss, macro perplexity and BLiMP accuracy at the last '
        "step where each was measured; PER (arithmetic mean), CN and CN_nz (geometric means of "
        "the finite values: a rank-deficient matrix's CN is infinite and left out) over all "
        "layers and matrices at the last analysed step.</p>",
        summary_html(ds),
    ]
    n = 0
    for sec in sections:
        parts.append(f'<section class="figure-section"><h2>{html.escape(sec.title)}</h2>')
        parts.append(f'<p class="caption">{html.escape(sec.caption)}</p>')
        for note in sec.notes:
            parts.append(f'<p class="note">note: {html.escape(note)}</p>')
        if sec.figure is None:
            parts.append('<p class="note">figure omitted: no data for it in this store.</p>')
        else:
            parts.append(pio.to_html(sec.figure, full_html=False, include_plotlyjs=False,
                                     div_id=f"figure-{n}", config=PLOT_CONFIG,
                                     default_height=f"{sec.figure.layout.height or 450}px"))
            n += 1
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts), sections


def write_report(stores: Sequence[str | Path], out: str | Path = "report.html",
                 title: str = "dynlab report", claims: Sequence[dict] | None = None
                 ) -> tuple[Path, xr.Dataset, list[Section]]:
    """Open the stores, write the report to `out` (with a Claims section first when
    `claims` is given); return (path, combined dataset, sections)."""
    ds = load_stores(stores)
    text, sections = build_report(ds, title, [str(s) for s in stores], claims)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, text)  # a full disk leaves the previous report whole
    return out, ds, sections


def n_figures(sections: Sequence[Section]) -> int:
    """How many plotly figures a report with these sections holds."""
    return sum(sec.figure is not None for sec in sections)


# ---------------------------------------------------------------- screenshots


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable ($DYNLAB_CHROMIUM first), or None."""
    env = os.environ.get("DYNLAB_CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280,
               height: int = 1600, timeout: float = 120.0) -> Path:
    """Render an HTML file in headless Chromium (network disabled by flags) and save the
    top width × height pixels as PNG (written beside `png_path` and renamed into place when
    complete). Raises RuntimeError when no Chromium is found or it fails."""
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("no Chromium found (install Debian's `chromium` or set "
                           "DYNLAB_CHROMIUM to the executable)")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    final, png_path = png_path, png_path.with_name(f".tmp-{os.getpid()}-{png_path.name}")
    with tempfile.TemporaryDirectory(prefix="dynlab-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-background-networking", "--disable-sync",
               "--disable-component-update", "--disable-quic", f"--user-data-dir={profile}",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               f"--window-size={width},{height}", "--virtual-time-budget=15000",
               f"--screenshot={png_path}", html_path.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)
    if proc.returncode != 0 or not png_path.exists():
        png_path.unlink(missing_ok=True)
        raise RuntimeError(f"chromium screenshot of {html_path} failed (exit "
                           f"{proc.returncode}): {proc.stderr[-500:]}")
    os.replace(png_path, final)
    return final


def save_figure(fig: go.Figure, out: str | Path, width: int = 1100,
                height: int | None = None) -> Path:
    """Write a figure to .html (plotly.js inlined, offline) or .png (plotly's static export
    when kaleido is installed, else a headless-Chromium screenshot)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix in (".html", ".htm"):
        return replace_atomically(out, lambda tmp: fig.write_html(
            tmp, include_plotlyjs=True, full_html=True, config=PLOT_CONFIG))
    if suffix != ".png":
        raise ValueError(f"output {out}: expected a .html or .png file name")
    height = height or int(fig.layout.height or 500)
    try:  # the temporary file keeps the suffix: plotly picks the format from it
        return replace_atomically(out, lambda tmp: fig.write_image(tmp, width=width,
                                                                   height=height),
                                  f".tmp-{os.getpid()}-{out.name}")
    except Exception as kaleido_error:  # kaleido missing or unusable: try Chromium
        if find_chromium() is None:
            raise RuntimeError(
                f"PNG export of {out} needs plotly's static export (kaleido>=1, not installed: "
                f"{str(kaleido_error).strip().splitlines()[0]}) or a Chromium executable; "
                "write .html instead") from kaleido_error
    with tempfile.TemporaryDirectory(prefix="dynlab-fig-") as tmp:
        page = Path(tmp) / "fig.html"
        fig.update_layout(width=width, height=height, margin_autoexpand=True)
        page.write_text(
            "<!DOCTYPE html><html><head><meta charset='utf-8'><style>body{margin:0}</style>"
            "</head><body>" + pio.to_html(fig, full_html=False, include_plotlyjs=True,
                                          config={"staticPlot": True}) + "</body></html>",
            encoding="utf-8")
        return screenshot(page, out, width=width, height=height)
