"""The study a store holds, found from the store alone (OUT/study.json beside
OUT/analysis.zarr, else sibling seeds of a decoder and a relora condition), and the Claims
section `dynlab report STORE` starts with: the table `dynlab study report` prints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_experiment_claims import EXPECTED, build_store, design_for, draw_table
from typer.testing import CliRunner

from dynlab.analysis.store import open_store
from dynlab.errors import InputError
from dynlab.experiment import claims as C
from dynlab.experiment import stats as S
from dynlab.experiment.design import design_from_seeds, scale_of, store_claims, store_design
from dynlab.viz.claims import claims_html

SEEDS = range(3)


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    """OUT of a 3-seed micro study with a planted effect: OUT/analysis.zarr (written by
    dynlab's store code), OUT/study.json (the grid) and each run's metrics.jsonl with a loss
    that jumps by 0.5 after the relora runs' reset at step 100."""
    out = tmp_path_factory.mktemp("study") / "out"
    design = {**design_for(SEEDS), "name": "planted"}
    table = draw_table(np.random.default_rng(7), SEEDS, True)
    build_store(out / "analysis.zarr", table, design)
    (out / "study.json").write_text(json.dumps(design))
    for run, info in design["runs"].items():
        (out / "runs" / run).mkdir(parents=True)
        jump = 0.5 if info["kind"] == "relora" else 0.0
        lines = [json.dumps({"step": s, "loss": 3.0 + (jump if 100 < s <= 110 else 0.0)
                             + 0.01 * info["seed"]}) for s in range(1, 201)]
        (out / "runs" / run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    # run.json as the store keeps it: relora's resets, so that reset_jump has data
    ds = open_store(out / "analysis.zarr")
    configs = json.loads(ds.attrs["run_configs"])
    for run, info in design["runs"].items():
        if info["kind"] == "relora":
            configs[run]["relora"] = {"reset_steps": [100], "reset_every": 100}
    import zarr

    zarr.open_group(str(out / "analysis.zarr"), mode="r+").attrs["run_configs"] = \
        json.dumps(configs)
    return out, design, table


def test_study_json_beside_the_store_gives_the_study_reports_table(study_out, tmp_path):
    from dynlab_cli.study import show_claims

    out, design, _ = study_out
    found = store_claims(out / "analysis.zarr")
    assert found is not None
    got_design, results, source = found
    assert source == "study.json" and got_design == design
    # `dynlab study report OUT`'s table, row for row (its claims.json written elsewhere)
    shutil.copytree(out, tmp_path / "copy")
    want = show_claims(tmp_path / "copy", tmp_path / "claims.json")
    assert [r.as_dict() for r in results] == [r.as_dict() for r in want]
    assert claims_html([r.as_dict() for r in results]) == claims_html(
        json.loads((tmp_path / "claims.json").read_text())["claims"])
    by = {r.id: r for r in results}
    assert all(by[claim].n == 3 for claim in EXPECTED.values())
    for claim in ("loss_higher", "ppl_higher", "per_updates_lower"):  # ≥ 12 sd planted
        assert by[claim].verdict == S.SUPPORTED, claim
    # the loss around the reset, read from the runs' metrics.jsonl: +0.5 for relora only
    assert by["reset_jump"].effect == pytest.approx(0.5) and by["reset_jump"].n == 3


def test_sibling_seeds_alone_give_the_same_claims(study_out, tmp_path):
    out, design, table = study_out
    alone = tmp_path / "alone.zarr"
    shutil.copytree(out / "analysis.zarr", alone)  # no study.json beside it
    ds = open_store(alone)
    got, dirs, source = store_design(alone, ds)
    assert source == "sibling seeds" and dirs == {}  # run.json's out: no such folders here
    assert got["runs"] == design["runs"]
    assert [(c["name"], c["kind"], c["scale"]) for c in got["conditions"]] == [
        ("decoder-micro", "decoder", "d8"), ("relora-micro", "relora", "d8")]
    _, results, _ = store_claims(alone, ds)
    _, beside, _ = store_claims(out / "analysis.zarr")
    for a, b in zip(results, beside, strict=True):
        if a.id in ("reset_jump", "reset_recovery"):  # need the runs' metrics.jsonl
            assert a.n == 0 and a.verdict == S.INCONCLUSIVE
            continue
        assert (a.id, a.effect, a.lo, a.hi, a.n, a.verdict) == (
            b.id, pytest.approx(b.effect, nan_ok=True), pytest.approx(b.lo, nan_ok=True),
            pytest.approx(b.hi, nan_ok=True), b.n, b.verdict) and a.scale == "d8"


def test_no_study_no_claims(study_out, tmp_path):
    """Decoder runs alone (no relora condition to compare), runs of different options (no
    siblings), a study.json naming other runs: no design, or the seeds' one."""
    decoders = {"name": "d", "conditions": [{"name": "decoder-micro", "kind": "decoder",
                                              "scale": "micro"}],
                "runs": {f"decoder-micro-s{s}": {"condition": "decoder-micro", "seed": s,
                                                 "kind": "decoder"} for s in SEEDS}}
    table = draw_table(np.random.default_rng(0), SEEDS, False)
    path = build_store(tmp_path / "d.zarr", table, decoders)
    assert store_claims(path) is None
    out, design, _ = study_out
    ds = open_store(out / "analysis.zarr")
    configs = json.loads(ds.attrs["run_configs"])
    for i, run in enumerate(configs):
        configs[run]["train"]["steps"] = 200 + i  # every run differs: no siblings
    assert design_from_seeds(ds.assign_attrs(run_configs=json.dumps(configs))) is None
    other = tmp_path / "other"
    shutil.copytree(out, other)
    (other / "study.json").write_text(json.dumps({**design, "runs": {"x-s0": {
        "condition": "x", "seed": 0, "kind": "decoder"}}}))
    assert store_design(other / "analysis.zarr", ds)[2] == "sibling seeds"
    (other / "study.json").write_text("{not json")
    with pytest.raises(InputError, match="study.json: not valid JSON"):
        store_claims(other / "analysis.zarr")


def test_scale_is_the_preset_else_the_width_and_depth():
    assert scale_of({"train": {"preset": "tiny"}, "model": {"d_model": 96}}) == "tiny"
    assert scale_of({"train": {"preset": None}, "model": {"d_model": 96, "n_layers": 12}}) \
        == "d96×12"
    assert scale_of({}) == "d?"


def test_seed_repeated_in_a_group_is_used_once(study_out):
    out, design, _ = study_out
    ds = open_store(out / "analysis.zarr")
    configs = json.loads(ds.attrs["run_configs"])
    configs["relora-micro-s2"]["train"]["seed"] = 1  # a copy of seed 1's run
    got, _ = design_from_seeds(ds.assign_attrs(run_configs=json.dumps(configs)))
    assert "relora-micro-s2" not in got["runs"] and got["runs"]["relora-micro-s1"]["seed"] == 1
    results = C.judge(C.observe(ds, got), got)
    assert {r.id: r.n for r in results}["loss_higher"] == 2  # seeds 0 and 1 paired


def test_a_damaged_study_json_is_a_warning_and_no_claims(study_out, tmp_path, capsys):
    from dynlab_cli.viz import study_claims

    out, _, _ = study_out
    shutil.copytree(out, tmp_path / "copy")
    (tmp_path / "copy" / "study.json").write_text("[]")
    assert study_claims([tmp_path / "copy" / "analysis.zarr"]) == []
    err = capsys.readouterr().err
    assert "no Claims section" in err and "expected an object with 'runs'" in err


@pytest.mark.slow  # builds the whole HTML report (plotly): 10-50 s on 2 busy cores
@pytest.mark.soak
def test_dynlab_report_starts_with_the_study_reports_claims(study_out, tmp_path):
    """`dynlab report OUT/analysis.zarr` holds, first, the Claims section of the table
    `dynlab study report OUT` writes (`study report --html` renders it with the same
    dynlab.viz.claims.claims_html)."""
    from dynlab_cli.main import app

    out, _, _ = study_out
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    res = CliRunner().invoke(app, ["report", str(copy / "analysis.zarr"), "-o",
                                   str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "holds study planted (from its study.json)" in res.output
    res = CliRunner().invoke(app, ["study", "report", str(copy), "--json",
                                   str(tmp_path / "claims.json")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "r.html").read_text()
    start = text.index('<section class="claims">')
    assert start < text.index("<h2>Summary</h2>")
    want = claims_html(json.loads((tmp_path / "claims.json").read_text())["claims"])
    assert text[start:start + len(want)] == want
    assert want.count("<tr data-claim=") == len(C.CLAIMS)
