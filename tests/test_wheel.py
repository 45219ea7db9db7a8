"""The wheel works on its own: `python -m build` makes a wheel and an sdist from a copy of the
sources; the wheel, installed (not editable) with the pinned torch into a fresh virtual
environment, runs `dynlab --help`, `dynlab --version`, `python -m dynlab` and a tiny
train -> analyze -> report in a directory outside the source tree, with nothing of the
checkout on sys.path; the notebook is inside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the Makefile's pin
SOURCES = ("dynlab", "cli", "pyproject.toml", "README.md", "CHANGELOG.md")

pytestmark = pytest.mark.slow  # builds, makes a virtual environment, installs, trains


def clean_env() -> dict:
    """The environment without anything that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    return dict(env, OMP_NUM_THREADS="1", NO_COLOR="1")


def run(args, cwd, timeout=600):
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"{args}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_the_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    pytest.importorskip("build")
    from dynlab.version import __version__

    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "-o", dist, "."], cwd=src)
    wheel = dist / f"dynlab-{__version__}-py3-none-any.whl"
    sdist = dist / f"dynlab-{__version__}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    names = zipfile.ZipFile(wheel).namelist()
    assert "dynlab/notebooks/explore.ipynb" in names and "dynlab_cli/main.py" in names
    assert "dynlab/data/grammar.py" in names and "dynlab/viz/report.py" in names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py, dynlab = venv / "bin" / "python", venv / "bin" / "dynlab"
    run([py, "-m", "pip", "install", "-q", TORCH, wheel], cwd=tmp_path, timeout=900)

    work = tmp_path / "elsewhere"  # outside the source tree
    work.mkdir()
    where = run([py, "-c", "import dynlab, dynlab_cli, sys; print(dynlab.__file__); "
                 "print(dynlab_cli.__file__); print(dynlab.notebook()); print(sys.path)"],
                cwd=work).splitlines()
    site = str(venv / "lib")
    assert where[0].startswith(site) and where[1].startswith(site), where  # not the checkout
    assert Path(where[2]).is_file() and where[2].startswith(site)
    assert str(ROOT) not in where[3]
    assert "Usage: dynlab" in run([dynlab, "--help"], cwd=work)
    assert run([dynlab, "--version"], cwd=work).strip() == __version__
    assert "Usage: dynlab" in run([py, "-m", "dynlab", "--help"], cwd=work)

    run([dynlab, "train", "decoder", "--out", "run", "--steps", "4", "--checkpoint-every", "2",
         "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
         "--hidden-dim", "32", "--seq-len", "16", "--batch-size", "2", "--ld-batch-size", "2",
         "--vocab-size", "300", "--n-documents", "100", "--eval-every", "0", "--no-progress"],
        cwd=work)
    run([dynlab, "analyze", "run", "-o", "s.zarr", "--metrics", "per,cn", "--no-progress"],
        cwd=work)
    run([dynlab, "report", "s.zarr", "-o", "report.html"], cwd=work)
    assert "plotly" in (work / "report.html").read_text()
    out = run([py, "-c", "import dynlab; ds = dynlab.open_store('s.zarr'); "
               "print(ds.attrs['dynlab_version'], ds.step.values.tolist(), "
               "int(ds.analyzed.sum()))"], cwd=work)
    assert out.split() == [__version__, "[0,", "2,", "4]", "3"]
