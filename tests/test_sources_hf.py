"""Hugging Face model directories written by transformers (Llama, GPT-NeoX/Pythia, GPT-2):
dynlab's per-head OV circuits equal what transformers' attention modules compute, and every
metric in the store equals a scipy float64 reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import xarray as xr

transformers = pytest.importorskip("transformers")

import hf_fixtures as fx  # noqa: E402
from sources_refs import check, to64  # noqa: E402

import dynlab  # noqa: E402
from dynlab.analysis import activations as A  # noqa: E402
from dynlab.analysis import components as C  # noqa: E402
from dynlab.errors import InputError  # noqa: E402
from dynlab.runs.checkpoints import CheckpointError  # noqa: E402
from dynlab.sources import open_sources  # noqa: E402

METRICS = "per,er,cn,spectral_norm,frobenius_norm"
# (arch, directory name pattern, save_pretrained options, dtype)
VARIANTS = {
    "llama": ("step_{}", {"max_shard_size": "8KB"}, torch.float32),       # sharded safetensors
    "gpt_neox": ("step{}", {}, torch.bfloat16),                          # bf16 safetensors
    "gpt2": ("checkpoint-{}", {"safe_serialization": False}, torch.float32),  # pytorch_model.bin
}
STEPS = (0, 2, 4)


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    saved = {}
    for arch, (name, kw, dtype) in VARIANTS.items():
        saved[arch] = fx.train_and_save(arch, root / arch, STEPS, name, dtype=dtype, **kw)
    store = dynlab.analyze([root / a for a in VARIANTS], root / "a.zarr", metrics=METRICS,
                           device="cpu", progress=False)
    return root, saved, dynlab.open_store(store)


def test_layouts_are_what_transformers_wrote(hf_runs):
    root, _, _ = hf_runs
    llama = root / "llama" / "step_2"
    assert (llama / "model.safetensors.index.json").is_file()
    assert len(list(llama.glob("model-*-of-*.safetensors"))) > 1
    assert (root / "gpt2" / "checkpoint-4" / "pytorch_model.bin").is_file()
    cfg = json.loads((root / "gpt_neox" / "step0" / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    runs = open_sources([root / a for a in VARIANTS])
    assert [[c.step for c in r.checkpoints] for r in runs] == [list(STEPS)] * 3
    assert [r.config["source"]["architecture"] for r in runs] == ["llama", "gpt_neox", "gpt2"]


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_ov_circuit_equals_transformers_module(hf_runs, arch):
    """Per head and for the whole layer, O_h·V_g(h) from dynlab's extraction equals the map
    transformers' own attention module applies (attention fixed to the identity)."""
    root, _, _ = hf_runs
    (run,) = open_sources([root / arch])
    ckpt = run.checkpoints[-1]
    w = {k: v.double() for k, v in run.reader.weights(ckpt).items()}
    model = fx.load(ckpt.path)
    spec = run.spec
    for layer in range(spec.n_layers):
        o = w[f"layers.{layer}.attention.o_proj.weight"]
        v = w[f"layers.{layer}.attention.v_proj.weight"]
        o_h, v_h = C.ov_head_factors(o, v, spec)
        for head in range(spec.n_heads):
            expected = fx.module_ov(model, arch, layer, head)
            torch.testing.assert_close(o_h[head] @ v_h[head], expected, rtol=1e-9, atol=1e-12)
        left, right = C.ov_whole_factors(o, v, spec)
        torch.testing.assert_close(left @ right, fx.module_ov(model, arch, layer, None),
                                   rtol=1e-9, atol=1e-12)


def linear_of(saved: dict, arch: str, layer: int, role: str) -> torch.Tensor:
    """The checkpoint's own matrix for a role, in Linear layout, taken by hand from the saved
    state dict (an extraction independent of dynlab.sources.arch)."""
    if arch == "llama":
        name = {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}[role]
        return saved[f"model.layers.{layer}.{name}.weight"]
    if arch == "gpt_neox":
        p = f"gpt_neox.layers.{layer}."
        if role in ("q", "v"):
            qkv = saved[p + "attention.query_key_value.weight"]
            h, d = 4, qkv.shape[1]
            hd = d // h
            j = {"q": 0, "v": 2}[role]
            rows = [qkv[(3 * i + j) * hd:(3 * i + j + 1) * hd] for i in range(h)]
            return torch.cat(rows)
        return saved[p + {"o": "attention.dense", "up": "mlp.dense_h_to_4h",
                          "down": "mlp.dense_4h_to_h"}[role] + ".weight"]
    p = f"transformer.h.{layer}."
    if role in ("q", "v"):
        c = saved[p + "attn.c_attn.weight"]
        d = c.shape[0]
        j = {"q": 0, "v": 2}[role]
        return c[:, j * d:(j + 1) * d].T
    return saved[p + {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}[role]
                 + ".weight"].T


ROLES = {"q": "attention.q_proj", "v": "attention.v_proj", "o": "attention.o_proj",
         "up": "swiglu.w_1", "down": "swiglu.w_2", "gate": "swiglu.w_0"}


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_metrics_equal_scipy(hf_runs, arch):
    root, saved, ds = hf_runs
    roles = ["q", "v", "o", "up", "down"] + (["gate"] if arch == "llama" else [])
    for step in STEPS:
        sd = saved[arch][step]
        for layer in (0, 1):
            for role in roles:
                sel = {"run": arch, "kind": "weights", "step": step, "layer": layer,
                       "matrix": ROLES[role]}
                check(ds, sel, to64(linear_of(sd, arch, layer, role)))
        if step:
            prev = saved[arch][STEPS[STEPS.index(step) - 1]]
            check(ds, {"run": arch, "kind": "updates", "step": step, "layer": 1,
                       "matrix": "attention.v_proj"},
                  to64(linear_of(sd, arch, 1, "v")) - to64(linear_of(prev, arch, 1, "v")))
        emb = {"llama": "model.embed_tokens.weight", "gpt_neox": "gpt_neox.embed_in.weight",
               "gpt2": "transformer.wte.weight"}[arch]
        check(ds, {"run": arch, "kind": "weights", "step": step, "embedding": "embedding_proj"},
              to64(sd[emb]), prefix="emb_")
    if arch != "llama":  # no gate: NaN, not a made-up matrix
        assert math.isnan(float(ds.per.sel(run=arch, kind="weights", step=0, layer=0,
                                           matrix="swiglu.w_0")))


def test_head_metrics_equal_scipy_of_module_ov(hf_runs):
    root, _, ds = hf_runs
    for arch in VARIANTS:
        model = fx.load(root / arch / VARIANTS[arch][0].format(STEPS[-1]))
        for head in (0, 3):
            ov = fx.module_ov(model, arch, 1, head).numpy()
            check(ds, {"run": arch, "kind": "weights", "step": STEPS[-1], "layer": 1,
                       "head": head}, ov, k=4, prefix="head_", rel=1e-5)


def test_unknown_architecture_is_refused(tmp_path):
    d = tmp_path / "m"
    fx.train_and_save("gpt2", tmp_path, (0,), "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model_type 'mamba' is not supported; supported: "
                       r".*gpt2.*gpt_neox.*llama"):
        open_sources([d])


def test_missing_config_and_missing_shard(tmp_path):
    fx.train_and_save("llama", tmp_path / "run", (0, 1), "step{}", max_shard_size="8KB")
    (tmp_path / "run" / "step0" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"step0/config.json: missing"):
        open_sources([tmp_path / "run" / "step0"])
    index = json.loads((tmp_path / "run" / "step1" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "run" / "step1" / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"names shard\(s\) {shard} that are missing"):
        open_sources([tmp_path / "run" / "step1"])


@pytest.mark.slow  # the whole HTML report
def test_report_from_hf_store(hf_runs, tmp_path):
    """`dynlab report` on a store of Llama, Pythia-style and GPT-2 runs: every spectral figure
    is drawn, with nothing missing but what HF checkpoints do not carry (losses, grads)."""
    from dynlab.viz import report as R

    root, _, ds = hf_runs
    out, _, sections = R.write_report([root / "a.zarr"], tmp_path / "report.html")
    by_title = {s.title: s for s in sections}
    for title in ("PER of weights", "Condition number of weights and updates",
                  "PER of weights, layer by layer", "Spectrum evolution"):
        assert by_title[title].figure is not None, title
        if not title.startswith("Condition number"):
            assert by_title[title].notes == [], title
    # The Pythia-style fixture is stored in bf16 (eps 2^-7): its rounding cannot resolve the
    # smallest singular values of the OV products or of a few optimizer steps' updates, so
    # those condition numbers are honestly infinite (rank-deficient at the storage precision)
    # and the figure says so; the float32 Llama and GPT-2 runs draw every value.
    cn_notes = by_title["Condition number of weights and updates"].notes
    assert cn_notes and all(n.startswith("gpt_neox") and ("rank-deficient" in n or "no finite cn"
                                                           in n) for n in cn_notes), cn_notes
    upd = by_title["PER of updates and gradients"]
    assert upd.figure is not None and all("'grads' not in store" in n for n in upd.notes)
    names = {t.name for t in by_title["PER of weights"].figure.data}
    assert {"llama", "gpt_neox", "gpt2"} <= names
    assert out.stat().st_size > 100_000


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from dynlab_cli.main import app

    fx.train_and_save("gpt2", tmp_path, (0,), "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "m"), "--no-progress"])
    assert res.exit_code == 2
    assert "model_type 'mamba' is not supported; supported:" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "m"), "--revisions", "step0"])
    assert res.exit_code == 2 and "--revisions applies to hf://ORG/NAME" in res.output
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "m"), "--format", "pico"])
    assert res.exit_code == 2 and "--format must be one of dynlab, pico-train" in res.output


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bin_that_is_not_a_tensor_dict_is_refused(tmp_path):
    """A pytorch_model.bin holding code is refused by torch.load(weights_only=True) and never
    executed; one holding other objects is refused too."""
    import os
    import pickle

    fx.train_and_save("gpt2", tmp_path, (0,), "m", safe_serialization=False)
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "m" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refused: not a plain tensor"):
        dynlab.analyze([tmp_path / "m"], tmp_path / "a.zarr", device="cpu", progress=False)
    assert not marker.exists()
    torch.save({"transformer.wte.weight": torch.zeros(2), "step": 3},
               tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"expected a plain dict of name -> tensor"):
        dynlab.analyze([tmp_path / "m"], tmp_path / "b.zarr", device="cpu", progress=False)


def test_llama_explicit_head_dim_and_tied_embeddings(tmp_path):
    """A Llama config whose head_dim is not hidden/heads, with tied embeddings: the per-head
    OV circuits still equal the module's, and the output head is the input embedding."""
    torch.manual_seed(5)
    cfg = fx.transformers.LlamaConfig(
        vocab_size=fx.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    fx.transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    (run,) = open_sources([tmp_path / "m"])
    assert run.spec.head_dim == 8 and run.spec.n_heads * run.spec.head_dim == 32
    w = {k: v.double() for k, v in run.reader.weights(run.checkpoints[0]).items()}
    assert torch.equal(w["de_embedding_proj.weight"], w["embedding_proj.weight"])
    model = fx.load(tmp_path / "m")
    o_h, v_h = C.ov_head_factors(w["layers.0.attention.o_proj.weight"],
                                 w["layers.0.attention.v_proj.weight"], run.spec)
    for head in range(4):
        torch.testing.assert_close(o_h[head] @ v_h[head], fx.module_ov(model, "llama", 0, head),
                                   rtol=1e-9, atol=1e-12)
    ds = dynlab.open_store(dynlab.analyze([tmp_path / "m"], tmp_path / "a.zarr", metrics=METRICS,
                                          device="cpu", progress=False))
    check(ds, {"run": "m", "kind": "weights", "step": 0, "layer": 0, "head": 1},
          fx.module_ov(model, "llama", 0, 1).numpy(), k=8, prefix="head_", rel=1e-5)


def test_hf_trainer_checkpoints_carry_loss_and_lr(tmp_path):
    """checkpoint-N/trainer_state.json (HF Trainer) gives train_loss and lr at step N."""
    fx.train_and_save("gpt2", tmp_path / "run", (0, 2), "checkpoint-{}")
    state = {"global_step": 2, "log_history": [
        {"step": 1, "loss": 3.5, "learning_rate": 1e-3},
        {"step": 2, "loss": 3.25, "learning_rate": 5e-4}]}
    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    ds = dynlab.open_store(dynlab.analyze([tmp_path / "run"], tmp_path / "a.zarr",
                                          metrics="per", device="cpu", progress=False))
    assert float(ds.train_loss.sel(run="run", step=2)) == 3.25
    assert float(ds.lr.sel(run="run", step=2)) == 5e-4
    assert math.isnan(float(ds.train_loss.sel(run="run", step=0)))


# ---- activations computed at analysis time (--activations-data) with transformers' classes

FINAL_NORM = {"llama": "model.norm", "gpt_neox": "gpt_neox.final_layer_norm",
              "gpt2": "transformer.ln_f"}
# a linear module of layer 1 per architecture, its native name -> dynlab's sites
MODULE_SITES = {
    "llama": ("model.layers.1.mlp.down_proj", ("swiglu.w_2",)),
    "gpt_neox": ("gpt_neox.layers.1.attention.query_key_value",
                 ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    "gpt2": ("transformer.h.1.attn.c_attn",
             ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
}


def split_by_hand(arch, out, n_heads):
    """The fused Q/K/V output split as the attention modules themselves do it."""
    if arch == "llama":
        return (out,)
    if arch == "gpt_neox":  # view(b, t, heads, 3·hd), then chunk(3) per head
        b, t, _ = out.shape
        qkv = out.view(b, t, n_heads, -1)
        return tuple(c.reshape(b, t, -1) for c in qkv.chunk(3, dim=-1))
    return out.split(out.shape[-1] // 3, dim=-1)  # GPT-2: split(split_size, dim=2)


@pytest.fixture(scope="module")
def hf_act_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfacts")
    for arch in VARIANTS:
        fx.train_and_save(arch, root / arch, (0, 2))
        for step in (0, 2):
            fx.save_tokenizer(root / arch / f"step{step}")
    return root, fx.write_text(root / "docs.txt")


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_activations_data_equal_transformers_forward(hf_act_runs, arch):
    root, text = hf_act_runs
    (run,) = open_sources([root / arch])
    ckpt = run.checkpoints[1]
    acts = A.computed_activations(run, ckpt, str(text), 4, "all", {})
    tok = transformers.AutoTokenizer.from_pretrained(ckpt.path, local_files_only=True)
    ids = [tok.eos_token_id]
    for doc in text.read_text().split("\n\n"):
        ids += tok(doc.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = torch.tensor(ids[:4 * 65]).view(4, 65)  # seq_len = min(128, context 64)
    assert torch.equal(acts["batch_tokens"], batch)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt.path).eval()
    name, sites = MODULE_SITES[arch]
    seen = {}
    hook = model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out: seen.setdefault("out", out.detach()))
    with torch.no_grad():
        hidden = model(input_ids=batch[:, :-1], output_hidden_states=True).hidden_states
    hook.remove()
    d = model.config.hidden_size
    assert acts["token_positions"].shape == (4 * 64, 2)
    # blocks 0 .. L-2: the residual stream is transformers' hidden state after the block
    assert torch.allclose(acts["layers.0"], hidden[1].reshape(-1, d), rtol=0, atol=1e-6)
    # the last block's output is before the final norm, which transformers' last state has
    final_norm = model.get_submodule(FINAL_NORM[arch])
    with torch.no_grad():
        normed = final_norm(acts["layers.1"])
    assert torch.allclose(normed, hidden[2].reshape(-1, d), rtol=0, atol=1e-5)
    for site, want in zip(sites, split_by_hand(arch, seen["out"], model.config.num_attention_heads
                                                 if arch != "gpt2" else model.config.n_head),
                          strict=True):
        assert torch.allclose(acts[f"layers.1.{site}"], want.reshape(-1, want.shape[-1]),
                              rtol=0, atol=1e-6)


@pytest.mark.slow
def test_activations_data_into_the_store(hf_act_runs, tmp_path):
    from test_sources_pico import direct_anisotropy, direct_cka

    root, text = hf_act_runs
    runs = [root / a for a in VARIANTS]
    store = dynlab.analyze(runs, tmp_path / "a.zarr", metrics="per", device="cpu",
                           progress=False, activations_data=str(text), activations_batch=4,
                           activation_positions="sample:8")
    ds = xr.open_zarr(store)
    assert ds.act_analyzed.values.tolist() == [[1, 1]] * 3
    for arch in VARIANTS:
        (run,) = open_sources([root / arch])
        a0 = A.computed_activations(run, run.checkpoints[0], str(text), 4, "sample:8", {})
        a2 = A.computed_activations(run, run.checkpoints[1], str(text), 4, "sample:8", {})
        x, y = a0["layers.0"].double().numpy(), a2["layers.0"].double().numpy()
        cell = ds.sel(run=arch, step=0, layer=0, act_site="residual")
        assert float(cell.anisotropy) == pytest.approx(direct_anisotropy(x), rel=1e-9)
        assert float(cell.cka.sel(target="final")) == pytest.approx(direct_cka(x, y), rel=1e-9)
        gated = ds.anisotropy.sel(run=arch, step=0, layer=0, act_site="swiglu.w_0")
        assert np.isnan(float(gated)) == (arch != "llama")


def test_activations_data_needs_the_checkpoints_tokenizer(tmp_path):
    fx.train_and_save("gpt2", tmp_path / "gpt2", (0,))
    text = fx.write_text(tmp_path / "docs.txt")
    with pytest.raises(InputError, match=r"has no tokenizer: none of tokenizer\.json"):
        dynlab.analyze([tmp_path / "gpt2"], tmp_path / "a.zarr", metrics="per",
                       device="cpu", progress=False, activations_data=str(text))


def test_activations_data_refuses_a_pico_model_directory(tmp_path):
    from safetensors.torch import save_file
    from test_sources_pico import pico_config, random_weights

    d = tmp_path / "pico-hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(pico_config()))
    w = random_weights(torch.Generator().manual_seed(0))
    save_file({f"pico_decoder.{k}": v for k, v in w.items()}, str(d / "model.safetensors"))
    text = fx.write_text(tmp_path / "docs.txt")
    with pytest.raises(InputError, match="pico checkpoint in Hugging Face format"):
        dynlab.analyze([d], tmp_path / "a.zarr", metrics="per", device="cpu", progress=False,
                       activations_data=str(text))
