"""pico-train and relora-pico runs, written by the test in exactly their on-disk format, read
and analysed by dynlab; every value against a scipy float64 reference."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import xarray as xr
import yaml
from safetensors.torch import save_file
from sources_refs import check, to64

import dynlab
from dynlab.analysis import representations as R
from dynlab.runs.checkpoints import CheckpointError, ModelSpec
from dynlab.sources import open_sources
from dynlab.sources.pico import unscramble_activations

SPEC = ModelSpec(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=24,
                 vocab_size=20)
LD_MODULES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
LD_BATCH = 3
STEPS = (0, 5, 10)


def pico_config(relora: dict | None = None) -> dict:
    cfg = {"model_type": "pico_relora_decoder" if relora else "pico_decoder",
           "d_model": SPEC.d_model, "n_layers": SPEC.n_layers,
           "attention_n_heads": SPEC.n_heads, "attention_n_kv_heads": SPEC.n_kv_heads,
           "activation_hidden_dim": SPEC.activation_hidden_dim, "vocab_size": SPEC.vocab_size,
           "max_seq_len": 32, "architectures": ["PicoDecoderHF"]}
    if relora:
        cfg["relora"] = relora
    return cfg


def random_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.randn(*shape, generator=gen) for k, shape in SPEC.expected_shapes().items()}


def write_pico_run(root: Path, relora: dict | None = None, world: int = 1,
                   steps: tuple[int, ...] = STEPS, samples: int = 2 * LD_BATCH) -> dict:
    """A pico-train (or relora-pico) run as the trainer lays it out; returns what was written:
    {step: {"weights", "val_grads", "train_grads", "val_acts"}} with true (unscrambled)
    activations of `samples` rows."""
    gen = torch.Generator().manual_seed(0)
    training_config = {
        "checkpointing": {"run_name": root.name,
                          "learning_dynamics": {"batch_size": LD_BATCH,
                                                "layer_suffixes": list(LD_MODULES),
                                                "sequence_idx": -1}},
        "training": {"max_steps": steps[-1],
                     "fabric": {"num_nodes": 1, "num_devices": world}},
        "model": {"model_type": "pico_relora_decoder" if relora else "pico_decoder"},
    }
    root.mkdir(parents=True)
    (root / "training_config.yaml").write_text(yaml.safe_dump(training_config))
    written = {}
    prefix = "_forward_module.module." if world > 1 else "_forward_module."
    for step in steps:
        d = root / "checkpoints" / f"step_{step}"
        (d / "learning_dynamics").mkdir(parents=True)
        (d / "fabric_state").mkdir()
        (d / "fabric_state" / "checkpoint.pt").write_bytes(b"not to be read")
        (d / "config.json").write_text(json.dumps(pico_config(relora)))
        w = random_weights(gen)
        stored = {}
        if relora:
            r = relora["r"]
            for k, v in w.items():
                if k.startswith("layers.") and ".norm" not in k and "_norm" not in k:
                    m = k.removesuffix(".weight")
                    out_f, in_f = v.shape
                    stored[f"pico_decoder.{m}.weight"] = v
                    stored[f"pico_decoder.{m}.A_lora.weight"] = torch.randn(r, in_f, generator=gen)
                    stored[f"pico_decoder.{m}.B_lora.weight"] = torch.randn(out_f, r, generator=gen)
                    if relora["trainable_scaling"]:
                        stored[f"pico_decoder.{m}.s"] = torch.randn(1, generator=gen)
                else:
                    stored[f"pico_decoder.{k}"] = v
        else:
            stored = {f"pico_decoder.{k}": v for k, v in w.items()}
        save_file(stored, str(d / "model.safetensors"))
        entry = {"stored": stored, "weights": w}
        splits = ("val",) if step == steps[-1] else ("train", "val")
        for split in splits:
            grads, acts, ws = {}, {}, {}
            for layer in range(SPEC.n_layers):
                for m in LD_MODULES:
                    key = f"{prefix}layers.{layer}.{m}"
                    shape = SPEC.expected_shapes()[f"layers.{layer}.{m}.weight"]
                    grads[key] = torch.randn(*shape, generator=gen)
                    ws[key] = w[f"layers.{layer}.{m}.weight"]
                    true = torch.randn(samples, shape[0], generator=gen)
                    acts[key] = true
            entry[f"{split}_grads"] = grads
            entry[f"{split}_acts"] = acts
            scrambled = {k: torch.cat([b.T.reshape(-1, b.shape[1]) for b in v.split(LD_BATCH)])
                         if world == 1 else v for k, v in acts.items()}
            torch.save(grads, d / "learning_dynamics" / f"{split}_gradients.pt")
            torch.save(scrambled, d / "learning_dynamics" / f"{split}_activations.pt")
            torch.save(ws, d / "learning_dynamics" / f"{split}_weights.pt")
        written[step] = entry
    os.symlink(f"step_{steps[-1]}", root / "checkpoints" / "latest")
    return written


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    root = tmp_path_factory.mktemp("pico") / "pico-run"
    written = write_pico_run(root)
    store = dynlab.analyze([root], root.parent / "a.zarr", metrics="per,er,spectral_norm,"
                           "frobenius_norm", device="cpu", progress=False)
    return root, written, dynlab.open_store(store)


def test_pico_run_is_detected_and_listed(pico):
    root, _, _ = pico
    (run,) = open_sources([root])
    assert run.config["source"]["format"] == "pico-train"
    assert [c.step for c in run.checkpoints] == list(STEPS)  # `latest` skipped
    assert run.spec == SPEC


def test_pico_weights_grads_updates_against_scipy(pico):
    root, written, ds = pico
    assert list(ds.kind.values) == ["weights", "grads", "updates", "train_grads"]
    prefix = "_forward_module."
    for step in STEPS:
        w = written[step]["weights"]
        sel = {"run": "pico-run", "step": step, "layer": 1}
        for m in ("attention.q_proj", "swiglu.w_0", "swiglu.w_2"):
            check(ds, {**sel, "kind": "weights", "matrix": m}, to64(w[f"layers.1.{m}.weight"]))
        check(ds, {"run": "pico-run", "step": step, "kind": "weights",
                   "embedding": "de_embedding_proj"}, to64(w["de_embedding_proj.weight"]),
              prefix="emb_")
        g = written[step]["val_grads"]
        check(ds, {**sel, "kind": "grads", "matrix": "attention.v_proj"},
              to64(g[f"{prefix}layers.1.attention.v_proj"]))
        # only the learning-dynamics modules have gradients: the rest are NaN
        assert math.isnan(float(ds.per.sel(**sel, kind="grads", matrix="attention.q_proj")))
        if step != STEPS[-1]:
            tg = written[step]["train_grads"]
            check(ds, {**sel, "kind": "train_grads", "matrix": "swiglu.w_2"},
                  to64(tg[f"{prefix}layers.1.swiglu.w_2"]))
        else:  # the last step holds only val_* files
            assert math.isnan(float(ds.per.sel(**sel, kind="train_grads", matrix="swiglu.w_2")))
    prev = written[STEPS[0]]["weights"]["layers.0.attention.k_proj.weight"]
    cur = written[STEPS[1]]["weights"]["layers.0.attention.k_proj.weight"]
    check(ds, {"run": "pico-run", "step": STEPS[1], "layer": 0, "kind": "updates",
               "matrix": "attention.k_proj"}, to64(cur) - to64(prev))


def test_pico_grad_ov_circuit_by_product_rule(pico):
    """grads' OV per head = O_h·dV_g + dO_h·V_g, from the stored weights and gradients."""
    root, written, ds = pico
    step, layer, head = STEPS[0], 0, 3
    w, g = written[step]["weights"], written[step]["val_grads"]
    hd, grp = SPEC.head_dim, SPEC.n_heads // SPEC.n_kv_heads
    o = to64(w[f"layers.{layer}.attention.o_proj.weight"])
    v = to64(w[f"layers.{layer}.attention.v_proj.weight"])
    do = to64(g[f"_forward_module.layers.{layer}.attention.o_proj"])
    dv = to64(g[f"_forward_module.layers.{layer}.attention.v_proj"])
    kv = head // grp
    oh, vh = o[:, head * hd:(head + 1) * hd], v[kv * hd:(kv + 1) * hd]
    doh, dvh = do[:, head * hd:(head + 1) * hd], dv[kv * hd:(kv + 1) * hd]
    check(ds, {"run": "pico-run", "step": step, "layer": layer, "head": head, "kind": "grads"},
          oh @ dvh + doh @ vh, k=2 * hd, prefix="head_")


def test_pico_activations_unscrambled(pico):
    root, written, _ = pico
    (run,) = open_sources([root])
    ckpt = run.checkpoints[0]
    acts = run.reader.activations(ckpt, "val")
    true = written[ckpt.step]["val_acts"]
    assert set(acts) == {k.removeprefix("_forward_module.") for k in true}
    for k, v in true.items():
        assert torch.equal(acts[k.removeprefix("_forward_module.")], v)
    # the stored file really is scrambled (so the test can fail)
    raw = torch.load(ckpt.path / "learning_dynamics" / "val_activations.pt", weights_only=True)
    key = next(iter(raw))
    assert not torch.equal(raw[key], true[key])
    assert torch.equal(unscramble_activations(raw[key], LD_BATCH), true[key])


def test_multi_device_activations_kept_as_stored(tmp_path):
    root = tmp_path / "ddp"
    written = write_pico_run(root, world=2)
    (run,) = open_sources([root])
    acts = run.reader.activations(run.checkpoints[0], "train")
    true = written[0]["train_acts"]
    for k, v in true.items():
        assert torch.equal(acts[k.removeprefix("_forward_module.module.")], v)


@pytest.mark.parametrize("trainable", [False, True])
def test_relora_pico_effective_weight_and_lora(tmp_path, trainable):
    relora = {"r": 2, "lora_alpha": 6, "lora_dropout": 0.0, "trainable_scaling": trainable,
              "target_modules": ["attention", "swiglu"]}
    root = tmp_path / "relora-run"
    written = write_pico_run(root, relora=relora)
    (run,) = open_sources([root])
    assert run.config["source"]["format"] == "relora-pico"
    store = dynlab.analyze([root], tmp_path / "r.zarr", metrics="per,er,spectral_norm,"
                           "frobenius_norm", kinds="weights,lora", device="cpu", progress=False)
    ds = dynlab.open_store(store)
    for step in (STEPS[0], STEPS[-1]):
        st = written[step]["stored"]
        for m in ("attention.o_proj", "swiglu.w_1"):
            p = f"pico_decoder.layers.1.{m}"
            s = math.tanh(float(st[p + ".s"])) if trainable else 6 / 2
            lora = s * to64(st[p + ".B_lora.weight"]) @ to64(st[p + ".A_lora.weight"])
            sel = {"run": "relora-run", "step": step, "layer": 1, "matrix": m}
            check(ds, {**sel, "kind": "weights"}, to64(st[p + ".weight"]) + lora)
            check(ds, {**sel, "kind": "lora"}, lora, k=2)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_tensor_dict_only(tmp_path):
    """A learning-dynamics file holding anything but a dict of tensors is refused, and a
    pickle with code in it is never executed."""
    root = tmp_path / "bad"
    write_pico_run(root)
    f = root / "checkpoints" / "step_0" / "learning_dynamics" / "val_gradients.pt"
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(f, "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    (run,) = open_sources([root])
    with pytest.raises(CheckpointError, match="refused"):
        run.reader.grads(run.checkpoints[0], run.reader.weights(run.checkpoints[0]))
    assert not marker.exists()
    torch.save({"x": [1, 2]}, f)
    with pytest.raises(CheckpointError, match="plain dict of name -> tensor"):
        run.reader.grads(run.checkpoints[0], run.reader.weights(run.checkpoints[0]))


def test_incomplete_step_is_skipped(tmp_path):
    root = tmp_path / "live"
    write_pico_run(root)
    f = root / "checkpoints" / "step_10" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # still being written
    (run,) = open_sources([root])
    assert [c.step for c in run.checkpoints] == [0, 5]
    assert np.isfinite(run.spec.d_model)


@pytest.mark.slow  # the whole HTML report
def test_report_for_pico_and_relora_pico(pico, tmp_path):
    """One store with a pico-train and a relora-pico run gives the whole report, the ReLoRA
    comparison included, with relora-pico's resets (reset_frequency, its own reset rule)."""
    from dynlab.viz import report as R
    from dynlab.viz.figures import reset_steps

    root, _, _ = pico
    relora_root = tmp_path / "relora-run"
    write_pico_run(relora_root, relora={"r": 2, "lora_alpha": 4, "trainable_scaling": False})
    cfg = yaml.safe_load((relora_root / "training_config.yaml").read_text())
    cfg["model"]["relora"] = {"reset_frequency": 4}
    cfg["training"]["optimization"] = {"lr_warmup_steps": 2}
    (relora_root / "training_config.yaml").write_text(yaml.safe_dump(cfg))
    store = dynlab.analyze([root, relora_root], tmp_path / "both.zarr", metrics="per,cn",
                           device="cpu", progress=False)
    out, ds, sections = R.write_report([store], tmp_path / "report.html")
    by_title = {s.title: s for s in sections}
    assert by_title["ReLoRA against decoder"].figure is not None
    assert by_title["PER of weights"].notes == []
    assert reset_steps(ds, "relora-run") == [5, 9]  # t > 2 and t mod 4 = 1, up to step 10
    assert list(ds.kind.values) == ["weights", "grads", "updates", "lora", "train_grads"]


def test_source_runs_pickle_for_dask(pico):
    """Runs travel to Dask workers: a pico-train run and its reader survive pickling."""
    root, _, _ = pico
    (run,) = open_sources([root])
    again = pickle.loads(pickle.dumps(run))
    ckpt = again.checkpoints[1]
    w = again.reader.weights(ckpt)
    assert torch.equal(w["layers.0.attention.q_proj.weight"],
                       run.reader.weights(run.checkpoints[1])["layers.0.attention.q_proj.weight"])


@pytest.mark.soak  # a second LocalCluster; make test keeps test_distributed_analyze's
@pytest.mark.slow
def test_dask_cluster_equals_serial_for_sources(tmp_path):
    """pico-train and relora-pico runs on a real 2-process LocalCluster give the serial store."""
    import xarray as xr

    a, b = tmp_path / "pico-a", tmp_path / "relora-b"
    write_pico_run(a)
    write_pico_run(b, relora={"r": 2, "lora_alpha": 4, "trainable_scaling": True})
    kw = dict(metrics="per,cn", device="cpu", progress=False)
    serial = dynlab.analyze([a, b], tmp_path / "serial.zarr", **kw)
    dask = dynlab.analyze([a, b], tmp_path / "dask.zarr", scheduler="local:2", **kw)
    xr.testing.assert_identical(xr.open_zarr(serial).load(), xr.open_zarr(dask).load())


def direct_cka(x, y):
    """Biased linear CKA through n × n Gram matrices and the centring matrix (float64)."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


def direct_anisotropy(x):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    n = x.shape[0]
    return float((c.sum() - np.trace(c)) / (n * (n - 1)))


def direct_per(x):
    s = scipy.linalg.svdvals(x - x.mean(0))[: min(x.shape[0] - 1, x.shape[1])]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()) / s.size)


@pytest.mark.parametrize("convention", ["dynlab", "pico"])
def test_pico_train_activations_analysed(tmp_path, convention):
    """pico-train's saved (scrambled) learning-dynamics activations, unscrambled and analysed
    into the store like a dynlab run's: every value against numpy on the true matrices."""
    from test_representations import pico_reference_pwcca

    root = tmp_path / "pico-acts"
    written = write_pico_run(root, samples=40)  # 40 samples, 16 features: CCA is defined
    store = dynlab.analyze([root], tmp_path / "a.zarr", metrics="per", device="cpu",
                           progress=False, convention=convention, target="final,previous")
    ds = xr.open_zarr(store)
    assert ds.attrs["activations_source"] == "saved"
    assert ds.act_analyzed.values.tolist() == [[1, 1, 1]]
    true = {s: {k.removeprefix("_forward_module."): v.double().numpy()
                for k, v in written[s]["val_acts"].items()} for s in STEPS}
    for step in STEPS:
        for layer in range(SPEC.n_layers):
            for site in LD_MODULES:
                x = true[step][f"layers.{layer}.{site}"]
                y = true[STEPS[-1]][f"layers.{layer}.{site}"]
                cell = ds.sel(run="pico-acts", step=step, layer=layer, act_site=site)
                fin = cell.sel(target="final")
                assert float(cell.act_per) == pytest.approx(direct_per(x), rel=1e-6)
                assert float(cell.anisotropy) == pytest.approx(direct_anisotropy(x), rel=1e-9)
                assert float(fin.cka) == pytest.approx(direct_cka(x, y), rel=1e-5)
                if convention == "pico":
                    assert float(fin.pwcca) == pytest.approx(pico_reference_pwcca(x, y),
                                                             rel=1e-9)
                else:
                    assert float(fin.cka) == pytest.approx(direct_cka(x, y), rel=1e-10)
                    assert float(fin.pwcca) == pytest.approx(R.pwcca(x, y), rel=1e-10)
                    assert 0 < float(fin.pwcca) <= 1 + 1e-12
            # pico-train saves no residual stream and only its layer_suffixes modules
            for site in ("residual", "attention.q_proj", "swiglu.w_0"):
                assert np.isnan(float(ds.anisotropy.sel(run="pico-acts", step=step,
                                                        layer=layer, act_site=site)))
    assert float(ds.cka.sel(run="pico-acts", target="final", step=STEPS[-1], layer=0,
                            act_site="swiglu.w_2")) == pytest.approx(1.0, rel=1e-6)
    assert np.isnan(ds.cka.sel(run="pico-acts", target="previous", step=0).values).all()


def test_pico_train_representation_figures(tmp_path):
    """pico-train saves no residual stream: the figures show the first module it saved."""
    from dynlab.viz import representations as V

    root = tmp_path / "pico-acts"
    write_pico_run(root, samples=40)
    store = dynlab.analyze([root], tmp_path / "a.zarr", metrics="per", device="cpu",
                           progress=False)
    ds = dynlab.open_store(store)
    fig = V.similarity_heatmap(ds, "cka", "final")
    assert "attention.v_proj" in fig.layout.title.text and not fig.layout.meta["notes"]
    (heat,) = [t for t in fig.data if t.meta["role"] == "heatmap"]
    want = ds.cka.sel(run="pico-acts", target="final", act_site="attention.v_proj")
    np.testing.assert_array_equal(np.array(heat.z, dtype=float),
                                  want.transpose("layer", "step").values)
    fig = V.anisotropy_over_steps(ds)
    assert "attention.v_proj" in fig.layout.title.text
    assert len([t for t in fig.data if t.meta["role"] == "series"]) == SPEC.n_layers
