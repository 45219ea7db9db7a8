"""bench/pythia_bench.py at its --quick size: a GPT-NeoX step-run written by transformers'
save_pretrained, analysed, timed against its floor and measured, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "pythia_bench.py"


@pytest.mark.soak
@pytest.mark.slow
def test_quick_size(tmp_path):
    out = tmp_path / "figures.json"
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--workdir", str(tmp_path),
                        "--json", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    row = json.loads(out.read_text())["quick"]
    assert row["checkpoints"] == 3
    # GPT-NeoX has no MLP gate (swiglu.w_0: NaN) and step 0 has no update: of the 2 kinds x
    # 3 steps x 8 matrices, (3 + 2) steps x 7 matrices hold a PER
    assert row["per_finite_fraction"] == pytest.approx(5 / 6 * 7 / 8)
    assert row["analysis_s"] > 0 and row["floor_s"] > 0
    assert row["peak_bytes"] > row["file_bytes"] > 0
    assert "analysis/floor" in p.stdout and "quick" in p.stdout
    files = sorted(p.name for p in (tmp_path / "pythia-quick" / "step1000").iterdir())
    assert "config.json" in files and "model.safetensors" in files
