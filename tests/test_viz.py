"""dynlab.viz figures, the HTML report and the `dynlab plot` / `dynlab report` commands,
checked against the synthetic store of tests/viz_fixtures.py with independent references
(scipy float64, plain loops)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from scipy import stats
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import viz_fixtures as fx  # noqa: E402

from dynlab.viz import figures as F  # noqa: E402
from dynlab.viz import report as R  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return fx.write_store(tmp_path_factory.mktemp("viz") / "fixture.zarr")


@pytest.fixture(scope="module")
def ds(store) -> xr.Dataset:
    return xr.open_zarr(store).load()


def traces(fig, role, run=None):
    return [t for t in fig.data if (t.meta or {}).get("role") == role
            and (run is None or t.meta.get("run") == run)]


def t_interval(values) -> tuple[float, float, float, int]:
    """Reference: mean and scipy's 95% t-interval of the finite values (plain loop)."""
    v = [float(x) for x in values if math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = sum(v) / n
    if n < 2:
        return mean, math.nan, math.nan, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return mean, lo, hi, n


# ---------------------------------------------------------------- fixture itself


def test_fixture_follows_the_store_schema(ds):
    assert list(ds.run.values) == ["decoder", "relora"]
    assert ds["per"].dims == ("run", "kind", "step", "layer", "matrix")
    assert ds["head_per"].dims == ("run", "kind", "step", "layer", "head")
    assert ds["emb_cn"].dims == ("run", "kind", "step", "embedding")
    assert ds["sigma"].dims == ("run", "kind", "step", "layer", "matrix", "sv")
    assert ds["ppl"].dims == ("run", "step", "domain") and ds.sizes["domain"] == 2
    assert ds["blimp"].dims == ("run", "step", "uid") and ds.sizes["uid"] == 3
    assert json.loads(ds.attrs["run_configs"])["relora"]["relora"]["reset_every"] == 40
    assert np.isnan(ds["per"].sel(kind="updates", step=0)).all()
    assert np.isnan(ds["per"].sel(kind="lora", run="decoder")).all()
    assert int(np.isnan(ds["per"].sel(kind="weights")).sum()) == 1
    # metrics are those of the stored spectrum: stable rank = sum sigma^2 / sigma_1^2
    s = ds["sigma"].sel(run="relora", kind="grads", step=40, layer=1, matrix="swiglu.w_2").values
    s = s[np.isfinite(s)]
    ref = float((s**2).sum() / s[0] ** 2)
    got = float(ds["stable_rank"].sel(run="relora", kind="grads", step=40, layer=1,
                                      matrix="swiglu.w_2"))
    assert got == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------- statistics


def test_layer_mean_ci_matches_scipy_with_nan_and_inf():
    vals = np.array([[1.0, 2.0, 4.0, np.nan, np.inf],    # n = 3, two non-finite
                     [0.5, 0.7, 0.9, 1.1, 1.3],          # n = 5
                     [3.0, np.nan, np.nan, np.nan, np.nan],  # n = 1: no band
                     [np.nan] * 5])                      # n = 0
    da = xr.DataArray(vals, dims=("step", "layer"), coords={"step": [0, 1, 2, 3]})
    st = F.layer_mean_ci(da)
    for i, row in enumerate(vals):
        mean, lo, hi, n = t_interval(row)
        assert int(st["n"][i]) == n
        assert int(st["n_bad"][i]) == 5 - n
        np.testing.assert_allclose([float(st["mean"][i]), float(st["lo"][i]),
                                    float(st["hi"][i])], [mean, lo, hi], rtol=1e-12)


# ---------------------------------------------------------------- 1. trajectory


def test_trajectory_mean_band_and_hollow_markers(ds):
    fig = F.trajectory(ds, "per", "weights", "ov_circuit")
    assert len(fig.data) == 6  # per run: band_hi, band_lo, mean
    sel = ds["per"].sel(kind="weights", matrix="ov_circuit")
    for run in ("decoder", "relora"):
        (mean,) = traces(fig, "mean", run)
        (hi,) = traces(fig, "band_hi", run)
        (lo,) = traces(fig, "band_lo", run)
        assert list(mean.x) == fx.STEPS
        np.testing.assert_allclose(mean.y, sel.sel(run=run).mean("layer").values, rtol=1e-12)
        band_x = []
        for step in fx.STEPS:
            m, lo_ref, hi_ref, n = t_interval(sel.sel(run=run, step=step).values)
            if n >= 2:
                band_x.append(step)
                k = list(hi.x).index(step)
                # PER lies in (0, 1]: the band is clipped to that range
                assert hi.y[k] == pytest.approx(min(hi_ref, 1.0), rel=1e-12)
                assert lo.y[k] == pytest.approx(max(lo_ref, 0.0), rel=1e-12)
        assert list(hi.x) == band_x and list(lo.x) == band_x
        hollow = [s for s, sym in zip(mean.x, mean.marker.symbol, strict=True)
                  if sym == "circle-open"]
        assert hollow == ([60] if run == "decoder" else [])
    # decoder at step 60: only layer 0 is finite, so the point is that layer's value, no band
    (dmean,) = traces(fig, "mean", "decoder")
    assert dmean.y[3] == pytest.approx(float(sel.sel(run="decoder", step=60, layer=0)))
    assert 60 not in traces(fig, "band_hi", "decoder")[0].x
    assert fig.layout.yaxis.type in (None, "linear")


def test_cn_uses_log_axis_and_updates_skip_first_step(ds):
    fig = F.trajectory(ds, "cn", "updates", "swiglu.w_2")
    assert fig.layout.yaxis.type == "log"
    (mean,) = traces(fig, "mean", "relora")
    assert list(mean.x) == fx.STEPS[1:]  # updates are NaN at the first step: omitted
    # geometric mean over layers (CN is averaged in log space)
    ref = np.exp(np.log(ds["cn"].sel(run="relora", kind="updates", matrix="swiglu.w_2"))
                 .mean("layer"))
    np.testing.assert_allclose(mean.y, ref.values[1:], rtol=1e-12)


def test_trajectory_grid_layout_and_lora_note(ds):
    fig = F.trajectory_grid(ds, "per", ["updates", "lora"],
                            ["attention.o_proj", "attention.v_proj", "swiglu.w_2"])
    # updates: 2 runs x 3 panels x 3 traces; lora: relora only, 3 panels x 3 traces
    assert len(fig.data) == 18 + 9
    assert len(traces(fig, "mean", "decoder")) == 3
    assert sum(t.showlegend is not False for t in fig.data) == 2  # one legend entry per run
    notes = fig.layout.meta["notes"]
    assert len(notes) == 3 and all("decoder has no finite per of lora" in n for n in notes)


def test_unsorted_steps_give_the_same_figure(ds):
    shuffled = ds.isel(step=[3, 0, 5, 1, 4, 2])
    a = F.trajectory(ds, "per", "grads", "attention.q_proj")
    b = F.trajectory(shuffled, "per", "grads", "attention.q_proj")
    for ta, tb in zip(a.data, b.data, strict=True):
        np.testing.assert_array_equal(ta.x, tb.x)
        np.testing.assert_allclose(ta.y, tb.y, rtol=1e-12)
    assert F.summary_table(shuffled).equals(F.summary_table(ds))


def test_runs_with_different_step_sets(ds):
    # relora stops at step 80 and also lacks step 40: the union grid holds NaN there
    other = ds.copy(deep=True)
    for name, var in other.data_vars.items():
        if "step" in var.dims and "run" in var.dims and var.dtype.kind == "f":
            other[name].loc[{"run": "relora", "step": [40, 100]}] = np.nan
    fig = F.trajectory(other, "per", "weights", "swiglu.w_2")
    assert list(traces(fig, "mean", "relora")[0].x) == [0, 20, 60, 80]
    assert list(traces(fig, "mean", "decoder")[0].x) == fx.STEPS
    tab = F.summary_table(other)
    ref = other["per"].sel(run="relora", kind="weights", step=80).mean().item()
    assert tab.loc["relora", "PER weights"] == pytest.approx(ref, rel=1e-12)
    assert tab.loc["relora", "final step"] == 80


def test_missing_kind_or_variable_gives_notes_not_errors(ds):
    small = ds.sel(kind=["weights", "grads"]).drop_vars(["ppl", "ppl_macro"])
    fig = F.trajectory(small, "per", "updates", "swiglu.w_2")
    assert not traces(fig, "mean") and "kind 'updates' not in store" in fig.layout.meta["notes"][0]
    fig = F.trajectory(small, "gini", "weights", "swiglu.w_2")
    assert "variable 'gini' not in store" in fig.layout.meta["notes"][0]
    fig = F.training_curves(small)
    assert {t.meta["variable"] for t in traces(fig, "series")} == {"train_loss", "blimp_overall"}
    assert any("ppl_macro" in n for n in fig.layout.meta["notes"])
    sections = R.report_sections(small)
    titles = {s.title: s for s in sections}
    assert titles["Training curves"].figure is not None
    assert any("updates" in n for n in titles["Condition number of weights and updates"].notes)
    assert np.isnan(F.summary_table(small).loc["decoder", "perplexity"])


# ---------------------------------------------------------------- 2-4. other figures


def test_heatmap_values_and_log10_for_cn(ds):
    fig = F.heatmap(ds, "per", "weights", "swiglu.w_0")
    assert len(traces(fig, "heatmap")) == 2
    for run in ("decoder", "relora"):
        (h,) = traces(fig, "heatmap", run)
        ref = ds["per"].sel(run=run, kind="weights", matrix="swiglu.w_0").values.T
        np.testing.assert_allclose(np.array(h.z, dtype=float), ref, rtol=1e-12)
        assert list(h.x) == fx.STEPS and list(h.y) == fx.LAYERS
    (h,) = traces(F.heatmap(ds, "per", "weights", "ov_circuit"), "heatmap", "decoder")
    assert h.z[1][3] is None  # the NaN point is a blank cell
    (h,) = traces(F.heatmap(ds, "cn", "grads", "attention.k_proj"), "heatmap", "relora")
    ref = np.log10(ds["cn"].sel(run="relora", kind="grads", matrix="attention.k_proj").values.T)
    np.testing.assert_allclose(np.array(h.z, dtype=float), ref, rtol=1e-12)


def test_spectrum_is_normalised_by_the_largest_singular_value(ds):
    fig = F.spectrum(ds, "weights", "attention.k_proj", layer=1)
    assert fig.layout.yaxis.type == "log"
    for run in ("decoder", "relora"):
        lines = traces(fig, "spectrum", run)
        assert [t.meta["step"] for t in lines] == fx.STEPS
        for t in lines:
            s = ds["sigma"].sel(run=run, kind="weights", step=t.meta["step"], layer=1,
                                matrix="attention.k_proj").values
            s = s[np.isfinite(s)]  # k_proj is 4 x 8: rank bound 4, the rest NaN padding
            assert list(t.x) == list(range(1, s.size + 1)) and s.size == 4
            np.testing.assert_allclose(t.y, [x / s[0] for x in s], rtol=1e-12)
    # a numerically zero singular value is not drawn on the log axis, and a note says so
    z = ds.copy(deep=True)
    at = {"run": "decoder", "kind": "weights", "step": 0, "layer": 1,
          "matrix": "attention.q_proj"}
    top = float(z["sigma"].loc[{**at, "sv": 0}])
    z["sigma"].loc[{**at, "sv": 7}] = top * 1e-15
    fig = F.spectrum(z, "weights", "attention.q_proj", layer=1)
    first = traces(fig, "spectrum", "decoder")[0]
    assert first.meta["step"] == 0 and list(first.x) == list(range(1, 8))
    assert len(traces(fig, "spectrum", "relora")[0].x) == 8
    assert "up to 1 numerically zero" in fig.layout.meta["notes"][0]
    # updates have no spectrum at step 0
    fig = F.spectrum(ds, "updates", "swiglu.w_2", layer=0)
    assert [t.meta["step"] for t in traces(fig, "spectrum", "decoder")] == fx.STEPS[1:]


def test_training_curves_against_steps_and_hours(ds):
    fig = F.training_curves(ds)
    series = traces(fig, "series")
    # 2 x-axes x 2 runs x (loss, ppl_macro, 2 ppl domains, blimp_overall)
    assert len(series) == 2 * 2 * 5
    for t in series:
        run, var = t.meta["run"], t.meta["variable"]
        y = ds[var].sel(run=run)
        if var == "ppl":
            y = y.sel(domain=t.meta["domain"])
        np.testing.assert_allclose(t.y, y.values, rtol=1e-12)
        x = (ds["wall_seconds"].sel(run=run).values / 3600 if t.meta["x"] == "hours"
             else ds["step"].values)
        np.testing.assert_allclose(t.x, x, rtol=1e-12)


# ---------------------------------------------------------------- 5. ReLoRA


def test_reset_steps_from_cycle_and_from_config(ds):
    assert F.reset_steps(ds, "relora") == [40, 80]
    assert F.config_reset_steps({"relora": {"reset_every": 40}}, 100) == [40, 80]
    # the trainer's rule: never after the last update; paper_compat: t % 40 == 1 after warmup
    assert F.config_reset_steps({"relora": {"reset_every": 40}, "train": {"steps": 80}},
                                80) == [40]
    assert F.config_reset_steps({"relora": {"reset_every": 40, "paper_compat": True},
                                 "train": {"steps": 100, "warmup_steps": 0}}, 100) == [1, 41, 81]
    assert F.config_reset_steps({"relora": {"reset_every": 40, "paper_compat": True},
                                 "train": {"steps": 100, "warmup_steps": 10}}, 100) == [41, 81]
    # paper_compat resets at 41 and 81: the checkpoints at 60 and 100 are the first to show them
    cfg = json.loads(ds.attrs["run_configs"])
    cfg["relora"]["relora"]["paper_compat"] = True
    pc = ds.assign(relora_cycle=ds["relora_cycle"].copy(data=np.array(
        [[np.nan] * 6, [0, 0, 0, 1, 1, 2]], dtype=float)))
    pc.attrs["run_configs"] = json.dumps(cfg)
    assert F.reset_steps(pc, "relora") == [41, 81]
    # no reset_every in the config: resets at the first checkpoints showing a new cycle
    cfg["relora"]["relora"].pop("reset_every")
    pc.attrs["run_configs"] = json.dumps(cfg)
    assert F.reset_steps(pc, "relora") == [60, 100]
    # no relora_cycle: the config alone
    assert F.reset_steps(ds.drop_vars("relora_cycle"), "relora") == [40, 80]


def test_relora_comparison_marks_resets_in_the_relora_column_only(ds):
    fig = F.relora_comparison(ds, ("per", "cn"), "weights", "swiglu.w_2")
    resets = [s for s in fig.layout.shapes if s.name == "reset"]
    assert sorted(s.x0 for s in resets) == [40, 40, 40, 80, 80, 80]  # 3 rows x 2 resets
    relora_axes = {t.xaxis for t in fig.data if t.meta["run"] == "relora"}
    decoder_axes = {t.xaxis for t in fig.data if t.meta["run"] == "decoder"}
    assert {s.xref for s in resets} == relora_axes and not relora_axes & decoder_axes
    assert [a.text for a in fig.layout.annotations][:2] == ["decoder", "relora"]
    (loss,) = [t for t in traces(fig, "series", "relora") if t.meta["variable"] == "train_loss"]
    np.testing.assert_allclose(loss.y, ds["train_loss"].sel(run="relora").values)
    fig = F.relora_comparison(ds.sel(run=["decoder"]))
    assert "no ReLoRA run in store" in fig.layout.meta["notes"]


# ---------------------------------------------------------------- summary and report


def test_summary_table_values(ds):
    tab = F.summary_table(ds)
    assert list(tab.index) == ["decoder", "relora"]
    assert list(tab["type"]) == ["decoder", "relora"]
    for run in ("decoder", "relora"):
        assert tab.loc[run, "final loss"] == ds["train_loss"].sel(run=run, step=100).item()
        assert tab.loc[run, "perplexity"] == ds["ppl_macro"].sel(run=run, step=100).item()
        assert tab.loc[run, "BLiMP"] == ds["blimp_overall"].sel(run=run, step=100).item()
        for metric, col in (("per", "PER"), ("cn", "CN")):
            for kind in ("weights", "updates"):
                v = ds[metric].sel(run=run, kind=kind, step=100).values.ravel()
                v = [x for x in v if math.isfinite(x)]
                # CN lives on a log scale: its summary is the geometric mean
                ref = (math.exp(sum(math.log(x) for x in v) / len(v)) if metric == "cn"
                       else sum(v) / len(v))
                assert tab.loc[run, f"{col} {kind}"] == pytest.approx(ref, rel=1e-12)


@pytest.mark.slow  # the whole HTML report (test_cli_plot_and_report draws it in the fast lane)
def test_report_is_self_contained_with_all_figures(store, tmp_path):
    out, ds, sections = R.write_report([store], tmp_path / "r" / "report.html")
    text = out.read_text(encoding="utf-8")
    assert [s.title for s in sections] == [
        "Training curves", "PER of weights", "PER of updates and gradients",
        "Condition number of weights and updates", "PER of weights, layer by layer",
        "Spectrum evolution", "ReLoRA against decoder"]
    assert R.n_figures(sections) == 7
    assert len(re.findall(r'class="plotly-graph-div"', text)) == 7
    assert text.count("Plotly.newPlot(") == 7
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", text)  # nothing to fetch
    assert text.count("plotly.js v") >= 1 and len(text) > 3_000_000  # plotly.js inlined
    table = text[text.index('<table class="summary">'):text.index("</table>")]
    assert table.count("<tr>") == 3 and "relora" in table
    loss = F.summary_table(ds).loc["relora", "final loss"]
    assert f"<td>{loss:.4g}</td>" in table


def test_combine_stores_prefixes_duplicate_runs(store, tmp_path):
    shifted = fx.make_dataset(seed=1).assign_coords(step=[s + 10 for s in fx.STEPS])
    fx_path = fx.write_dataset(shifted, tmp_path / "other.zarr")
    ds = R.load_stores([store, fx_path])
    assert list(ds.run.values) == ["fixture/decoder", "fixture/relora", "other/decoder",
                                   "other/relora"]
    assert ds.sizes["step"] == 12
    assert np.isnan(ds["train_loss"].sel(run="other/decoder", step=0))
    assert json.loads(ds.attrs["run_configs"])["other/relora"]["kind"] == "relora"
    # the cycle rises between steps 30 and 50 and between 70 and 90: config resets 40 and 80
    assert F.reset_steps(ds, "other/relora") == [40, 80]
    with pytest.raises(FileNotFoundError, match="nope.zarr"):
        R.load_stores([tmp_path / "nope.zarr"])


# ---------------------------------------------------------------- CLI


def test_cli_plot_and_report(store, tmp_path):
    from dynlab_cli.main import app

    runner = CliRunner()

    def said(res) -> str:  # the error box's text, without its frame and line breaks
        return " ".join(res.output.replace("│", " ").split())

    def unspaced(text: str) -> str:  # a path the box wrapped mid-name reads whole again
        return "".join(text.split())
    out = tmp_path / "fig.html"
    res = runner.invoke(app, ["plot", str(store), "--metrics", "cn", "--matrix", "swiglu.w_2",
                              "--kinds", "updates", "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text(encoding="utf-8")
    assert text.count('class="plotly-graph-div"') == 1 and '"type":"log"' in text
    res = runner.invoke(app, ["plot", str(store), "--metrics", "nope", "-o", str(out)])
    assert res.exit_code != 0 and "metric 'nope' is not in the store" in said(res)
    res = runner.invoke(app, ["plot", str(tmp_path / "missing.zarr")])
    assert res.exit_code != 0 and unspaced("missing.zarr: no such file") in unspaced(said(res))
    res = runner.invoke(app, ["plot", str(store), "-f", "heatmap", "-o", str(tmp_path / "x.pdf")])
    assert res.exit_code != 0 and unspaced("x.pdf: expected a .html or .png") in unspaced(
        said(res))
    rep = tmp_path / "report.html"
    res = runner.invoke(app, ["report", str(store), "-o", str(rep)])
    assert res.exit_code == 0, res.output
    assert "(7 figures)" in said(res)
    assert rep.read_text().count('class="plotly-graph-div"') == 7
    loss = F.summary_table(xr.open_zarr(store)).loc["relora", "final loss"]
    assert f"{loss:.4g}" in res.output



def test_cli_plot_one_figure_per_metric_and_kind(store, tmp_path):
    """-m/-k comma lists: one file per (metric, kind), named OUT_<metric>_<kind>; the relora
    figure puts every metric in one file per kind; a metric for a figure without one is an
    error naming --metrics."""
    from dynlab_cli.main import app

    runner = CliRunner()
    out = tmp_path / "fig.html"
    res = runner.invoke(app, ["plot", str(store), "-m", "per,cn", "-k", "weights,updates",
                              "--matrix", "swiglu.w_2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in tmp_path.glob("*.html"))
    assert names == ["fig_cn_updates.html", "fig_cn_weights.html", "fig_per_updates.html",
                     "fig_per_weights.html"]
    for name in names:
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert text.count('class="plotly-graph-div"') == 1
    rel = tmp_path / "rel" / "r.html"
    rel.parent.mkdir()
    res = runner.invoke(app, ["plot", str(store), "-f", "relora", "-m", "per,cn", "-o", str(rel)])
    assert res.exit_code == 0, res.output
    assert [p.name for p in rel.parent.iterdir()] == ["r.html"]
    res = runner.invoke(app, ["plot", str(store), "-f", "training", "-m", "per",
                              "-o", str(tmp_path / "t.html")])
    assert res.exit_code == 2 and "--metrics" in res.output
    assert not (tmp_path / "t.html").exists()
    res = runner.invoke(app, ["plot", str(store), "-k", "weights,nope", "-o", str(out)])
    assert res.exit_code == 2 and "nope" in res.output

# ---------------------------------------------------------------- a store from `dynlab analyze`


@pytest.mark.slow  # analysis and the whole HTML report, end to end
def test_report_from_a_real_analysis_store(tmp_path):
    """The lead's pipeline end to end on two generated runs: every figure has data and the
    summary reads what meta.json said."""
    import dynlab
    from dynlab.runs.checkpoints import ModelSpec
    from dynlab.testing import make_run

    spec = ModelSpec(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, activation_hidden_dim=32,
                     vocab_size=24)
    steps = [0, 10, 20, 30]

    def meta(relora: bool):
        def f(step: int) -> dict:
            m = {"train_loss": 5.0 - step / 10, "wall_seconds": 2.0 * step, "tokens": 64 * step,
                 "eval": {"perplexity": {"by_domain": {"a": 50.0 - step, "b": 60.0 - step},
                                         "macro": 55.0 - step},
                          "blimp": {"by_uid": {"u1": 0.5 + step / 100}, "by_field": {"f": 0.5},
                                    "overall": 0.5 + step / 100}}}
            return {**m, "relora_cycle": step // 20} if relora else m
        return f

    runs = [make_run(tmp_path / "decoder", spec, steps, seed=1, meta=meta(False)),
            make_run(tmp_path / "relora", spec, steps, seed=2, meta=meta(True),
                     relora={"r": 2, "alpha": 4, "reset_every": 20})]
    store = dynlab.analyze(runs, out=tmp_path / "a.zarr", metrics="per,cn,er,stable_rank",
                           progress=False)
    out, ds, sections = R.write_report([store], tmp_path / "report.html")
    assert R.n_figures(sections) == 7
    tab = F.summary_table(ds)
    assert tab.loc["decoder", "final loss"] == pytest.approx(2.0)
    assert tab.loc["relora", "perplexity"] == pytest.approx(25.0)
    assert tab.loc["relora", "BLiMP"] == pytest.approx(0.8)
    assert F.reset_steps(ds, "relora") == [20]
    fig = F.trajectory(ds, "per", "updates", "attention.o_proj")
    (mean,) = traces(fig, "mean", "decoder")
    assert list(mean.x) == [10, 20, 30]
    ref = ds["per"].sel(run="decoder", kind="updates", matrix="attention.o_proj").mean("layer")
    np.testing.assert_allclose(mean.y, ref.values[1:], rtol=1e-12)
