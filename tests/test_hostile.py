"""Hostile but fair use, done for real: two trainers on one run directory, a full disk (a
real tmpfs in a private mount namespace), run names and index files that point outside their
folder (with a marker file outside that must stay unread and unwritten), control characters
and rich markup in file content, duplicate step folders, unknown targets, malformed metadata
of every source, and a huge `--revisions` range under a memory ceiling."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train_safety import (  # noqa: F401  (fixtures used by name)
    DECODER,
    assert_same_run,
    cache,
    cli_args,
    dynlab_cmd,
    reference,
    run_dynlab,
    wait_for,
)

from dynlab.runs.layout import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ 1. two trainers, one run


@pytest.mark.slow
def test_second_trainer_on_a_run_directory_is_refused_and_a_stale_lock_is_taken_over(
        reference, tmp_path):
    """Trainer A pauses after update 3 (step_0 and step_2 written); trainer B on the same
    --out (with --resume, as from a second terminal, and as the very same command) is refused
    with exit 1 naming A's pid and command, and changes nothing. A is then killed (SIGKILL):
    its lock is stale, the next --resume takes it over, says so, and ends equal to an
    uninterrupted run."""
    out, mark = tmp_path / "run", tmp_path / "paused"
    args = cli_args("decoder", out, DECODER)
    a = dynlab_cmd(args, fault="train.step:pause@3", mark=mark)
    try:
        wait_for(mark, a)
        before = tree_bytes(out)
        assert [s for s, _ in complete_checkpoints(out)] == [0, 2]
        for second in (args + ["--resume"], args):
            res = run_dynlab(second)
            assert res.returncode == 1, res.stderr
            assert "Traceback" not in res.stderr
            assert "another dynlab train is writing this run directory" in res.stderr
            assert f"pid {a.pid} on " in res.stderr and "dynlab train decoder" in res.stderr
            assert tree_bytes(out) == before  # nothing read-modified, nothing removed
    finally:
        a.send_signal(signal.SIGKILL)
        a.communicate(timeout=60)
    assert (tmp_path / "run.lock").exists()  # left by the killed trainer: stale
    res = run_dynlab(args + ["--resume"])
    assert res.returncode == 0, res.stderr
    assert "took over the lock" in res.stderr and f"pid {a.pid}" in res.stderr
    assert not (tmp_path / "run.lock").exists()
    assert_same_run(reference["decoder"], out)
