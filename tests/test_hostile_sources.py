"""Hostile but fair input to the checkpoint sources, done for real on files written by
transformers, pico-train's layout and huggingface_hub's cache layout: shard indexes that point
outside their model folder (a marker file there must stay unread), control characters in file
content (never reach the terminal), duplicate step folders, malformed metadata (a message, not
a traceback), `dynlab recompute` on Hugging Face and pico-train stores, and a huge
`--revisions` range under a memory ceiling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import hf_fixtures as fx  # noqa: E402
import yaml  # noqa: E402
from test_sources_pico import write_pico_run  # noqa: E402

import dynlab  # noqa: E402
from dynlab.analysis.recompute import recompute  # noqa: E402
from dynlab.errors import printable, quoted  # noqa: E402
from dynlab.runs.checkpoints import CheckpointError  # noqa: E402
from dynlab.sources import open_sources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OLD = 946_684_800  # 2000-01-01: an access time any read moves (relatime)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama run in sharded safetensors (steps 0 and 2), as save_pretrained writes it."""
    root = tmp_path_factory.mktemp("hf") / "run"
    fx.train_and_save("llama", root, (0, 2), "step{}", max_shard_size="8KB")
    return root


@pytest.fixture
def model(llama, tmp_path):
    """box/model: a copy of the run's step 2; box/elsewhere/private.safetensors: a real
    safetensors file outside it, its access time set to 2000."""
    box = tmp_path / "box"
    shutil.copytree(llama / "step2", box / "model")
    index = json.loads((box / "model/model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (box / "elsewhere").mkdir()
    private = box / "elsewhere/private.safetensors"
    shutil.copy(box / "model" / shard, private)
    os.utime(private, (OLD, OLD))
    return box / "model"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process started by a test: this tree first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)
    env.pop("DYNLAB_FAULT", None)
    return env


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynlab_cli.main", *map(str, args)],
                          env=child_env(), capture_output=True, text=True, timeout=300,
                          check=False)


def edit_index(model: Path, change) -> None:
    path = model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


def reads_move_atime(tmp_path: Path) -> bool:
    """Whether this file system records reads in the access time (relatime does for a file
    last read in 2000; noatime does not, and the check below is then vacuous)."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    os.utime(probe, (OLD, OLD))
    probe.read_bytes()
    return probe.stat().st_atime > OLD


# ------------------------------------------------------------------ 5. shards outside


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_shard_outside_the_model_folder_is_refused_and_never_read(model, tmp_path, how):
    """weight_map naming `../elsewhere/private.safetensors`, its absolute path, or a link
    inside the folder that resolves there: a clear refusal naming the index and the shard;
    the private file's access time shows it was never read."""
    private = model.parent / "elsewhere/private.safetensors"
    target = {"relative": "../elsewhere/private.safetensors", "absolute": str(private),
              "symlink": "link.safetensors"}[how]
    if how == "symlink":
        (model / "link.safetensors").symlink_to("../elsewhere/private.safetensors")
    edit_index(model, lambda wm: wm.update({next(iter(wm)): target}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: shard "
                       rf"'{target}' lies outside the model folder .*refused"):
        open_sources([model])
    with pytest.raises(CheckpointError, match="lies outside the model folder"):
        open_sources([model.parent])  # as a one-checkpoint run found in a folder
    assert private.stat().st_atime == OLD or not reads_move_atime(tmp_path)
    assert private.stat().st_mtime == OLD


@pytest.mark.slow
def test_cli_refuses_an_outside_shard_with_exit_2(model, tmp_path):
    edit_index(model, lambda wm: wm.update({next(iter(wm)): "../elsewhere/private.safetensors"}))
    res = cli("analyze", model, "-o", tmp_path / "a.zarr")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "lies outside the model folder" in res.stderr
    assert not (tmp_path / "a.zarr").exists()
    assert (model.parent / "elsewhere/private.safetensors").stat().st_atime == OLD or \
        not reads_move_atime(tmp_path)


# ------------------------------------------------------------------ 6. control characters

EVIL = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202e"


def test_printable_escapes_what_a_terminal_acts_on():
    assert printable(EVIL) == "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202e"
    assert printable("tab\tand\nnewline stay; é and 中 too") == \
        "tab\tand\nnewline stay; é and 中 too"
    assert quoted("\x1b[2J") == "'\\x1b[2J'" and quoted(5) == "5"
    assert len(quoted("x" * 1000)) == 200


@pytest.mark.slow
@pytest.mark.parametrize("where", ["shard", "model_type"])
def test_control_characters_in_files_never_reach_the_terminal(model, tmp_path, where):
    """An ESC sequence (window title, clear screen) in a shard name or config.json's
    model_type: the error (exit 2) shows it escaped; stderr holds no ESC, BEL or CSI byte."""
    if where == "shard":
        edit_index(model, lambda wm: wm.update({next(iter(wm)): EVIL + ".safetensors"}))
    else:
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(cfg | {"model_type": EVIL}))
    res = cli("analyze", model, "-o", tmp_path / "a.zarr")
    assert res.returncode == 2, res.stderr
    assert "\\x1b]0;owned\\x07\\x1b[2J" in res.stderr
    assert not any(c in res.stderr + res.stdout for c in "\x1b\x07\x9b\u202e")


def test_a_key_with_control_characters_is_quoted_escaped(model):
    edit_index(model, lambda wm: wm.update({"\x1b[31mevil": 7}))
    with pytest.raises(CheckpointError) as err:
        open_sources([model])
    assert "weight_map['\\x1b[31mevil'] is 7; expected the file name of a shard" in str(err.value)
    assert "\x1b" not in str(err.value)


# ------------------------------------------------------------------ 7. duplicate steps


def test_two_hf_folders_claiming_one_step_are_an_error(llama, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama, run)
    shutil.copytree(llama / "step0", run / "checkpoint-2")  # other weights, step 2 again
    with pytest.raises(CheckpointError, match=rf"{run / 'checkpoint-2'} and {run / 'step2'} "
                       "both claim step 2"):
        open_sources([run])


def test_two_pico_folders_claiming_one_step_are_an_error(tmp_path):
    write_pico_run(tmp_path / "p")
    ckpts = tmp_path / "p" / "checkpoints"
    shutil.copytree(ckpts / "step_0", ckpts / "step_05")
    with pytest.raises(CheckpointError, match=rf"{ckpts / 'step_05'} and {ckpts / 'step_5'} "
                       "both claim step 5"):
        open_sources([tmp_path / "p"])


# ------------------------------------------------------------------ 9. recompute


@pytest.mark.parametrize("source", ["hf", "pico"])
def test_recompute_on_hf_and_pico_stores_equals_a_fresh_analysis(llama, tmp_path, source):
    """A store analysed with per,er; `recompute` adds stable_rank and nuclear_norm from its
    stored spectra and its own record of the model: equal to an analysis that computed them
    from the checkpoints."""
    if source == "hf":
        run = llama
    else:
        run = tmp_path / "pico"
        write_pico_run(run)
    kw = dict(device="cpu", progress=False)
    first = dynlab.analyze([run], tmp_path / "a.zarr", metrics="per,er", **kw)
    recompute(first, "stable_rank,nuclear_norm")
    fresh = dynlab.analyze([run], tmp_path / "b.zarr",
                           metrics="per,er,stable_rank,nuclear_norm", **kw)
    a, b = dynlab.open_store(first), dynlab.open_store(fresh)
    for name in ("stable_rank", "nuclear_norm", "head_stable_rank", "emb_nuclear_norm"):
        x, y = a[name].values, b[name].values
        assert np.isfinite(y).sum() > 0
        np.testing.assert_allclose(x, y, rtol=1e-12, equal_nan=True)


# ------------------------------------------------------------------ 10. malformed metadata


@pytest.mark.parametrize("case,message", [
    ("weight_map numbers", "expected the file name of a shard"),
    ("model_type list", "model_type ['llama'] is not supported"),
])
def test_malformed_hf_metadata_is_a_message(model, case, message):
    if case == "weight_map numbers":
        edit_index(model, lambda wm: wm.update({k: i for i, k in enumerate(wm)}))
    else:
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(cfg | {"model_type": ["llama"]}))
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_sources([model])


@pytest.mark.parametrize("state", [[1, 2], {"log_history": 5}, {"log_history": [
    {"step": 2, "loss": "nan?"}]}])
def test_malformed_trainer_state_is_left_out_with_a_warning(llama, tmp_path, state):
    from dynlab.sources.hf import trainer_meta

    shutil.copytree(llama / "step2", tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2/trainer_state.json").write_text(json.dumps(state))
    if isinstance(state, dict) and isinstance(state["log_history"], list):
        assert trainer_meta(tmp_path / "checkpoint-2", 2) == {"step": 2}  # a loss not a number
        return
    with pytest.warns(UserWarning, match=r"trainer_state.json: expected a JSON object whose "
                      "'log_history' is a list; its losses are left out"):
        assert trainer_meta(tmp_path / "checkpoint-2", 2) == {"step": 2}


@pytest.mark.parametrize("training,message", [
    (5, "'training' is 5; expected a mapping"),
    ({"max_steps": "many"}, "'training.max_steps' is 'many'; expected a whole number"),
    ({"fabric": [1]}, "'training.fabric' is [1]; expected a mapping"),
])
def test_malformed_pico_training_config_is_a_message(tmp_path, training, message):
    write_pico_run(tmp_path / "p")
    path = tmp_path / "p/training_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(cfg | {"training": training}))
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_sources([tmp_path / "p"])


# ------------------------------------------------------------------ 11. a huge range

CEILING = 2 * 1024**3  # address space: dynlab and torch use ~0.7 GB; 10^9 names need ~60


@pytest.mark.slow
def test_a_huge_revisions_range_under_a_memory_ceiling(tmp_path):
    """`--revisions step0:step1000000000:1` against a cache holding step0, step2, step4, in
    a process limited to 2 GiB of address space: it selects the three that exist at once;
    a range that names none (`step5:step1000000000:1`) is a SourceError at once."""
    pytest.importorskip("huggingface_hub")
    from test_sources_hub import REPO, lay_out_cache

    fx.train_and_save("gpt_neox", tmp_path / "dirs", (0, 2, 4), "step{}")
    cache = tmp_path / "cache"
    lay_out_cache(cache, REPO, {f"step{s}": tmp_path / "dirs" / f"step{s}" for s in (0, 2, 4)})
    code = f"""
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({CEILING}, {CEILING}))
from dynlab.sources import open_sources, SourceError
t = time.perf_counter()
(run,) = open_sources(["hf://{REPO}"], revisions="step0:step1000000000:1", cache_dir="{cache}")
print([c.step for c in run.checkpoints])
try:
    open_sources(["hf://{REPO}"], revisions="step5:step1000000000:1", cache_dir="{cache}")
except SourceError as e:
    print(e)
print(time.perf_counter() - t)
"""
    env = child_env(HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    steps, refusal, seconds = res.stdout.strip().splitlines()[-3:]
    assert steps == "[0, 2, 4]"
    assert "--revisions 'step5:step1000000000:1': no revision in this range exists in the " \
           "local cache" in refusal and "step0, step2, step4" in refusal
    assert float(seconds) < 60 and time.perf_counter() - start < 240


def test_revision_ranges_are_matched_not_listed():
    from dynlab.sources.hub import select_revisions, select_steps

    known = ["step0", "step2", "step4", "main", "step_6", "global_step8"]
    assert select_revisions("step0:step1000000000000:2", known, "here") == [
        "step0", "step2", "step4"]
    assert select_revisions("step1:step3:1,step0", known, "here") == ["step2", "step0"]
    assert select_revisions("global_step0:global_step10:4", known, "x") == ["global_step8"]
    with pytest.raises(CheckpointError, match="no revision in this range exists here"):
        select_revisions("step5:step1000000000:1", known, "here")
    with pytest.raises(CheckpointError, match=r"revision\(s\) step3 do not exist here"):
        select_revisions("step0,step3", known, "here")
    assert select_steps("0:10**9".replace("10**9", "1000000000") + ":2", [0, 2, 3, 4], "w") \
        == [0, 2, 4]


def test_sharded_snapshot_in_a_hub_cache_reads_its_blobs_but_nothing_else(llama, tmp_path):
    """A sharded model laid out as huggingface_hub's cache (snapshot files are links into the
    repository's blobs/) opens and reads its shards; a snapshot link to a file outside blobs/
    is refused, and that file is never read."""
    pytest.importorskip("huggingface_hub")
    from test_sources_hub import lay_out_cache

    cache = tmp_path / "cache"
    lay_out_cache(cache, "org/sharded", {"step2": llama / "step2"})
    (snap,) = (cache / "models--org--sharded/snapshots").iterdir()
    (run,) = open_sources([snap])
    direct = dynlab.open_store(dynlab.analyze([llama / "step2"], tmp_path / "a.zarr",
                                              metrics="per", device="cpu", progress=False))
    cached = dynlab.open_store(dynlab.analyze([snap], tmp_path / "b.zarr", metrics="per",
                                              device="cpu", progress=False))
    np.testing.assert_array_equal(cached.per.values, direct.per.values)
    private = tmp_path / "private.safetensors"
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(snap / shard, private)
    os.utime(private, (OLD, OLD))
    (snap / shard).unlink()
    (snap / shard).symlink_to(private)
    with pytest.raises(CheckpointError, match=f"shard '{shard}' lies outside the model folder"):
        open_sources([snap])
    assert private.stat().st_atime == OLD or not reads_move_atime(tmp_path)
