"""The wheel works on its own: `python -m build` makes a wheel and an sdist from a copy of the
sources; the wheel, installed (not editable) into a fresh virtual environment with the pinned
torch, runs `dynlab --help`, `dynlab --version`, `python -m dynlab` and a tiny
train -> analyze -> report in a directory outside the source tree, with nothing of the
checkout on sys.path; the notebook is inside it.

Installing torch and dynlab's ~40 dependencies into a new environment takes minutes (16 min
measured on a heavily loaded 2-core machine), so by default the fresh environment gets only
the wheel, installed by pip with `--no-deps`, and sees the dependencies, torch 2.13.0 among
them, through a .pth line naming this interpreter's site-packages (after its own, so the
wheel's dynlab is the one imported; a path line does not run that directory's own .pth files,
so the development checkout's editable install stays out); every requirement the wheel
declares is then checked against what that environment imports. DYNLAB_WHEEL_TEST_FULL=1
makes pip resolve and install everything into the fresh environment instead."""

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

pytestmark = [pytest.mark.slow, pytest.mark.soak]  # builds, makes a venv, installs, trains

CHECK_REQUIREMENTS = """
from importlib.metadata import distribution, version, PackageNotFoundError
from packaging.requirements import Requirement
unmet = []
for text in distribution("dynlab").requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            unmet.append(f"{req}: {version(req.name)}")
    except PackageNotFoundError:
        unmet.append(f"{req}: missing")
print(unmet)
"""


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
    py, dynlab = venv / "bin" / "python", venv / "bin" / "dynlab"
    if os.environ.get("DYNLAB_WHEEL_TEST_FULL"):
        run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
        run([py, "-m", "pip", "install", "-q", TORCH, wheel], cwd=tmp_path, timeout=3600)
    else:
        import torch

        assert torch.__version__.split("+")[0] == TORCH.split("==")[1]
        run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
        run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps",
             wheel], cwd=tmp_path)
        (site_dir,) = (venv / "lib").glob("python3*/site-packages")
        (site_dir / "zz_dependencies.pth").write_text(str(Path(torch.__file__).parents[1]))
    # every requirement the wheel declares (extras aside) is met where it runs
    unmet = run([py, "-c", CHECK_REQUIREMENTS], cwd=tmp_path).strip()
    assert unmet == "[]", unmet

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
