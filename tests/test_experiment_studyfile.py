"""The study file: what it accepts, and a clear message (exit 2) for what it does not."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from dynlab.errors import InputError
from dynlab.experiment.studyfile import load_study, run_name

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def write(tmp_path, data, name="s.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


BASE = {"seeds": [0, 1], "common": {"steps": 4, "checkpoint-every": 2},
        "conditions": {"dec": {"kind": "decoder"},
                       "rel": {"kind": "relora", "overrides": {"reset_every": 2}}}}


def test_units_options_and_design(tmp_path):
    study = load_study(write(tmp_path, BASE))
    assert study.name == "s" and study.seeds == (0, 1)
    units = study.units()
    assert [u.run for u in units] == ["dec-s0", "rel-s0", "dec-s1", "rel-s1"]  # seed by seed
    assert units[3].options == {"steps": 4, "checkpoint_every": 2, "reset_every": 2, "seed": 1}
    assert study.condition("rel").scale == "micro"  # the preset, when not given
    design = study.design()
    assert design["runs"]["rel-s1"] == {"condition": "rel", "seed": 1, "kind": "relora"}
    assert run_name("a", 3) == "a-s3"


def test_the_repository_study_files_load():
    mini = load_study(ROOT / "configs/study/mini.yaml")
    assert len(mini.units()) == 20 and {(c.kind, c.scale) for c in mini.conditions} == {
        ("decoder", "nano"), ("relora", "nano"), ("decoder", "micro"), ("relora", "micro")}
    from dynlab.experiment.claims import scales_of

    # two sizes, smallest first: the loss gap's growth with size is a claim of the table
    assert [s for s, _, _ in scales_of(mini.design())] == ["nano", "micro"]
    assert mini.condition("relora-nano").options["d_model"] == 32
    full = load_study(ROOT / "configs/study/study.yaml")
    assert {(c.kind, c.scale) for c in full.conditions} == {
        ("decoder", "tiny"), ("relora", "tiny"), ("decoder", "small"), ("relora", "small")}
    assert full.conditions[0].config == ROOT / "configs/study/decoder-tiny.yaml"
    assert full.slurm["cluster"] == "slurm"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(color=1), "unknown key 'color' in the study file"),
    (lambda d: d["conditions"]["dec"].update(knd="x"), "unknown key 'knd' in conditions.dec"),
    (lambda d: d["conditions"]["rel"]["overrides"].update(reset_evry=3),
     "conditions.rel.overrides: unknown training option 'reset_evry'"),
    (lambda d: d.update(seeds=[0, 1, 0]), "seed 0 is listed twice"),
    (lambda d: d.update(seeds=[]), "seeds: expected a non-empty list"),
    (lambda d: d.update(seeds=["a"]), "'a' is not a non-negative integer"),
    (lambda d: d["conditions"]["dec"].update(kind="gpt"), "conditions.dec.kind: expected"),
    (lambda d: d["common"].update(seed=3), "'seed' is set by the study"),
    (lambda d: d["conditions"]["dec"].update(config="nope.yaml"), "conditions.dec.config"),
    (lambda d: d["common"].update(lr="fast"), "conditions.dec"),
    (lambda d: d.update(conditions={}), "at least one condition"),
    (lambda d: d["conditions"].update({"x-s3": {"kind": "decoder"}}), "seed suffix"),
    (lambda d: d.update(eval={"ppl": "default", "limt": 3}), "unknown key 'limt' in eval"),
    (lambda d: d.update(slurm={"cluster": "pbs"}), "slurm.cluster"),
])
def test_bad_study_files_name_the_file_and_key(tmp_path, change, message):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as err:
        load_study(path)
    assert str(path) in str(err.value)


def test_not_yaml_or_missing(tmp_path):
    with pytest.raises(InputError, match="not valid YAML"):
        load_study(write(tmp_path, "seeds: [0\n"))
    with pytest.raises(InputError, match="not found"):
        load_study(tmp_path / "missing.yaml")


def test_cli_exit_2_with_one_line(tmp_path):
    from dynlab_cli.main import app

    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["seeds"] = [1, 1]
    res = CliRunner().invoke(app, ["study", "run", str(write(tmp_path, data)), "-o",
                                   str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "seed 1 is listed twice" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()  # nothing written for a refused study
    res = CliRunner().invoke(app, ["study", "report", str(tmp_path)])
    assert res.exit_code == 2 and "no study.json" in res.output


def test_nproc_runs_are_the_train_command_line(tmp_path):
    """A unit with `nproc: N` trains as `dynlab train KIND ... --nproc`-style torchrun
    workers: the command line carries every option of the unit and the CLI parses it."""
    from dynlab.experiment.runner import train_argv
    from dynlab_cli.train import app as train_app

    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["common"].update({"nproc": 2, "hidden-dim": 32, "paper-compat": False,
                           "save-activations": True})
    unit = load_study(write(tmp_path, data)).units()[1]  # rel-s0
    argv = train_argv(unit, tmp_path / "r")
    assert argv[:3] == ["relora", f"--out={tmp_path / 'r'}", "--no-progress"]
    assert {"--steps=4", "--checkpoint-every=2", "--reset-every=2", "--seed=0",
            "--hidden-dim=32", "--no-paper-compat", "--save-activations"} <= set(argv)
    assert not any(a.startswith("--nproc") for a in argv)
    # the real command line parses it (checked without training: --dry-run)
    res = CliRunner().invoke(train_app, [*argv, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("relora (preset micro)") and "4 steps" in res.output


def test_nproc_is_in_every_executors_spec_and_divides_the_threads(tmp_path):
    """Every executor (this process, --jobs, Dask, submitit) runs `run_unit(spec)` on the
    specs of `unit_specs`: a unit's `nproc` is in its spec's options, and with T threads for
    the unit each of its N torchrun processes gets T / N (at least 1)."""
    import pickle

    from dynlab.experiment.runner import thread_share, unit_specs

    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["common"].update({"nproc": 2, "preset": "tiny", "global-batch-size": 4,
                           "seq-len": 16})
    study = load_study(write(tmp_path, data))
    for threads, want in ((None, None), (8, 4), (3, 1), (1, 1)):
        specs = pickle.loads(pickle.dumps(unit_specs(study, tmp_path / "out", threads)))
        assert [s["unit"].options["nproc"] for s in specs] == [2] * 4
        assert [s["threads"] for s in specs] == [want] * 4
        assert all(s["unit"].options.get("threads") == want for s in specs)
    one = yaml.safe_load(yaml.safe_dump(BASE))  # micro asks for 1 thread; no nproc
    unit = load_study(write(tmp_path, one, "one.yaml")).units()[0]
    assert thread_share(unit.options, unit.kind, None, 8) == 1
    assert thread_share({**unit.options, "threads": 6, "nproc": 3}, unit.kind, None, 8) == 2
