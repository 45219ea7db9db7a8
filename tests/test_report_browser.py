"""report.html opened in a real headless Chromium with every non-file request blocked: no
console errors, no page errors, no network, and every figure rendered.

Skips (with the reason) only when Chromium or the playwright package cannot be found or
launched. Set DYNLAB_REPORT_SCREENSHOT=path.png to keep the screenshot."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import viz_fixtures as fx  # noqa: E402

from dynlab.viz import figures as F  # noqa: E402
from dynlab.viz import report as R  # noqa: E402

pytestmark = pytest.mark.slow  # starts Chromium

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def _chromium() -> str:
    exe = os.environ.get("DYNLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        pytest.skip("Chromium not found (apt-get install chromium, or set DYNLAB_CHROMIUM)")
    return exe


def test_report_renders_offline_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    exe = _chromium()
    store = fx.write_store(tmp_path / "fixture.zarr")
    out, _, sections = R.write_report([store], tmp_path / "report.html")
    n_fig = R.n_figures(sections)
    assert n_fig == 7

    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001 - any launch failure means "no usable browser"
            pytest.skip(f"Chromium at {exe} could not be launched: {e}")
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            blocked: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def route(r):
                if r.request.url.startswith("file://"):
                    r.continue_()
                else:
                    blocked.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.goto(out.resolve().as_uri(), wait_until="load")
            page.wait_for_function(
                f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_fig}",
                timeout=30_000)
            n_plots = page.locator(".js-plotly-plot").count()
            n_containers = page.locator(".plot-container").count()
            # every figure has its traces drawn: one <g class="trace"> (or "hm", heatmaps) each
            drawn = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')]
                .map(el => [el.data.length, el.querySelectorAll('g.trace, g.hm').length,
                            el.getBoundingClientRect().height])""")
            png = tmp_path / "report.png"
            page.screenshot(path=str(png), full_page=True)
        finally:
            browser.close()

    assert errors == []
    assert blocked == []
    assert n_plots == n_fig and n_containers == n_fig
    expected = [len(s.figure.data) for s in sections if s.figure is not None]
    assert [d[0] for d in drawn] == expected
    assert all(d[1] > 0 and d[2] > 100 for d in drawn), drawn
    assert png.stat().st_size > 50_000
    keep = os.environ.get("DYNLAB_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(png, keep)


def test_png_export_without_kaleido_uses_chromium(tmp_path):
    """`dynlab plot -o fig.png`: plotly's static export needs kaleido (not installed), so the
    figure is rendered by headless Chromium at the requested size."""
    _chromium()  # skips when there is none
    ds = fx.make_dataset()
    png = R.save_figure(F.trajectory(ds, "cn", "weights", "swiglu.w_2"), tmp_path / "fig.png",
                        width=900, height=500)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (900, 500)
    assert len(data) > 20_000  # drawn, not blank
