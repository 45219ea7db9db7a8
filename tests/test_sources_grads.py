"""--grads-data: gradients recomputed per checkpoint on a fixed batch, through transformers'
own classes (Llama, GPT-NeoX, GPT-2) and through dynlab's PicoDecoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import hf_fixtures as fx  # noqa: E402
from sources_refs import check, to64  # noqa: E402
from test_sources_hf import linear_of  # noqa: E402

import dynlab  # noqa: E402
from dynlab.runs.checkpoints import CheckpointError  # noqa: E402

BATCH, SEQ = 3, 10


def reference_grads(model_dir, tokens: np.ndarray) -> dict[str, torch.Tensor]:
    """float64 gradient of the mean next-token loss, by loss.backward() on the model that
    transformers loads (an independent computation of the same definition)."""
    model = fx.load(model_dir)
    batch = torch.from_numpy(tokens[: BATCH * (SEQ + 1)]).view(BATCH, SEQ + 1)
    logits = model(input_ids=batch[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             batch[:, 1:].reshape(-1))
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def grads_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("grads")
    for arch, name in (("llama", "step_{}"), ("gpt_neox", "step{}"), ("gpt2", "checkpoint-{}")):
        fx.train_and_save(arch, root / arch, (0, 3), name)
    tokens = np.random.default_rng(0).integers(0, fx.VOCAB, size=200)
    np.save(root / "tokens.npy", tokens)
    store = dynlab.analyze(
        [root / a for a in ("llama", "gpt_neox", "gpt2")], root / "g.zarr",
        metrics="per,er,spectral_norm,frobenius_norm", kinds="weights,grads", device="cpu",
        progress=False, grads_data={"path": root / "tokens.npy", "batch_size": BATCH,
                                    "seq_len": SEQ})
    return root, tokens, dynlab.open_store(store)


@pytest.mark.parametrize("arch,name", [("llama", "step_{}"), ("gpt_neox", "step{}"),
                                       ("gpt2", "checkpoint-{}")])
def test_hf_grads_equal_float64_backward(grads_store, arch, name):
    root, tokens, ds = grads_store
    assert list(ds.kind.values) == ["weights", "grads"]
    for step in (0, 3):
        g = reference_grads(root / arch / name.format(step), tokens)
        for role, matrix in (("v", "attention.v_proj"), ("o", "attention.o_proj"),
                             ("down", "swiglu.w_2"), ("q", "attention.q_proj")):
            check(ds, {"run": arch, "kind": "grads", "step": step, "layer": 1,
                       "matrix": matrix}, to64(linear_of(g, arch, 1, role)), rel=2e-4)


def test_pico_grads_reproduce_the_trainers(tmp_path):
    """A dynlab run's stored learning-dynamics gradients are recomputed from its weights by
    --grads-data on the same documents (same tokenizer, batch and window length)."""
    docs = "\n\n".join(f"the cat number {i} sat on the mat and looked at dog {i * 7 % 13} ."
                       for i in range(120))
    data = tmp_path / "corpus.txt"
    data.write_text(docs)
    run = dynlab.train("decoder", out=str(tmp_path / "run"), data=str(data), d_model=16,
                       n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=32,
                       seq_len=16, batch_size=2, ld_batch_size=3, vocab_size=300, steps=4,
                       checkpoint_every=2, warmup_steps=1, eval_every=0, progress=False,
                       log_every=1)
    stored = dynlab.open_store(dynlab.analyze([run], tmp_path / "s.zarr", kinds="weights,grads",
                                              metrics="per,frobenius_norm", device="cpu",
                                              progress=False))
    again = dynlab.open_store(dynlab.analyze(
        [run], tmp_path / "r.zarr", kinds="weights,grads", metrics="per,frobenius_norm",
        device="cpu", progress=False,
        grads_data={"path": data, "batch_size": 3, "seq_len": 16}))
    for v in ("per", "frobenius_norm", "head_per", "emb_frobenius_norm"):
        a = stored[v].sel(kind="grads").values
        b = again[v].sel(kind="grads").values
        assert np.isfinite(a).sum() > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-9, err_msg=v)
    # another batch gives other gradients (so the comparison can fail)
    other = dynlab.open_store(dynlab.analyze(
        [run], tmp_path / "o.zarr", kinds="weights,grads", metrics="per", device="cpu",
        progress=False, grads_data={"path": data, "batch_size": 2, "seq_len": 16}))
    assert not np.allclose(other.per.sel(kind="grads").values,
                           stored.per.sel(kind="grads").values, equal_nan=True)


def test_grads_data_errors(grads_store, tmp_path):
    root, _, _ = grads_store
    np.save(tmp_path / "short.npy", np.arange(5))
    with pytest.raises(CheckpointError, match=r"only 5 tokens; a batch of 3 × 11 needs 33"):
        dynlab.analyze([root / "gpt2"], tmp_path / "x.zarr", progress=False, device="cpu",
                       grads_data={"path": tmp_path / "short.npy", "batch_size": 3,
                                   "seq_len": 10})
    np.save(tmp_path / "big.npy", np.full(100, 999))
    with pytest.raises(CheckpointError, match=r"do not fit the vocabulary"):
        dynlab.analyze([root / "gpt2"], tmp_path / "y.zarr", progress=False, device="cpu",
                       grads_data={"path": tmp_path / "big.npy", "batch_size": 3,
                                   "seq_len": 10})
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(CheckpointError, match=r"text needs a tokenizer"):
        dynlab.analyze([root / "gpt2"], tmp_path / "z.zarr", progress=False, device="cpu",
                       grads_data={"path": tmp_path / "t.txt"})
