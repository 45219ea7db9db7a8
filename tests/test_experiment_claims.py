"""The claims of a study: observations read from a real analysis store, the loss around
resets by hand, the claims table, its calibration (planted effect -> supported, null ->
inconclusive), the seed view of the figures and the report's Claims section."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dynlab.experiment import claims as C
from dynlab.experiment import stats as S

OBS_PLANTED = {  # observation -> (decoder mean, planted R − D, noise sd across seeds)
    "final_loss": (3.2, 0.05, 0.004), "ppl": (27.0, 1.5, 0.12), "blimp": (0.66, -0.04, 0.004),
    "per_weights": (0.84, -0.05, 0.004), "per_updates": (0.59, -0.28, 0.02),
    "per_grads": (0.61, -0.03, 0.0025)}


def design_for(seeds, scales=("micro",)) -> dict:
    runs, conditions = {}, []
    for scale in scales:
        for kind in ("decoder", "relora"):
            name = f"{kind}-{scale}"
            conditions.append({"name": name, "kind": kind, "scale": scale})
            for s in seeds:
                runs[f"{name}-s{s}"] = {"condition": name, "seed": int(s), "kind": kind}
    return {"name": "t", "conditions": conditions, "runs": runs}


def draw_table(rng: np.random.Generator, seeds, planted: bool) -> dict:
    """Per-run observations: each seed's decoder value, and relora = decoder value + the
    planted difference (0 for the null) + independent noise."""
    table = {}
    for s in seeds:
        d_row, r_row = dict.fromkeys(C.OBSERVATIONS, math.nan), dict.fromkeys(C.OBSERVATIONS,
                                                                             math.nan)
        for obs, (mean, diff, sd) in OBS_PLANTED.items():
            d_row[obs] = mean + sd * rng.standard_normal()
            r_row[obs] = mean + (diff if planted else 0.0) + sd * rng.standard_normal()
        table[f"decoder-micro-s{s}"], table[f"relora-micro-s{s}"] = d_row, r_row
    return table


EXPECTED = {"final_loss": "loss_higher", "ppl": "ppl_higher", "blimp": "blimp_lower",
            "per_weights": "per_weights_lower", "per_updates": "per_updates_lower",
            "per_grads": "per_grads_lower"}


@pytest.mark.parametrize("planted", [True, False])
def test_calibration_planted_supported_null_inconclusive(planted):
    """200 replications of a 5-seed study, drawn from a fixed seed (derandomised): a planted
    effect in the claimed direction (≥ 12 noise sd per seed difference) is judged
    "supported", no effect "inconclusive", each in at least 95% of the replications."""
    rng = np.random.default_rng(20240 + planted)
    seeds = range(5)
    design = design_for(seeds)
    counts = {c: {v: 0 for v in S.VERDICTS} for c in EXPECTED.values()}
    for _ in range(200):
        res = {r.id: r for r in C.judge(draw_table(rng, seeds, planted), design)}
        for claim in EXPECTED.values():
            counts[claim][res[claim].verdict] += 1
        m = sum(math.isfinite(r.lo) for r in res.values())
        assert m == 6 and res["loss_higher"].verdict_level == pytest.approx(1 - 0.05 / 6)
    want = S.SUPPORTED if planted else S.INCONCLUSIVE
    for claim, c in counts.items():
        assert c[want] >= 190, (claim, c)
    if not planted:  # Bonferroni: each null claim errs in at most 0.05/6 of replications
        assert sum(c[S.SUPPORTED] + c[S.CONTRADICTED] for c in counts.values()) <= 6 * 200 * 0.05


def test_judge_pairs_by_seed_and_reports_the_95_interval():
    seeds = [3, 7, 11]
    design = design_for(seeds)
    table = {run: dict.fromkeys(C.OBSERVATIONS, math.nan) for run in design["runs"]}
    d, r = [3.0, 3.4, 2.9], [3.1, 3.6, 3.05]
    for s, a, b in zip(seeds, d, r, strict=True):
        table[f"decoder-micro-s{s}"]["final_loss"] = a
        table[f"relora-micro-s{s}"]["final_loss"] = b
    del table["relora-micro-s11"]  # a run that failed: its seed drops out of the pairs
    res = {x.id: x for x in C.judge(table, design)}
    loss = res["loss_higher"]
    ref = S.paired_difference([3.1, 3.6], [3.0, 3.4], 0.95)
    assert (loss.effect, loss.lo, loss.hi, loss.n) == (pytest.approx(0.15), ref.lo, ref.hi, 2)
    assert loss.method == "paired t" and loss.scale == "micro"
    # m = 1 claim with an interval: the verdict level is the plain 95%
    assert loss.verdict_level == pytest.approx(0.95)
    assert loss.verdict == S.verdict(ref.lo, ref.hi, 1)
    assert res["ppl_higher"].n == 0 and res["ppl_higher"].verdict == S.INCONCLUSIVE


def test_gap_between_scales_is_welch_of_the_seed_differences():
    design = design_for([0, 1, 2], scales=("small", "tiny"))  # sorted tiny -> small
    table = {run: dict.fromkeys(C.OBSERVATIONS, math.nan) for run in design["runs"]}
    gaps = {"tiny": [0.01, 0.02, 0.015], "small": [0.05, 0.07, 0.06]}
    for scale, g in gaps.items():
        for s in range(3):
            table[f"decoder-{scale}-s{s}"]["final_loss"] = 3.0
            table[f"relora-{scale}-s{s}"]["final_loss"] = 3.0 + g[s]
    res = [r for r in C.judge(table, design) if r.id == "loss_gap_grows"]
    assert len(res) == 1 and res[0].scale == "tiny → small"
    ref = S.welch_difference(gaps["small"], gaps["tiny"])
    assert (res[0].effect, res[0].lo, res[0].hi) == (pytest.approx(0.045), pytest.approx(ref.lo),
                                                     pytest.approx(ref.hi))


def test_worst_early_is_a_bootstrap_median_against_one_half():
    design = design_for(range(5))
    table = {run: dict.fromkeys(C.OBSERVATIONS, math.nan) for run in design["runs"]}
    fractions = [0.1, 0.2, 0.15, 0.3, 0.1]
    for s, f in enumerate(fractions):
        table[f"relora-micro-s{s}"]["worst_at"] = f
    res = {r.id: r for r in C.judge(table, design)}["worst_early"]
    ref = S.bootstrap_percentile(fractions, np.median, 0.95)
    assert (res.effect, res.lo, res.hi) == (0.15, ref.lo, ref.hi)
    assert res.method.startswith("bootstrap percentile") and res.verdict == S.SUPPORTED


def test_loss_around_resets_by_hand():
    # loss 2.0 before each reset, 3.0 for two steps after, then back to 1.5 by the cycle's end
    records = []
    for step in range(1, 41):
        phase = step % 20
        loss = 3.0 if phase in (1, 2) and step > 2 else (1.5 if phase in (19, 0) else 2.0)
        records.append({"step": step, "loss": loss})
    jump, recovery = C.loss_around(records, [20], 2, [40])
    # before: steps 19, 20 -> 1.5; after: 21, 22 -> 3.0; end: 39, 40 -> 1.5
    assert (jump, recovery) == (1.5, 0.0)
    jump, recovery = C.loss_around(records, [10], 2, [20])
    assert (jump, recovery) == (0.0, -0.5)  # steps 9,10: 2.0; 11,12: 2.0; 19,20: 1.5
    assert all(math.isnan(v) for v in C.loss_around([], [10], 2, [20]))


def test_reset_windows_from_run_json():
    cfg = {"relora": {"reset_steps": [100, 200], "reset_every": 100}, "train": {"steps": 300}}
    assert C.reset_windows(cfg) == ([100, 200], [200, 300], 10)


# ---------------------------------------------------------------- a real store


def build_store(path, table: dict, design: dict, steps=(0, 100, 200)):
    """An analysis store made by dynlab's store code (ensure_store, RegionWriter) holding
    `table`'s observations at the last step (per: the same value in every layer and matrix,
    so that every mean over them is that value; earlier steps hold other values)."""
    from dynlab.analysis.store import Layout, RegionWriter, ensure_store, quiet_zarr

    runs = list(design["runs"])
    cfg = {r: {"kind": i["kind"], "model": {"d_model": 8},
               "train": {"seed": i["seed"], "kind": i["kind"], "steps": steps[-1]}}
           for r, i in design["runs"].items()}
    layout = Layout(runs=runs, steps=list(steps), kinds=["weights", "grads", "updates"],
                    metrics=["per", "cn", "cn_nz"], n_layers=2, n_heads=1, n_sv=2, n_head_sv=1,
                    n_emb_sv=1, run_configs=cfg)
    ensure_store(path, layout)
    w = RegionWriter(path)
    last = len(steps) - 1
    with quiet_zarr():
        for var, obs in (("train_loss", "final_loss"), ("ppl_macro", "ppl"),
                         ("blimp_overall", "blimp")):
            w.write({"step": last}, {var: np.array([table[r][obs] for r in runs])})
            w.write({"step": 0}, {var: np.full(len(runs), 99.0)})
        per = np.full((len(runs), 3, 2, w.read("per").shape[-1]), np.nan)
        for i, r in enumerate(runs):
            per[i, 0] = table[r]["per_weights"]
            per[i, 1] = table[r]["per_grads"]
            per[i, 2] = table[r]["per_updates"]
        w.write({"step": last}, {"per": per})
        w.write({"step": 0}, {"per": np.where(np.isnan(per), np.nan, 0.5)[:, :1].repeat(3, 1)
                              * np.array([1, np.nan, np.nan])[None, :, None, None]})
        cn_nz = np.full(per.shape, np.nan)
        cn_nz[:, 2] = 10.0 ** np.arange(len(runs))[:, None, None] / 1e3 + 1  # updates
        w.write({"step": 1}, {"cn_nz": cn_nz * 10, "cn": np.where(np.isnan(cn_nz), np.nan,
                                                                   np.inf)})
        w.write({"step": last}, {"cn_nz": cn_nz, "cn": cn_nz})
    return path


@pytest.mark.parametrize("planted", [True, False])
def test_observe_reads_a_real_store_and_judges_it(tmp_path, planted):
    from dynlab.analysis.store import open_store

    seeds = range(5)
    design = design_for(seeds)
    table = draw_table(np.random.default_rng(5 + planted), seeds, planted)
    ds = open_store(build_store(tmp_path / "s.zarr", table, design))
    got = C.observe(ds, design)
    for run, row in table.items():
        for obs in OBS_PLANTED:
            assert got[run][obs] == pytest.approx(row[obs], rel=1e-12), (run, obs)
        # digits lost: log10 of the updates' cn_nz at its worst step (step 100, ×10)
        i = list(design["runs"]).index(run)
        assert got[run]["digits_lost"] == pytest.approx(np.log10(10 * (10.0 ** i / 1e3 + 1)))
        assert got[run]["worst_at"] == pytest.approx(0.5)
        assert got[run]["rank_deficient"] == pytest.approx(0.5)  # inf at step 100 only
        assert math.isnan(got[run]["anisotropy"])  # no activations in this store
    verdicts = {r.id: r.verdict for r in C.judge(got, design)}
    for claim in EXPECTED.values():
        assert verdicts[claim] == (S.SUPPORTED if planted else S.INCONCLUSIVE), claim


def test_seed_view_bands_across_seeds(tmp_path):
    from dynlab.analysis.store import open_store
    from dynlab.viz import figures as F
    from dynlab.viz.seeds import band_caption, seed_view, sibling_groups

    seeds = range(3)
    design = design_for(seeds)
    table = draw_table(np.random.default_rng(1), seeds, True)
    ds = open_store(build_store(tmp_path / "s.zarr", table, design)).load()
    groups = sibling_groups(ds)
    assert groups == {"decoder-micro": [f"decoder-micro-s{s}" for s in seeds],
                      "relora-micro": [f"relora-micro-s{s}" for s in seeds]}
    view = seed_view(ds, groups)
    assert [str(r) for r in view["run"].values] == list(groups)
    assert view.sizes["layer"] == 3  # the seeds
    # per of updates at the last step: seed i's layer mean is table's value
    vals = view["per"].sel(run="relora-micro", kind="updates", matrix="swiglu.w_2").isel(step=-1)
    assert vals.values == pytest.approx([table[f"relora-micro-s{s}"]["per_updates"]
                                         for s in seeds])
    fig = F.trajectory_grid(view, "per", ["updates"], ["swiglu.w_2"])
    band = [t for t in fig.data if (t.meta or {}).get("role") == "band_hi"
            and t.meta["run"] == "relora-micro"]
    ref = S.t_interval(vals.values)
    assert band and band[0].y[-1] == pytest.approx(ref.hi)
    assert "3 seeds" in band_caption(groups) and "across seeds" in band_caption(groups)
    # geometric mean over layers for a condition number, then across seeds
    assert view["cn_nz"].sel(run="decoder-micro", kind="updates").isel(step=-1).values[:, 0] \
        == pytest.approx(ds["cn_nz"].sel(kind="updates").isel(step=-1, layer=0)
                         .sel(run=groups["decoder-micro"]).values[:, 0])
    # runs that differ in more than their seed are no siblings
    cfg = json.loads(ds.attrs["run_configs"])
    cfg["relora-micro-s1"]["train"]["steps"] = 7
    groups = sibling_groups(ds.assign_attrs(run_configs=json.dumps(cfg)))
    assert groups["relora-micro"] == ["relora-micro-s0", "relora-micro-s2"]


@pytest.mark.slow  # builds the whole HTML report
def test_report_has_claims_first_and_seed_captions(tmp_path):
    from dynlab.analysis.store import open_store
    from dynlab.viz.report import build_report

    seeds = range(3)
    design = design_for(seeds)
    table = draw_table(np.random.default_rng(2), seeds, True)
    ds = open_store(build_store(tmp_path / "s.zarr", table, design))
    results = C.judge(C.observe(ds, design), design)
    text, sections = build_report(ds, "t", claims=[r.as_dict() for r in results])
    assert text.index("<h2>Claims</h2>") < text.index("<h2>Summary</h2>")
    assert 'data-claim="per_updates_lower"' in text
    per_updates = next(r for r in results if r.id == "per_updates_lower")
    assert f"{per_updates.effect:.3g}" in text
    captions = {s.title: s.caption for s in sections}
    assert "across seeds" in captions["PER of updates and gradients"]
    assert "across seeds" not in captions["Training curves"]
    fig = next(s.figure for s in sections if s.title == "PER of updates and gradients")
    assert "over seeds" in fig.layout.title.text
