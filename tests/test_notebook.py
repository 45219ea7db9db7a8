"""notebooks/explore.ipynb executes top to bottom (nbclient, the venv's python3 kernel) against
the synthetic store, and computes what it says it computes."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import viz_fixtures as fx  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore.ipynb"

pytestmark = pytest.mark.slow  # starts a notebook kernel

# Appended by the test only: reports the notebook's own variables as one JSON line.
PROBE = """
import json as _json
print("PROBE" + _json.dumps({
    "layer_mean": np.where(np.isfinite(layer_mean.values), layer_mean.values, -1).tolist(),
    "runs": runs, "base": base, "max_abs_diff": max_abs_diff,
    "head_final": {r: [s, v.tolist()] for r, (s, v) in head_final.items()},
    "diff_relora_weights": diff.sel(run="relora", kind="weights").values.tolist(),
    "differ_per_updates": runs_differ["per_updates"].values.tolist(),
    "most": {r: int(most.sel(run=r)) for r in runs},
    "by_block": {b: by_block.sel(block=b).values.tolist() for b in ("attention", "swiglu")},
    "reset": reset, "resets": resets, "before": before.values.tolist(),
    "after": after.values.tolist(),
    "per_cycle": {str(int(k)): float(v) for k, v in zip(per_cycle["cycle"].values,
                                                          per_cycle.values)},
}))
"""


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_notebook_executes_against_a_store(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    store = fx.write_store(tmp_path / "fixture.zarr")
    monkeypatch.setenv("DYNLAB_STORE", str(store))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    probe = json.loads(text.split("PROBE", 1)[1])

    ds = fx.make_dataset()
    assert probe["runs"] == ["decoder", "relora"] and probe["base"] == "decoder"
    # mean over layers of PER(weights, ov_circuit); the NaN point leaves layer 0 alone
    per = ds["per"].sel(kind="weights", matrix="ov_circuit").values  # run, step, layer
    ref = [[float(np.mean([v for v in per[r, s] if np.isfinite(v)])) for s in range(6)]
           for r in range(2)]
    np.testing.assert_allclose(probe["layer_mean"], ref, rtol=1e-12)
    # stable rank recomputed from sigma equals the stored one
    assert probe["max_abs_diff"] < 1e-12
    # per-head OV at the last step with data
    for run in fx.RUNS:
        step, values = probe["head_final"][run]
        assert step == fx.STEPS[-1]
        np.testing.assert_allclose(values, ds["head_per"].sel(run=run, kind="weights",
                                                              step=step).values, rtol=1e-12)
    # relora minus decoder, mean PER of weights over layers and matrices, at every step
    mean = np.nanmean(ds["per"].sel(kind="weights").values, axis=(2, 3))  # run, step
    np.testing.assert_allclose(probe["diff_relora_weights"], mean[1] - mean[0], rtol=1e-12)
    # 1. how the runs differ: mean PER of updates over layers and matrices at the last step
    upd = ds["per"].sel(kind="updates").values  # run, step, layer, matrix
    np.testing.assert_allclose(probe["differ_per_updates"],
                               np.nanmean(upd[:, -1], axis=(1, 2)), rtol=1e-12)
    # 2. which layer changes most: sum over steps of |PER(t) - PER(t-1)| of the seven
    # matrices, mean over matrices, argmax over layers; and the attention / MLP means
    w = ds["per"].sel(kind="weights").values[:, :, :, :7]  # run, step, layer, 7 matrices
    moved = np.nansum(np.abs(np.diff(w, axis=1)), axis=1)  # run, layer, matrix
    assert probe["most"] == {r: int(np.argmax(moved[i].mean(axis=1)))
                             for i, r in enumerate(fx.RUNS)}
    np.testing.assert_allclose(probe["by_block"]["attention"], moved[:, :, :4].mean(axis=2),
                               rtol=1e-12)
    np.testing.assert_allclose(probe["by_block"]["swiglu"], moved[:, :, 4:].mean(axis=2),
                               rtol=1e-12)
    # 3. a ReLoRA reset: the fixture's relora run resets after steps 40 and 80 (its cycle
    # rises between checkpoints 40 and 60, 80 and 100); PER of updates around them
    assert probe["reset"] == "relora" and probe["resets"] == [40, 80]
    steps = list(fx.STEPS)
    with warnings.catch_warnings():  # step 0 has no update: an all-NaN slice, NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_upd = np.nanmean(upd[1], axis=(1, 2))  # relora, per step
    assert probe["before"] == [mean_upd[steps.index(40)], mean_upd[steps.index(80)]]
    assert probe["after"] == [mean_upd[steps.index(60)], mean_upd[steps.index(100)]]
    cyc = ds["relora_cycle"].sel(run="relora").values
    for c in (0, 1, 2):
        sel = mean_upd[(cyc == c) & np.isfinite(mean_upd)]
        assert probe["per_cycle"][str(c)] == pytest.approx(sel.mean(), rel=1e-12)
    # the plotly figures were displayed
    shown = [o for c in nb.cells for o in c.get("outputs", [])
             if "application/vnd.plotly.v1+json" in o.get("data", {})
             or "text/html" in o.get("data", {})]
    assert len(shown) >= 4
