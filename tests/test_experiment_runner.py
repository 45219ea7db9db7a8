"""`dynlab study run`: a micro grid of conditions × seeds trained, evaluated and analysed
into one store; interrupted at each phase and run again it gives the store of an
uninterrupted run; local processes, a Dask LocalCluster and submitit's local executor give
that store too; a condition that fails is reported and the completed runs are kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import xarray as xr
import yaml
from builders import tiny_train_options

from dynlab import faults
from dynlab.errors import DynlabFailure, InputError
from dynlab.experiment.runner import read_design, run_study
from dynlab.experiment.studyfile import load_study

pytestmark = [pytest.mark.slow, pytest.mark.soak]  # trains runs, spawns processes
TIMING = ("wall_seconds", "gpu_hours")  # wall-clock measures differ between any two runs


def study_file(tmp_path, seeds=(0,), **extra):
    common = tiny_train_options(steps=4, checkpoint_every=2, warmup_steps=1)
    for k in ("progress",):
        common.pop(k)
    data = {"name": "micro", "seeds": list(seeds), "common": common,
            "conditions": {"dec": {"kind": "decoder"},
                           "rel": {"kind": "relora", "overrides": {
                               "reset_every": 2, "restart_warmup_steps": 1, "lora_rank": 2}}},
            "eval": {"limit": 2}, "analyze": {"metrics": "per,cn,cn_nz"}, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def comparable(path):
    """The store without wall-clock variables, and run_configs without the output paths."""
    ds = xr.open_zarr(path).load().drop_vars(list(TIMING))
    configs = json.loads(ds.attrs["run_configs"])
    for cfg in configs.values():
        cfg["train"].pop("out", None)
        cfg.pop("dynlab_version", None)
    ds.attrs["run_configs"] = configs
    return ds


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid run once, sequentially, without interruption."""
    tmp = tmp_path_factory.mktemp("ref")
    result = run_study(load_study(study_file(tmp, seeds=(0, 1))), tmp / "out", progress=False,
                       say=lambda s: None)
    assert [u.status for u in result.units] == ["ok"] * 4
    assert all(u.trained == "trained" and u.evaluated == 3 for u in result.units)
    return tmp / "out"


def test_the_store_holds_every_run_evaluated_and_analysed(reference):
    ds = xr.open_zarr(reference / "analysis.zarr")
    assert sorted(map(str, ds.run.values)) == ["dec-s0", "dec-s1", "rel-s0", "rel-s1"]
    assert int(ds.analyzed.sum()) == 12  # 4 runs × steps 0, 2, 4
    assert ds.blimp_overall.notnull().all()  # the eval phase (the trainer's eval is off)
    for run in ("dec-s0", "rel-s1"):
        assert (reference / "runs" / run / "checkpoints" / "step_4" / "eval.json").is_file()
    # seeds differ, so do the runs; the same seed gives decoder and relora the same start
    loss = ds.train_loss.sel(step=0).load()
    assert loss.sel(run="dec-s0").item() != loss.sel(run="dec-s1").item()
    assert read_design(reference)["runs"]["rel-s1"] == {"condition": "rel", "seed": 1,
                                                        "kind": "relora"}
    # a second run has nothing to do, and changes nothing
    before = comparable(reference / "analysis.zarr")
    again = run_study(load_study(reference.parent / "study.yaml"), reference, progress=False,
                      say=lambda s: None)
    assert {(u.trained, u.evaluated) for u in again.units} == {("skipped", 0)}
    xr.testing.assert_identical(comparable(reference / "analysis.zarr"), before)


def test_interrupted_at_each_phase_then_rerun_gives_the_same_store(reference, tmp_path,
                                                                    monkeypatch):
    study = load_study(study_file(tmp_path, seeds=(0, 1)))
    out = tmp_path / "out"

    def run_with_fault(spec):
        monkeypatch.setenv(faults.ENV, spec)
        faults._seen.clear()
        with pytest.raises(KeyboardInterrupt):  # a real SIGINT, as Ctrl-C
            run_study(study, out, progress=False, say=lambda s: None)
        monkeypatch.delenv(faults.ENV)

    run_with_fault("train.step:interrupt@6")   # during the second run's training
    assert not (out / "runs" / "dec-s1" / "checkpoints" / "step_4").exists()
    run_with_fault("eval.stored:interrupt@5")  # during an evaluation
    evaluated = list(out.glob("runs/*/checkpoints/*/eval.json"))
    assert 0 < len(evaluated) < 12
    # the analysis killed (SIGKILL, no cleanup) while it writes the second checkpoint
    env = dict(os.environ, **{faults.ENV: "analyze.write:kill@2"})
    proc = subprocess.run([sys.executable, "-m", "dynlab", "study", "run",
                           str(study.path), "-o", str(out), "--no-progress", "--no-report"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the same command once more finishes the study: the store of an uninterrupted run
    faults._seen.clear()
    result = run_study(study, out, progress=False, say=lambda s: None)
    assert all(u.status == "ok" for u in result.units)
    xr.testing.assert_identical(comparable(out / "analysis.zarr"),
                                comparable(reference / "analysis.zarr"))
    # and the training curves are the uninterrupted ones
    for run in ("dec-s1", "rel-s0"):
        a = [{k: v for k, v in r.items() if k not in ("wall_seconds", "tokens_per_second",
                                                       "gpu_hours")}
             for r in map(json.loads, (out / "runs" / run / "metrics.jsonl").read_text()
                          .splitlines())]
        b = [{k: v for k, v in r.items() if k not in ("wall_seconds", "tokens_per_second",
                                                       "gpu_hours")}
             for r in map(json.loads, (reference / "runs" / run / "metrics.jsonl").read_text()
                          .splitlines())]
        assert a == b


@pytest.mark.parametrize("where", ["jobs", "dask", "submitit"])
def test_local_processes_dask_and_submitit_give_the_same_store(reference, tmp_path, where):
    extra = {"slurm": {"cluster": "local", "timeout_min": 10}} if where == "submitit" else {}
    study = load_study(study_file(tmp_path, seeds=(0, 1), **extra))
    options = {"jobs": dict(jobs=2), "dask": dict(scheduler="local:2"),
               "submitit": dict(slurm=True)}[where]
    result = run_study(study, tmp_path / "out", progress=False, say=lambda s: None, **options)
    assert sorted(u.run for u in result.units) == ["dec-s0", "dec-s1", "rel-s0", "rel-s1"]
    xr.testing.assert_identical(comparable(tmp_path / "out" / "analysis.zarr"),
                                comparable(reference / "analysis.zarr"))
    if where == "submitit":
        assert list((tmp_path / "out" / "slurm").iterdir())  # submitit's job folder


def test_a_condition_that_fails_keeps_the_completed_runs(tmp_path):
    path = study_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["conditions"]["bad"] = {"kind": "decoder", "overrides": {"data": str(tmp_path / "x.txt")}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match=r"1 of 3 runs failed \(bad-s0: .*x\.txt") as err:
        run_study(load_study(path), tmp_path / "out", progress=False, say=lambda s: None)
    assert "the 2 completed runs are analysed" in str(err.value)
    ds = xr.open_zarr(tmp_path / "out" / "analysis.zarr")
    assert sorted(map(str, ds.run.values)) == ["dec-s0", "rel-s0"]
    assert int(ds.analyzed.sum()) == 6


def test_diverging_condition_is_a_failure_exit_1(tmp_path):
    path = study_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["conditions"] = {"hot": {"kind": "decoder", "overrides": {"lr": 1.0e12}}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DynlabFailure, match="hot-s0: TrainingDiverged") as err:
        run_study(load_study(path), tmp_path / "out", progress=False, say=lambda s: None)
    assert not isinstance(err.value, InputError) and "no run completed" in str(err.value)
    from typer.testing import CliRunner

    from dynlab_cli.main import app

    res = CliRunner().invoke(app, ["study", "run", str(path), "-o", str(tmp_path / "out"),
                                   "--no-progress"])
    assert res.exit_code == 1 and "hot-s0" in res.output


def test_a_torchrun_run_of_the_study_is_the_run_dynlab_train_writes(tmp_path):
    """`nproc: 2` in the study's `common`: `dynlab study run` trains its run with 2 gloo
    processes under torchrun, and that run is the one `dynlab train relora --nproc 2` writes
    with the same options and seed: the same loss at every step, bitwise the same weights,
    and gradients at every checkpoint (LoRA dropout on: each rank's masks are drawn
    from its own seeded stream, so equal only if the study launched the same processes),
    the same run.json but for --out."""
    from safetensors.torch import load_file

    from dynlab.runs.layout import complete_checkpoints

    opts = tiny_train_options(steps=4, checkpoint_every=2, warmup_steps=1, batch_size=4,
                              threads=1)
    opts.pop("progress")
    relora = dict(reset_every=2, restart_warmup_steps=1, lora_rank=2, lora_dropout=0.1)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"seeds": [3], "common": {**opts, "nproc": 2},
                                    "conditions": {"rel": {"kind": "relora",
                                                           "overrides": relora}},
                                    "analyze": {"metrics": "per"}}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    study = subprocess.run([sys.executable, "-m", "dynlab", "study", "run", str(path), "-o",
                            str(tmp_path / "out"), "--no-progress", "--no-report"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert study.returncode == 0, study.stdout[-2000:] + study.stderr[-4000:]
    flags = [f"--{k.replace('_', '-')}={v}".replace("activation-hidden-dim", "hidden-dim")
             for k, v in {**opts, **relora, "seed": 3}.items()]
    ref = tmp_path / "ref"
    train = subprocess.run([sys.executable, "-m", "dynlab", "train", "relora", "--nproc", "2",
                            "--out", str(ref), "--no-progress", *flags],
                           env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-4000:]
    got = tmp_path / "out" / "runs" / "rel-s3"
    a, b = json.loads((got / "run.json").read_text()), json.loads((ref / "run.json").read_text())
    assert a["distributed"] == {"world_size": 2, "backend": "gloo", "batch_size_per_process": 2}
    assert a["train"].pop("out") == str(got) and b["train"].pop("out") == str(ref)
    assert a == b
    records = [[{k: v for k, v in r.items() if k not in (*TIMING, "tokens_per_second")}
                for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
               for d in (got, ref)]
    assert records[0] == records[1] and [r["step"] for r in records[0]] == [0, 1, 2, 3, 4]
    steps = [s for s, _ in complete_checkpoints(got)]
    assert steps == [s for s, _ in complete_checkpoints(ref)] == [0, 2, 4]
    for s in steps:
        meta = json.loads((got / f"checkpoints/step_{s}/meta.json").read_text())
        assert (meta["world_size"], meta["ranks_in_step"]) == (2, True)
        files = sorted(p.name for p in (got / f"checkpoints/step_{s}").glob("*.safetensors"))
        assert {"weights.safetensors", "grads.safetensors"} <= set(files)
        for name in files:
            x = load_file(str(got / f"checkpoints/step_{s}/{name}"))
            y = load_file(str(ref / f"checkpoints/step_{s}/{name}"))
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]), (s, name, k)
    ds = xr.open_zarr(tmp_path / "out" / "analysis.zarr")
    assert [str(r) for r in ds.run.values] == ["rel-s3"] and int(ds.analyzed.sum()) == 3
