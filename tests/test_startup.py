"""A small analysis imports only what it needs: no Dask without --scheduler, no transformers
or huggingface_hub for dynlab runs, no plotly, xarray, scipy or pandas (figures and store
readers), no function-space dynamics without --dynamics — checked in a fresh interpreter, as
bench/startup_bench.py measures it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run

HEAVY = ("dask", "distributed", "transformers", "huggingface_hub", "plotly", "xarray",
         "scipy", "pandas",
         # function-space dynamics only with --dynamics (or an update ratio to write)
         "dynlab.analysis.dynamics", "dynlab.function_space")


@pytest.mark.slow
def test_analysis_of_a_dynlab_run_imports_no_optional_package(tmp_path):
    spec = ModelSpec(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=24,
                     vocab_size=40)
    run = make_run(tmp_path / "run", spec, [0, 5])
    code = (
        "import json, sys\n"
        "from dynlab_cli.main import app\n"
        "try:\n"
        f"    app(['analyze', {str(run)!r}, '-o', {str(tmp_path / 's.zarr')!r}, '--metrics', "
        "'per', '--device', 'cpu', '--no-progress'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "s.zarr" / "analyzed").is_dir()


@pytest.mark.slow
def test_the_program_builds_only_the_command_it_runs(tmp_path):
    """The `dynlab` program (`dynlab_cli.main.run`, what the console script and `python -m
    dynlab` call) given `analyze ...` imports the analyze command's module and not the other
    commands' (train, eval, plot, study ...), nor any optional package, nor rich when it
    prints nothing (`--no-progress`, no warning)."""
    spec = ModelSpec(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=24,
                     vocab_size=40)
    run = make_run(tmp_path / "run", spec, [0, 5])
    others = tuple(f"dynlab_cli.{m}" for m in ("train", "evaluate", "viz", "recompute",
                                               "export", "study")) + ("rich",)
    argv = ["dynlab", "analyze", str(run), "-o", str(tmp_path / "s.zarr"), "--metrics", "per",
            "--device", "cpu", "--no-progress"]
    code = (
        "import json, sys\n"
        f"sys.argv = {argv!r}\n"
        "from dynlab_cli.main import run\n"
        "try:\n"
        "    run()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        f"print(json.dumps([m for m in {others + HEAVY + ('dynlab_cli.analyze',)!r} "
        "if m in sys.modules]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == ["dynlab_cli.analyze"]
    assert (tmp_path / "s.zarr" / "analyzed").is_dir()
