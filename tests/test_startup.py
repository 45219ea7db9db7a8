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
