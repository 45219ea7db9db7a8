"""bench/gpu.sh's CPU dry path: the GPU benchmark script runs end to end without edits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    results = tmp_path / "figures.txt"
    env = dict(os.environ, GPU_RESULTS=str(results), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--workdir",
                           str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert text == proc.stdout.split(f"figures written to {results}")[0]
    # the CPU store compared with itself through two processes: bitwise equal
    m = re.search(r"cpu float64 vs cpu float64: (\S+)", text)
    assert m and float(m.group(1)) == 0.0
    # float32 spectra differ from float64 ones, but not wildly (tiny random matrices)
    m = re.search(r"cpu float32 vs cpu float64: (\S+)", text)
    assert m and 0.0 < float(m.group(1)) < 0.1
    assert re.search(r"ratio dynlab/plain \d+\.\d+", text)
    if (ROOT.parent / "shared" / "data" / "blimp").is_dir():
        assert "per-UID accuracies identical: True" in text
    else:
        assert "[eval] skipped" in text

