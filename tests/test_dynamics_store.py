"""`dynlab analyze --dynamics`: the function-space dynamics of real (tiny) runs in the store —
values against independent computations from the checkpoint files, labelled dims,
determinism, resuming, and clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from builders import tiny_train_options
from safetensors.torch import load_file

import dynlab
from dynlab.analysis import dynamics as D
from dynlab.errors import InputError
from dynlab.function_space import curvature as C
from dynlab.function_space import landscape as L
from dynlab.model import load_checkpoint_model
from dynlab.runs.checkpoints import find_runs

# hessian_seq 4 (the CLI default): the whole 3-sequence batch, as the CLI test computes it
OPTS = dict(n_seq=3, seq_len=8, hessian_seq=4, k=2, probes=4, alphas=5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    kw = tiny_train_options(steps=6, checkpoint_every=2, warmup_steps=1, threads=1)
    dec = dynlab.train("decoder", out=str(root / "dec"), save_activations=True, **kw)
    rel = dynlab.train("relora", out=str(root / "rel"), rank=2, reset_every=3,
                       restart_warmup_steps=1, **kw)
    return root, dec, rel


@pytest.fixture(scope="module")
def store(runs):
    root, dec, rel = runs
    out = root / "a.zarr"
    dynlab.analyze([dec, rel], out=out, progress=False, dynamics="all", dynamics_options=OPTS)
    return out


def test_dynamics_values(runs, store):
    root, dec, rel = runs
    ds = dynlab.open_store(store).load()
    assert ds.hess_top.dims == ("run", "step", "hess_k")
    assert ds.line_loss.dims == ("run", "step", "line_alpha")
    assert ds.attn_entropy.dims == ("run", "step", "layer", "head")
    assert ds.update_ratio.dims == ("run", "step", "layer", "matrix")
    assert ds.dyn_analyzed.sum().item() == 2 * 4 * 4  # runs × steps × items
    steps = [int(s) for s in ds.step.values]
    assert steps == [0, 2, 4, 6]
    batch = D.dynamics_batch(find_runs([dec])[0], D.DynamicsOptions(**OPTS))
    saved = load_file(f"{dec}/checkpoints/step_0/activations.safetensors")["batch_tokens"]
    np.testing.assert_array_equal(batch.numpy(), saved[:3, :9].numpy())
    # the relora run saved no activations: its batch is the trainer's ld_batch.safetensors,
    # the same learning-dynamics batch (same data, tokenizer and options)
    assert not (rel / "checkpoints/step_0/activations.safetensors").exists()
    ld = load_file(f"{rel}/ld_batch.safetensors")["batch_tokens"]
    np.testing.assert_array_equal(ld.numpy(), saved.numpy())
    rebuilt = D.dynamics_batch(find_runs([rel])[0], D.DynamicsOptions(**OPTS))
    np.testing.assert_array_equal(rebuilt.numpy(), batch.numpy())
    for step in (2, 6):
        m = load_checkpoint_model(dec / f"checkpoints/step_{step}")
        cell = ds.sel(run="dec", step=step)
        with torch.no_grad():
            assert cell.dyn_loss.item() == pytest.approx(float(D.lm_loss(m, batch)), rel=1e-6)
        # the top Hessian eigenvalue: Lanczos run to the full dimension on the same batch
        params = list(m.parameters())
        with D.math_attention():
            mv = C.hvp_operator(lambda m=m: D.lm_loss(m, batch), params)
            ref = C.lanczos(mv, sum(p.numel() for p in params), k=1, iters=60)
        assert cell.hess_top.values[0] == pytest.approx(ref.eigenvalues[0].item(), rel=1e-3)
        # the threshold from the checkpoint's learning rate and torch's β₁
        lr = float(cell.lr)
        assert cell.eos_threshold.item() == pytest.approx(3.8 / (0.1 * lr))
        assert np.isfinite(cell.precond_sharpness.item())
        # barrier from the two checkpoints' weights, interpolated here
        prev = load_checkpoint_model(dec / f"checkpoints/step_{step - 2}")
        a, b = prev.state_dict(), m.state_dict()
        mid = load_checkpoint_model(dec / f"checkpoints/step_{step}")
        mid.load_state_dict({k: (a[k] + b[k]) / 2 for k in a})
        with torch.no_grad():
            assert cell.line_loss.values[2] == pytest.approx(float(D.lm_loss(mid, batch)),
                                                             rel=1e-5)
        assert cell.barrier.item() == pytest.approx(
            L.barrier(cell.line_loss.values, L.alpha_grid(5)))
        assert int(cell.barrier_prev_step) == step - 2
        # update ratio from the weight files themselves
        w0 = load_file(f"{dec}/checkpoints/step_{step - 2}/weights.safetensors")
        w1 = load_file(f"{dec}/checkpoints/step_{step}/weights.safetensors")
        key = "layers.1.swiglu.w_2.weight"
        want = float((w1[key].double() - w0[key].double()).norm() / w0[key].double().norm())
        got = cell.update_ratio.sel(layer=1, matrix="swiglu.w_2").item()
        assert got == pytest.approx(want, rel=1e-9)
    first = ds.sel(run="dec", step=0)
    assert int(first.barrier_prev_step) == -1 and np.isnan(first.barrier.item())
    assert np.isnan(first.precond_sharpness.item())  # no Adam state before the first update
    # relora: no preconditioned sharpness (its optimizer holds the factors), resets flagged
    r = ds.sel(run="rel")
    assert np.isnan(r.precond_sharpness.values).all()
    assert np.isfinite(r.hess_top.values).all()
    resets = json.loads((rel / "run.json").read_text())["relora"]["reset_steps"]
    assert resets == [3]  # after update 3: between checkpoints 2 and 4
    assert r.reset_pair.values.tolist() == [0, 0, 1, 0]
    assert ds.train_batch_size.sel(run="dec", step=2).item() == 2.0
    attrs = json.loads(ds.attrs["dynamics"])
    assert attrs["runs"]["dec"]["shape"] == [3, 9]
    assert attrs["runs"]["dec"]["tokens"] == batch.tolist()
    assert attrs["settings"]["seed"] == 0


@pytest.mark.slow
def test_same_bits_and_resume(runs, store, tmp_path):
    root, dec, rel = runs
    other = tmp_path / "b.zarr"
    dynlab.analyze([dec, rel], out=other, progress=False, dynamics="sharpness",
                   dynamics_options=OPTS)
    dynlab.analyze([dec, rel], out=other, progress=False, dynamics="all",
                   dynamics_options=OPTS)
    a, b = dynlab.open_store(store).load(), dynlab.open_store(other).load()
    for name in ("hess_top", "hess_trace", "hess_trace_se", "precond_sharpness", "line_loss",
                 "gns_b_simple", "layer_gns_b_simple", "attn_entropy", "sink_score",
                 "massive_ratio", "update_ratio", "reset_pair"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_refusals(runs, store, tmp_path):
    root, dec, rel = runs
    with pytest.raises(InputError, match="--dynamics: unknown 'hessian'"):
        dynlab.analyze([dec], out=tmp_path / "x.zarr", dynamics="hessian")
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(InputError, match="dynamics_options"):
        dynlab.analyze([dec], out=tmp_path / "x.zarr", dynamics="gns",
                       dynamics_options={"batch": 3})
    with pytest.raises(InputError, match="k = 2 and 5"):  # another k: refused, store kept
        dynlab.analyze([dec, rel], out=store, progress=False, dynamics="sharpness",
                       dynamics_options={**OPTS, "k": 3})
    with pytest.raises(InputError, match="fewer than"):  # data too short for the batch
        f = tmp_path / "short.txt"
        f.write_text("a b c\n")
        dynlab.analyze([dec], out=tmp_path / "y.zarr", dynamics="gns",
                       dynamics_options={**OPTS, "data": str(f)})
    assert not (tmp_path / "y.zarr").exists()  # refused before the store was made
    (tmp_path / "notok").mkdir()
    import shutil

    shutil.copytree(dec, tmp_path / "notok" / "dec")
    (tmp_path / "notok" / "dec" / "ld_batch.safetensors").unlink()
    for ckpt in (tmp_path / "notok" / "dec" / "checkpoints").iterdir():
        (ckpt / "activations.safetensors").unlink()
    with pytest.raises(InputError, match="holds no learning-dynamics batch"):
        dynlab.analyze([tmp_path / "notok" / "dec"], out=tmp_path / "z.zarr",
                       dynamics="barrier", dynamics_options=OPTS)
    assert not (tmp_path / "z.zarr").exists()
    assert dynlab.open_store(store).load().dyn_analyzed.sum().item() == 32


@pytest.mark.soak
@pytest.mark.slow
def test_killed_dynamics_resume_to_the_same_store(runs, store, tmp_path):
    root, dec, rel = runs
    out = tmp_path / "k.zarr"
    cmd = [sys.executable, "-m", "dynlab", "analyze", str(dec), str(rel), "-o", str(out),
           "--no-progress", "--dynamics", "all", "--dynamics-batch", "3", "--dynamics-seq-len",
           "8", "--dynamics-k", "2", "--dynamics-probes", "4", "--dynamics-alphas", "5"]
    env = {**os.environ, "DYNLAB_FAULT": "dynamics.write:kill@3"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == -9, first.stderr
    env.pop("DYNLAB_FAULT")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    a, b = dynlab.open_store(store).load(), dynlab.open_store(out).load()
    for name in ("hess_top", "line_loss", "gns_b_simple", "attn_entropy", "dyn_analyzed"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama"])
def test_hugging_face_checkpoints(tmp_path, arch):
    hf = pytest.importorskip("hf_fixtures")
    run_dir = tmp_path / "hfrun"
    hf.train_and_save(arch, run_dir, steps=(0, 2))
    for d in run_dir.iterdir():
        hf.save_tokenizer(d)
    text = hf.write_text(tmp_path / "docs.txt")
    out = tmp_path / "hf.zarr"
    with pytest.raises(InputError, match="pass --dynamics-data"):
        dynlab.analyze([run_dir], out=out, progress=False, dynamics="attention")
    dynlab.analyze([run_dir], out=out, progress=False, dynamics="all",
                   dynamics_options=dict(OPTS, data=str(text)))
    ds = dynlab.open_store(out).load()
    cell = ds.isel(run=0).sel(step=2)
    assert np.isfinite(cell.hess_top.values).all() and np.isfinite(cell.barrier.item())
    assert np.isfinite(cell.layer_gns_b_simple.values).all()
    assert np.isnan(cell.precond_sharpness.item())  # no optimizer state in an HF checkpoint
    # attention from transformers' own output_attentions on the recorded batch
    batch = torch.tensor(json.loads(ds.attrs["dynamics"])["runs"][str(ds.run.values[0])]
                         ["tokens"])
    model = hf.load(run_dir / "step2").eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(input_ids=batch[:, :-1], output_attentions=True).attentions
    for layer, a in enumerate(att):
        p = a.double().numpy()
        np.testing.assert_allclose(cell.sink_score.sel(layer=layer).values[:p.shape[1]],
                                   p[:, :, 1:, 0].mean(axis=(0, 2)), rtol=1e-5)


def test_dynamics_figures_and_report(runs, store):
    from dynlab.viz import dynamics as V
    from dynlab.viz import report as R

    ds = dynlab.open_store(store).load()
    titles = [t for t, _, _ in V.dynamics_sections(ds)]
    assert titles == ["Update-to-weight ratio", "Sharpness and the edge of stability",
                      "Loss barriers between checkpoints", "Gradient noise scale",
                      "Attention entropy and sinks"]
    fig = V.barrier_figure(ds)
    diamonds = [t for t in fig.data if t.name == "rel: reset pairs"]
    assert len(diamonds) == 1 and list(diamonds[0].x) == [4]
    assert list(diamonds[0].y) == [ds.barrier.sel(run="rel", step=4).item()]
    sharp = V.sharpness_figure(ds)
    thr = [t for t in sharp.data if t.name == "dec threshold"][0]
    np.testing.assert_allclose(thr.y, ds.eos_threshold.sel(run="dec").values[1:])
    assert any("rel: no Adam state" in n for n in sharp.layout.meta["notes"])
    sections = R.report_sections(ds)
    assert [s.title for s in sections][-len(titles):] == titles
    assert all(s.figure is not None for s in sections[-len(titles):])
    empty = ds.drop_vars([v for v in ds.data_vars if v not in ("per", "train_loss")])
    assert V.dynamics_sections(empty) == []
    # a store with the update ratio but no --dynamics results: the report is as before
    assert V.dynamics_sections(ds[["per", "update_ratio"]]) == []
    fig = V.update_ratio_figure(ds)
    med = np.nanmedian(ds.update_ratio.sel(run="dec", step=2).values)
    assert [t for t in fig.data if t.name == "dec"][0].y[0] == pytest.approx(med)


@pytest.mark.slow
def test_between_two_runs(runs, store, tmp_path):
    root, dec, rel = runs
    out = tmp_path / "btw.zarr"
    import shutil

    shutil.copytree(store, out)
    dynlab.analyze([dec, rel], out=out, progress=False,
                   dynamics_options={**OPTS, "between": "dec@6,rel@6"})
    ds = dynlab.open_store(out).load()
    assert [str(v) for v in ds.between.values] == ["dec@6,rel@6"]
    a = load_checkpoint_model(dec / "checkpoints/step_6")
    b = load_checkpoint_model(rel / "checkpoints/step_6")
    batch = D.dynamics_batch(find_runs([dec])[0], D.DynamicsOptions(**OPTS))
    sa, sb = a.state_dict(), b.state_dict()
    a.load_state_dict({k: 0.75 * sa[k] + 0.25 * sb[k] for k in sa})
    with torch.no_grad():
        want = float(D.lm_loss(a, batch))
    assert ds.between_loss.values[0, 1] == pytest.approx(want, rel=1e-5)
    assert ds.between_barrier.item() == pytest.approx(
        L.barrier(ds.between_loss.values[0], L.alpha_grid(5)))
    with pytest.raises(InputError, match="no complete checkpoint at step 5"):
        dynlab.analyze([dec, rel], out=out, progress=False,
                       dynamics_options={**OPTS, "between": "dec@5,rel@6"})
    with pytest.raises(InputError, match="expected RUN@STEP,RUN@STEP"):
        dynlab.analyze([dec, rel], out=out, progress=False,
                       dynamics_options={**OPTS, "between": "dec@5"})


def test_cli_bad_dynamics_is_exit_2(runs, tmp_path):
    from typer.testing import CliRunner

    from dynlab_cli.main import app

    root, dec, rel = runs
    res = CliRunner().invoke(app, ["analyze", str(dec), "-o", str(tmp_path / "c.zarr"),
                                   "--dynamics", "sharpness,curvature"])
    assert res.exit_code == 2 and "--dynamics: unknown 'curvature'" in res.output
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.slow
@pytest.mark.parametrize("relora", [None, {"r": 2, "lora_alpha": 4, "trainable_scaling": False}])
def test_pico_train_and_relora_pico_runs(tmp_path, relora):
    transformers = pytest.importorskip("transformers")
    from test_sources_pico import write_pico_run
    from tokenizers import Tokenizer, models

    root = tmp_path / ("relora-run" if relora else "pico-run")
    written = write_pico_run(root, relora=relora)
    letters = "abcdefghijklmnopq"  # 17 letters + 2 specials: within the model's 20 ids
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(letters)}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        eos_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(root)
    text = tmp_path / "docs.txt"
    gen = np.random.default_rng(0)
    text.write_text("\n\n".join("".join(gen.choice(list(letters), 20)) for _ in range(10)))
    out = tmp_path / "p.zarr"
    dynlab.analyze([root], out=out, progress=False, metrics="per", dynamics="all",
                   dynamics_options=dict(OPTS, data=str(text)))
    ds = dynlab.open_store(out).load().isel(run=0)
    steps = sorted(written)
    assert np.isfinite(ds.hess_top.sel(step=steps[-1]).values).all()
    assert np.isfinite(ds.barrier.sel(step=steps[1]).item())
    assert np.isfinite(ds.attn_entropy.sel(step=steps[0]).values).all()
    assert ds.dyn_analyzed.values.all()
