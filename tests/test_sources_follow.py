"""`dynlab analyze RUN --follow` against a real `dynlab train` process writing the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dynlab
from dynlab.analysis.follow import follow

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--d-model", "16", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
         "--hidden-dim", "32", "--seq-len", "16", "--batch-size", "2", "--ld-batch-size", "3",
         "--vocab-size", "300", "--n-documents", "150", "--eval-every", "0", "--no-progress",
         "--steps", "20", "--checkpoint-every", "10", "--warmup-steps", "3", "--threads", "1"]


def env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def analyzed(store: Path) -> int:
    if not (store / "zarr.json").exists():
        return 0
    try:
        return int(dynlab.open_store(store).analyzed.sum())
    except Exception:  # being written
        return 0


@pytest.mark.slow
def test_follow_a_training_process(tmp_path):
    run, store = tmp_path / "run", tmp_path / "live.zarr"
    follower = subprocess.Popen(
        [PY, "-m", "dynlab_cli.main", "analyze", str(run), "--follow", "--poll", "0.1",
         "-o", str(store), "--metrics", "per,cn", "--device", "cpu", "--no-progress",
         "--threads", "1"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the follower waits for a run that does not exist yet
    assert follower.poll() is None
    trainer = subprocess.Popen([PY, "-m", "dynlab_cli.main", "train", "decoder", "--out",
                                str(run), *TRAIN], env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        out, err = follower.communicate(timeout=300)
        assert trainer.wait(timeout=300) == 0, trainer.stderr.read()
    finally:
        for p in (follower, trainer):
            if p.poll() is None:
                p.kill()
    assert follower.returncode == 0, err
    assert out.strip() == str(store)
    ds = dynlab.open_store(store)
    assert list(ds.step.values) == [0, 10, 20]  # stopped at run.json's last step
    assert int(ds.analyzed.sum()) == 3
    assert list(ds.kind.values) == ["weights", "grads", "updates"]
    # the same numbers as one analysis of the finished run
    again = dynlab.open_store(dynlab.analyze([run], tmp_path / "once.zarr", metrics="per,cn",
                                             device="cpu", progress=False))
    np.testing.assert_array_equal(ds.per.values, again.per.values)
    np.testing.assert_array_equal(ds.head_cn.values, again.head_cn.values)

    # Ctrl-C while waiting for a step that never comes: 130, the store keeps its work
    other = tmp_path / "wait.zarr"
    waiting = subprocess.Popen(
        [PY, "-m", "dynlab_cli.main", "analyze", str(run), "--follow", "--until", "1000",
         "--poll", "0.1", "-o", str(other), "--metrics", "per", "--device", "cpu",
         "--no-progress"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.time() + 120
        while analyzed(other) < 3:
            assert waiting.poll() is None, waiting.stderr.read()
            assert time.time() < deadline
            time.sleep(0.2)
        waiting.send_signal(signal.SIGINT)
        _, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err
    assert analyzed(other) == 3


def _held_back(root: Path, held: Path, steps) -> list[Path]:
    held.mkdir()
    for s in steps[1:]:
        (root / "checkpoints" / f"step_{s}").rename(held / f"step_{s}")
    return [held / f"step_{s}" for s in steps[1:]]


def test_follow_passes_as_checkpoints_complete(tmp_path):
    """In process, with the test as the trainer: each wait brings one more pico-train step.
    A live pico-train step counts once a later step exists (or it is the last), the first
    pass waits for two checkpoints, and following stops at training.max_steps."""
    from test_sources_pico import write_pico_run

    steps = (0, 5, 10, 15, 20)
    root = tmp_path / "pico-live"
    write_pico_run(root, steps=steps)
    pending = _held_back(root, tmp_path / "held", steps)
    passes = []

    def trainer_writes(_seconds):
        assert pending, "follow waited after the last step"
        d = pending.pop(0)
        d.rename(root / "checkpoints" / d.name)

    store = follow([root], tmp_path / "f.zarr", sleep=trainer_writes, metrics="per",
                   device="cpu", progress=False,
                   on_pass=lambda p: passes.append(analyzed(p)))
    assert passes == [2, 3, 5] and not pending
    ds = dynlab.open_store(store)
    assert list(ds.kind.values) == ["weights", "grads", "updates", "train_grads"]
    assert list(ds.step.values) == list(steps)

    # --until: stop once that step is analysed, though the run goes on
    root2 = tmp_path / "pico-until"
    write_pico_run(root2)
    pending2 = _held_back(root2, tmp_path / "held2", (0, 5, 10))

    def brings(_seconds):
        d = pending2.pop(0)
        d.rename(root2 / "checkpoints" / d.name)

    store2 = follow([root2], tmp_path / "g.zarr", until=5, sleep=brings, metrics="per",
                    device="cpu", progress=False)
    assert int(dynlab.open_store(store2).analyzed.sum()) == 2
    assert [p.name for p in pending2] == ["step_10"]


def test_live_pico_step_needs_whole_files(tmp_path):
    """While following, a step whose learning-dynamics file is still being written is not
    listed; a normal analysis lists it (and reads what is there)."""
    from test_sources_pico import write_pico_run

    from dynlab.sources import open_sources
    from dynlab.sources.base import FOLLOWING

    root = tmp_path / "run"
    write_pico_run(root)
    f = root / "checkpoints" / "step_5" / "learning_dynamics" / "val_gradients.pt"
    f.write_bytes(f.read_bytes()[:100])
    token = FOLLOWING.set({"until": None})
    try:
        (run,) = open_sources([root])
    finally:
        FOLLOWING.reset(token)
    assert [c.step for c in run.checkpoints] == [0, 10]
    (run,) = open_sources([root])
    assert [c.step for c in run.checkpoints] == [0, 5, 10]


def test_follow_runs_the_same_analysis_options(tmp_path):
    """`--follow` hands every option of the analysis to each pass: a finished pico-train run
    followed with `--convention pico` and a step selection gives the store of one
    `dynlab.analyze` with the same options (the pico OV matrices, the selected steps)."""
    from test_sources_pico import write_pico_run

    root = tmp_path / "pico"
    write_pico_run(root, steps=(0, 5, 10))
    store = tmp_path / "f.zarr"
    p = subprocess.run(
        [PY, "-m", "dynlab_cli.main", "analyze", str(root), "--follow", "--poll", "0.1",
         "-o", str(store), "--metrics", "per,cn", "--convention", "pico", "--steps", "5,10",
         "--no-activations", "--device", "cpu", "--no-progress", "--threads", "1"],
        env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    followed = dynlab.open_store(store)
    once = dynlab.open_store(dynlab.analyze(
        [root], tmp_path / "once.zarr", metrics="per,cn", convention="pico", steps="5,10",
        activations=False, device="cpu", progress=False))
    assert followed.attrs["convention"] == once.attrs["convention"] == "pico"
    assert list(followed.step.values) == list(once.step.values)
    assert int(followed.analyzed.sum()) == int(once.analyzed.sum()) > 0
    for name in ("per", "cn", "head_per", "head_cn"):
        np.testing.assert_array_equal(followed[name].values, once[name].values, err_msg=name)
    assert np.isfinite(followed.head_cn.values).any()
