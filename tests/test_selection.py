"""Selections (--steps, --layers, --matrices): for every source, the selected store holds the
same values as a full analysis on the selected cells and NaN elsewhere, records what it holds,
and a wider rerun computes only the missing cells; bad selections are clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dynlab
from dynlab.analysis import selection as S
from dynlab.analysis.components import EMBEDDINGS, MATRICES
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run

SPEC = ModelSpec(d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, activation_hidden_dim=24,
                 vocab_size=40)
METRICS = "per,cn,gini"
BIN = Path(sys.executable).parent / "dynlab"

# ---------------------------------------------------------------------------- parsing


def test_steps_lists_ranges_and_last():
    runs = {"a": [0, 100, 200, 300, 400], "b": [0, 50, 100]}
    assert S.select_steps("100:300", runs) == {"a": [100, 200, 300], "b": [100]}
    assert S.select_steps("0:400:200", runs) == {"a": [0, 200, 400], "b": [0]}
    assert S.select_steps("last", runs) == {"a": [400], "b": [100]}
    assert S.select_steps("50, last", runs) == {"a": [400], "b": [50, 100]}
    assert S.select_steps([0, 300], runs) == {"a": [0, 300], "b": [0]}
    assert S.select_steps(None, runs) == runs


@pytest.mark.parametrize("spec, message", [
    ("5:1", "needs A <= B"),
    ("0:10:0", "stride K must be at least 1"),
    ("7", "no checkpoint at step 7; the runs have steps 0, 100, 200"),
    ("1:99", "matches no checkpoint; the runs have steps 0, 100, 200"),
    ("ten", "expected N, A:B, A:B:K or last"),
    ("1:2:3:4", "expected A:B or A:B:K"),
    ("-5", "expected non-negative"),
])
def test_bad_steps(spec, message):
    with pytest.raises(S.SelectionError, match=message):
        S.select_steps(spec, {"a": [0, 100, 200]})


def test_long_step_lists_are_summarised():
    with pytest.raises(S.SelectionError, match=r"0, 1000, 2000, \.\.\., 19000 \(20 in all\)"):
        S.select_steps("5", {"a": list(range(0, 20000, 1000))})


def test_layers_and_matrices():
    assert S.select_layers("0,2", 3) == (0, 2)
    assert S.select_layers("last", 12) == (11,)
    assert S.select_layers("0:11:5", 12) == (0, 5, 10)
    assert S.select_layers(None, 2) == (0, 1)
    with pytest.raises(S.SelectionError, match="12: beyond the model, which has layers 0-11"):
        S.select_layers("0,12", 12)
    with pytest.raises(S.SelectionError, match="beyond the model"):
        S.select_layers("10:20", 12)
    assert S.select_matrices("attention.v_proj,attention.o_proj,ov_circuit") == (
        "attention.v_proj", "attention.o_proj", "ov_circuit")
    assert S.select_matrices("swiglu.*") == ("swiglu.w_0", "swiglu.w_1", "swiglu.w_2")
    assert S.select_matrices("*embedding_proj") == EMBEDDINGS
    assert S.select_matrices(None) == S.MATRIX_NAMES
    with pytest.raises(S.SelectionError, match="'attention.x_proj': matches no matrix; "
                       "expected names or globs over attention.q_proj, .*qk_circuit"):
        S.select_matrices("attention.v_proj,attention.x_proj")


def test_cells_cover_sites():
    from dynlab.analysis.components import Site

    cells = S.Cells.of([1], ["attention.v_proj", "ov_circuit", "embedding_proj"], 3)
    ov = MATRICES.index("ov_circuit")
    assert cells.wants(Site("layer", (1, 2))) and not cells.wants(Site("layer", (0, 2)))
    assert cells.wants(Site("head", (1, 3))) and cells.wants(Site("layer", (1, ov)))
    assert not cells.wants(Site("qk", (1,))) and not cells.wants(Site("qk_head", (1, 0)))
    assert cells.wants(Site("emb", (0,))) and not cells.wants(Site("emb", (1,)))
    every = S.Cells.every(3, 3)
    assert every.covers(cells) and not cells.covers(every)
    assert not (cells - every).any() and (every - cells).any()
    # a 2-layer model in a 3-layer store: its cells are those of its layers
    assert S.Cells.every(2, 3).layer[2].sum() == 0


def test_tensor_keep_names_the_tensors_of_the_cells():
    cells = S.Cells.of([1], ["swiglu.w_2", "ov_circuit", "qk_circuit", "de_embedding_proj"], 3)
    keep = S.tensor_keep(cells)
    assert S.tensor_keep(None) is None
    kept = {"layers.1.swiglu.w_2.weight", "layers.1.attention.o_proj.weight",
            "layers.1.attention.v_proj.weight", "layers.1.attention.q_proj.weight",
            "layers.1.attention.k_proj.weight", "layers.1.swiglu.w_2.lora_A",
            "de_embedding_proj.weight", "layers.1.attention_norm.weight", "output_norm.weight"}
    left = {"layers.0.swiglu.w_2.weight", "layers.2.attention.o_proj.weight",
            "layers.1.swiglu.w_0.weight", "layers.1.swiglu.w_1.lora_B",
            "embedding_proj.weight", "layers.7.swiglu.w_2.weight"}
    assert all(keep(n) for n in kept) and not any(keep(n) for n in left)


@pytest.mark.parametrize("source", ["dynlab", "pico-train", "relora"])
def test_a_selection_reads_only_its_tensors(tmp_path, source):
    """load_source_checkpoint(keep=...) of a dynlab run and of a pico-train run returns the
    tensors the cells are built from (and the layers' other tensors), bit for bit those of a
    whole read; the layer-less tensors of left-out matrices are not read."""
    from dynlab.sources import load_source_checkpoint, open_sources

    if source == "pico-train":
        from test_sources_pico import write_pico_run

        root = tmp_path / "pico-run"
        write_pico_run(root)
    else:
        root = make_run(tmp_path / "r", SPEC, [0, 5],
                        relora={"r": 2, "alpha": 4} if source == "relora" else None)
    run = open_sources([root])[0]
    ckpt = run.checkpoints[-1]
    cells = S.Cells.of([1], ["attention.v_proj", "ov_circuit"], run.spec.n_layers)
    keep = S.tensor_keep(cells)
    full = load_source_checkpoint(run, ckpt, grads=True)
    part = load_source_checkpoint(run, ckpt, grads=True, keep=keep)
    assert set(part.weights) == {k for k in full.weights if keep(k)}
    assert {"layers.1.attention.v_proj.weight", "layers.1.attention.o_proj.weight"} <= set(
        part.weights)
    assert "embedding_proj.weight" not in part.weights
    assert "layers.0.attention.v_proj.weight" not in part.weights
    for k, v in part.weights.items():
        assert torch.equal(v, full.weights[k]), k
    if full.grads:
        assert set(part.grads) == {k for k in full.grads if keep(k)}
        for k, v in part.grads.items():
            assert torch.equal(v, full.grads[k]), k


# ---------------------------------------------------------------------------- analyses


def spectral(ds) -> list[str]:
    return [v for v in ds.data_vars if {"kind", "step", "run"} <= set(ds[v].dims)]


def assert_selection_equals_full(sel, full, steps, cells: S.Cells):
    """On the selected steps and cells every spectral variable of `sel` equals `full`'s (NaN
    where full is NaN); elsewhere `sel` is NaN. The cell flags say what was analysed."""
    from dynlab.analysis.task import owner_table

    assert list(sel.step.values) == list(steps)
    full = full.sel(step=list(steps), run=list(sel.run.values))
    for name in spectral(sel):
        if name.endswith(("tol", "max_rank")) and name not in full:
            continue
        mask = cells.mask(owner_table(name))
        a, b = sel[name].values, full[name].values  # (run, kind, step, ...)
        m = mask[None, None, None]
        if a.ndim == 3 + mask.ndim + 1:
            m = m[..., None]
        m = np.broadcast_to(m, a.shape)
        np.testing.assert_array_equal(a[m], b[m], err_msg=name)
        assert np.isnan(a[~m]).all(), name
    flags = S.Cells.from_flags(sel.done.values, sel.qk_done.values, sel.emb_done.values)
    assert (flags.layer == cells.layer).all() and (flags.qk == cells.qk).all()
    assert (flags.emb == cells.emb).all()


def check_source(paths, tmp: Path, *, steps, layers, matrices, n_layers, on_selected=None,
                 **kwargs):
    """Full store, selected store, then the selected store widened to everything: the same
    values, and the widening computes only the cells that were missing. `on_selected(ds)`
    sees the selected store before it is widened."""
    kw = dict(metrics=METRICS, device="cpu", progress=False, **kwargs)
    full = dynlab.open_store(dynlab.analyze(paths, tmp / "full.zarr", **kw))
    runs = list(full.run.values)
    seen = []
    path = dynlab.analyze(paths, tmp / "sel.zarr", steps=steps, layers=layers,
                          matrices=matrices, on_checkpoint=seen.append, **kw)
    sel = dynlab.open_store(path)
    chosen = S.select_steps(steps, {r: list(full.step.values) for r in runs})[runs[0]]
    cells = S.Cells.of(S.select_layers(layers, n_layers), S.select_matrices(matrices),
                       n_layers)
    assert_selection_equals_full(sel, full, chosen, cells)
    assert (sel.analyzed.values == 2).all()  # a part of each selected checkpoint
    assert {t.checkpoint.step for t in seen} == set(chosen)
    if on_selected is not None:
        on_selected(sel)
    # the same selection again: nothing to do
    again = []
    dynlab.analyze(paths, path, steps=steps, layers=layers, matrices=matrices,
                   on_checkpoint=again.append, **kw)
    assert again == []
    # widen to everything: only the missing cells of the selected steps are computed
    wider = []
    dynlab.analyze(paths, path, on_checkpoint=wider.append, **kw)
    for task in wider:
        if task.checkpoint.step in chosen:
            assert task.keep is not None and task.keep.covers(cells)
            assert not (task.cells & cells).any()
        else:
            assert task.keep is None
    ds = dynlab.open_store(path)
    assert (ds.analyzed.values == 1).all()
    for name in spectral(full):
        a, b = ds[name].sel(step=full.step).values, full[name].values
        np.testing.assert_array_equal(a, b, err_msg=name)
    return full, sel


def test_dynlab_run(tmp_path):
    from dynlab.viz import trajectory

    def figures(ds):  # a figure of a matrix the selection left out says so
        notes = trajectory(ds, "per", "weights", "swiglu.w_0").layout.meta["notes"]
        assert any("matrix 'swiglu.w_0' not analysed" in n for n in notes), notes
        fig = trajectory(ds, "per", "weights", "ov_circuit")
        assert not any("not analysed" in n for n in fig.layout.meta["notes"])
        assert len(fig.data) > 0

    run = make_run(tmp_path / "r", SPEC, [0, 5, 10])
    matrices = "attention.v_proj,attention.o_proj,ov_circuit,de_embedding_proj"
    check_source([run], tmp_path, steps="5,last", layers="1:2", matrices=matrices, n_layers=3,
                 on_selected=figures)


def test_relora_run(tmp_path):
    run = make_run(tmp_path / "r", SPEC, [0, 5, 10], relora={"r": 2, "alpha": 4})
    full, sel = check_source([run], tmp_path, steps="5:10", layers="0",
                             matrices="swiglu.*,qk_circuit", n_layers=3)
    assert "lora" in list(sel.kind.values)
    w2 = MATRICES.index("swiglu.w_2")
    assert np.isfinite(sel.per.sel(kind="lora").values[0, :, 0, w2]).all()


def test_pico_train_run(tmp_path):
    from test_sources_pico import write_pico_run

    root = tmp_path / "pico-run"
    write_pico_run(root)
    check_source([root], tmp_path, steps="0:5", layers="last",
                 matrices="attention.v_proj,swiglu.w_2,ov_circuit", n_layers=2)


@pytest.mark.slow
def test_hf_directories_and_hub(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    import hf_fixtures as fx
    from test_sources_hub import lay_out_cache

    steps = (0, 2, 4)
    fx.train_and_save("gpt_neox", tmp_path / "dirs", steps, "step{}")
    (tmp_path / "a").mkdir()
    check_source([tmp_path / "dirs"], tmp_path / "a", steps="2:4", layers="1",
                 matrices="attention.q_proj,ov_circuit,embedding_proj", n_layers=2)
    cache = tmp_path / "cache"
    repo = "tiny-org/tiny-pythia"
    lay_out_cache(cache, repo, {f"step{s}": tmp_path / "dirs" / f"step{s}" for s in steps})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sorted(str(p) for p in cache.rglob("*"))
    (tmp_path / "b").mkdir()
    check_source([f"hf://{repo}"], tmp_path / "b", steps="4", layers="0",
                 matrices="swiglu.w_2,qk_circuit", n_layers=2, cache_dir=cache)
    assert sorted(str(p) for p in cache.rglob("*")) == before
    assert hf.scan_cache_dir(cache).repos


@pytest.mark.slow
def test_fill_in_killed_between_values_and_flags(tmp_path):
    """A real `dynlab analyze` filling in cells, killed (SIGKILL) after a checkpoint's values
    are written and before its flags: the store says exactly what it held before, and the
    rerun completes it to the full analysis' values."""
    import os

    run = make_run(tmp_path / "r", SPEC, [0, 5])
    kw = dict(metrics="per", device="cpu", progress=False)
    path = dynlab.analyze([run], tmp_path / "s.zarr", matrices="attention.v_proj", **kw)
    cmd = [str(BIN), "analyze", str(run), "-o", str(path), "--no-progress", "--device", "cpu",
           "--matrices", "attention.*"]
    env = {**os.environ, "DYNLAB_FAULT": "analyze.write:kill"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    ds = dynlab.open_store(path)
    v = MATRICES.index("attention.v_proj")
    assert ds.done.values[0, :, :, v].all()
    assert ds.done.values[0, :, :, :v].sum() == 0 and (ds.analyzed.values == 2).all()
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    full = dynlab.open_store(dynlab.analyze([run], tmp_path / "f.zarr", **kw))
    ds = dynlab.open_store(path)
    att = [MATRICES.index(m) for m in MATRICES if m.startswith("attention.")]
    np.testing.assert_array_equal(ds.per.values[..., att], full.per.values[..., att])
    assert ds.done.values[0, :, :, att].all() and (ds.analyzed.values == 2).all()


def test_cli_bad_selections(tmp_path):
    """`dynlab analyze` with a bad selection: exit status 2, one line naming the option and
    what exists, no traceback, no store."""
    from typer.testing import CliRunner

    from dynlab_cli.main import app

    run = make_run(tmp_path / "r", SPEC, [0, 5], grads=False)
    cases = [
        (["--steps", "5:1"], "--steps 5:1: a range A:B[:K] needs A <= B"),
        (["--steps", "7"], "no checkpoint at step 7; the runs have steps 0, 5"),
        (["--matrices", "attention.x"], "expected names or globs over attention.q_proj"),
        (["--layers", "3"], "--layers 3: beyond the model, which has layers 0-2 (3 layers)"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["analyze", str(run), "-o", str(tmp_path / "x.zarr"),
                                          "--no-progress", "--device", "cpu", *args])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.zarr").exists()
