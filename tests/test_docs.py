"""The documentation site: `mkdocs build --strict` passes (broken links, missing anchors and
unresolved API references fail it), the CLI reference is typer's own help, and every fenced
block marked runnable is executed as written, so the docs cannot rot.

A runnable block is a ```bash fence right after a line `<!-- runnable -->` (invisible on the
site). The blocks of all pages run in one scratch directory, page by page in the order of the
site's navigation (then any page outside it), each block with `bash -euo pipefail`, so a later
page may use what an earlier one made (the first run of Getting started)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^<!-- runnable -->\n```bash\n(.*?)^```$", re.M | re.S)


def nav_pages(nav) -> list[str]:
    """The page files of mkdocs.yml's nav, in order."""
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += nav_pages(value) if isinstance(value, list) else [value]
    return out


def pages_in_order() -> list[Path]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = [DOCS / p for p in nav_pages(config["nav"])]
    rest = sorted(set(DOCS.rglob("*.md")) - set(listed))
    return [p for p in listed + rest if p.exists()]


def runnable_blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


def env() -> dict:
    """This interpreter's environment: its scripts first on PATH (`dynlab`, `python`)."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
                OMP_NUM_THREADS="1", NO_COLOR="1")


def test_every_marker_opens_a_bash_block():
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        markers = re.findall(rf"^{re.escape(MARKER)}$", text, re.M)
        assert len(markers) == len(runnable_blocks(page)), (
            f"{page}: a '{MARKER}' line must be followed by a ```bash fence")


def test_there_are_runnable_blocks_and_the_nav_names_real_pages():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    missing = [p for p in nav_pages(config["nav"]) if not (DOCS / p).exists()]
    assert missing == []
    assert sum(len(runnable_blocks(p)) for p in pages_in_order()) >= 4


def test_the_readme_links_to_files_that_exist():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local and all((ROOT / link).exists() for link in local), local


@pytest.mark.soak
@pytest.mark.slow
def test_runnable_blocks_run_as_written(tmp_path):
    ran = []
    for page in pages_in_order():
        for block in runnable_blocks(page):
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path,
                                 env=env(), capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, (f"{page.relative_to(ROOT)}:\n{block}\n"
                                         f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
            ran.append(page.name)
    assert "getting-started.md" in ran
    # what the first run promised is there
    assert (tmp_path / "runs/tiny/checkpoints/step_20/meta.json").is_file()
    assert "plotly" in (tmp_path / "tiny.html").read_text()
    assert list((tmp_path / "tb/tiny").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                         cwd=ROOT, env=dict(env(), NO_MKDOCS_2_WARNING="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    cli = (site / "reference" / "cli" / "index.html").read_text()
    # the reference is the CLI's own help: every command, with options only typer knows
    from typer.testing import CliRunner

    from dynlab_cli.main import app

    help_text = CliRunner().invoke(app, ["analyze", "--help"], env={"COLUMNS": "100"}).output
    assert "--activation-positions" in help_text and "--activation-positions" in cli
    for command in ("dynlab analyze", "dynlab train decoder", "dynlab train relora",
                    "dynlab export", "dynlab eval", "dynlab report", "dynlab recompute"):
        assert command in cli, command
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "proportional_effective_rank" in api and "learning_dynamics" in api
