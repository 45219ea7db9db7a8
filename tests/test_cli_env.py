"""What importing the command line does to the process environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # spawns Python processes

CODE = ("import dynlab_cli, os; "
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")


def run(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_cli_sets_a_short_openmp_spin_unless_the_user_chose_a_policy():
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert run(env) == "1000 None"
    assert run(dict(env, GOMP_SPINCOUNT="5")) == "5 None"
    assert run(dict(env, OMP_WAIT_POLICY="ACTIVE")) == "None ACTIVE"
