"""The trainer end to end: checkpoint layout, resume reproducing the loss curve exactly,
data sources, the evaluation hook and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import tiny_train_options
from safetensors.torch import load_file
from typer.testing import CliRunner

import dynlab
from dynlab.data import documents as DOC
from dynlab.data import tokenizer as TK
from dynlab.model import load_checkpoint_model
from dynlab.runs.config import reset_steps
from dynlab.runs.files import write_checkpoint
from dynlab.runs.layout import complete_checkpoints
from dynlab.runs.metrics import read_metrics
from dynlab.training import data as D
from dynlab.training import trainer as T

ROOT = Path(__file__).resolve().parents[1]
PY = str(Path(sys.executable))

# a model small enough for tests: seconds, not minutes
SMALL = tiny_train_options()


pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


# ------------------------------------------------------------------ checkpoint layout


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_relora_cli_run_layout(tmp_path):
    """A `dynlab train relora` run: names, shapes, meta.json, resets, eval hook."""
    from dynlab_cli.main import app

    out = tmp_path / "relora"
    args = ["train", "relora", "--out", str(out), "--steps", "12", "--checkpoint-every", "4",
            "--reset-every", "5", "--restart-warmup-steps", "2", "--warmup-steps", "2",
            "--lora-rank", "2", "--save-activations", "--eval-every", "12", "--no-progress",
            "--d-model", "16", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
            "--hidden-dim", "32", "--seq-len", "16", "--batch-size", "2",
            "--ld-batch-size", "3", "--vocab-size", "300", "--n-documents", "150",
            "--log-every", "3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith(str(out))

    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "relora"
    assert run["relora"] == {"r": 2, "alpha": 32.0, "dropout": 0.1, "reset_every": 5,
                             "restart_warmup_steps": 2, "prune_ratio": 0.999,
                             "prune_method": "random", "paper_compat": False,
                             "reset_steps": [5, 10]}  # resets follow updates 5 and 10 of 12
    m = run["model"]
    V = m["vocab_size"]
    tok = TK.load_tokenizer(out / "tokenizer.json")
    assert V == tok.get_vocab_size() and TK.bos_id(tok) == 0
    assert (m["d_model"], m["n_layers"], m["n_heads"], m["n_kv_heads"]) == (16, 2, 4, 2)

    steps = [s for s, _ in complete_checkpoints(out)]
    assert steps == [0, 4, 8, 12]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0", "step_12", "step_4", "step_8"]  # no temporary leftovers
    hd, h = 4, 32
    expect = {"embedding_proj.weight": (V, 16), "de_embedding_proj.weight": (V, 16),
              "output_norm.weight": (16,)}
    linear = {"attention.q_proj": (16, 16), "attention.k_proj": (8, 16),
              "attention.v_proj": (8, 16), "attention.o_proj": (16, 16),
              "swiglu.w_0": (h, 16), "swiglu.w_1": (h, 16), "swiglu.w_2": (16, h)}
    for i in range(2):
        expect[f"layers.{i}.attention_norm.weight"] = (16,)
        expect[f"layers.{i}.swiglu_norm.weight"] = (16,)
        for mod, (o, inp) in linear.items():
            expect[f"layers.{i}.{mod}.weight"] = (o, inp)
            expect[f"layers.{i}.{mod}.lora_A"] = (2, inp)
            expect[f"layers.{i}.{mod}.lora_B"] = (o, 2)
    assert hd * 4 == 16
    cycles = {}
    for step, ckpt in complete_checkpoints(out):
        files = sorted(p.name for p in ckpt.iterdir())
        assert files == ["activations.safetensors", "grads.safetensors", "meta.json",
                         "trainer_state.pt", "weights.safetensors"]
        # meta.json is written last
        assert all((ckpt / "meta.json").stat().st_mtime_ns >= (ckpt / f).stat().st_mtime_ns
                   for f in files)
        weights = load_file(ckpt / "weights.safetensors")
        grads = load_file(ckpt / "grads.safetensors")
        assert {k: tuple(v.shape) for k, v in weights.items()} == expect
        assert {k: tuple(v.shape) for k, v in grads.items()} == expect
        acts = load_file(ckpt / "activations.safetensors")
        assert acts["layers.1.swiglu.w_0"].shape == (3, h)
        assert acts["de_embedding_proj"].shape == (3, V)
        # 7 linear modules per layer, the head, each block's output (residual stream), the
        # (sequence, position) of every row (default positions: the last token) and the batch
        assert len(acts) == 2 * 7 + 1 + 2 + 2
        assert acts["batch_tokens"].shape == (3, 17)
        assert acts["layers.1"].shape == (3, 16)
        assert acts["token_positions"].tolist() == [[0, 15], [1, 15], [2, 15]]
        # the stored weight is the effective weight W + s·B·A (s = 32 / 2)
        ts = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        name = "layers.1.attention.v_proj"
        eff = ts["frozen_weights"][name + ".weight"] + 16.0 * (
            weights[name + ".lora_B"] @ weights[name + ".lora_A"])
        torch.testing.assert_close(weights[name + ".weight"], eff, rtol=1e-5, atol=1e-6)
        meta = json.loads((ckpt / "meta.json").read_text())
        assert meta["step"] == step and meta["tokens"] == step * 2 * 16
        assert {"train_loss", "lr", "wall_seconds", "relora_cycle"} <= set(meta)
        cycles[step] = meta["relora_cycle"]
        if step in (0, 12):
            ev = meta["eval"]
            assert set(ev) == {"perplexity", "blimp"}
            assert ev["perplexity"]["macro"] > 1 and 0 <= ev["blimp"]["overall"] <= 1
        else:
            assert "eval" not in meta
        # a relora checkpoint loads as a plain decoder
        model = load_checkpoint_model(ckpt)
        assert torch.equal(model.layers[1].attention.v_proj.weight, weights[name + ".weight"])
    assert cycles == {0: 0, 4: 0, 8: 1, 12: 2}  # resets after updates 5 and 10
    # the reset steps read through dynlab.runs: recorded in run.json, and derived by the same
    # rule for a run written before run.json recorded them
    assert reset_steps(run) == [5, 10] and reset_steps(run, last_step=8) == [5]
    older = json.loads(json.dumps(run))
    del older["relora"]["reset_steps"]
    assert reset_steps(older) == [5, 10] and reset_steps(older, last_step=8) == [5]
    # relora-pico's rule (paper_compat): after t > warmup with t mod 5 = 1, before the last
    paper = {"relora": {"reset_every": 5, "paper_compat": True},
             "train": {"steps": 31, "warmup_steps": 12}}
    assert reset_steps(paper) == [16, 21, 26] and reset_steps({"kind": "decoder"}) == []
    # lr of update 8 = 3e-3 · jagged(7): 7 mod 5 = 2 ≥ 2 (re-warmup over), progress (7-2)/10:
    # 0.1 + 0.45·(1 + cos(π/2)) = 0.55; update 12: 11 mod 5 = 1 < 2, so 1/2 of the cosine at
    # t = 12 (progress 1, the floor 0.1) = 0.05
    meta8 = json.loads((out / "checkpoints/step_8/meta.json").read_text())
    meta12 = json.loads((out / "checkpoints/step_12/meta.json").read_text())
    assert meta8["lr"] == pytest.approx(3e-3 * 0.55)  # micro: lr 3e-3
    assert meta12["lr"] == pytest.approx(3e-3 * 0.05)
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [0, 3, 4, 6, 8, 9, 12]
    assert recs[-1]["tokens"] == 12 * 32 and "eval" in recs[-1]


def test_write_checkpoint_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch as st

    calls = []
    real = st.save_file

    def failing(tensors, path, metadata=None):
        calls.append(Path(path).name)
        if Path(path).name == "grads.safetensors":
            raise OSError("disk full")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing)
    w = {"a": torch.ones(2)}
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 7, weights=w, grads=w, meta={"step": 7})
    assert calls == ["weights.safetensors", "grads.safetensors"]
    assert not (tmp_path / "checkpoints" / "step_7").exists()
    assert complete_checkpoints(tmp_path) == []
    monkeypatch.setattr(st, "save_file", real)
    final = write_checkpoint(tmp_path, 7, weights=w, grads=w, meta={"step": 7})
    assert final.name == "step_7" and complete_checkpoints(tmp_path) == [(7, final)]


# ------------------------------------------------------------------ resume


def test_relora_interrupted_and_resumed_reproduces_loss_curve(tmp_path):
    """Interrupted at step 9, resumed from checkpoint 8 whose reset is still pending, across
    further resets and with LoRA dropout: every loss and the final weights and gradients
    equal the uninterrupted run exactly."""
    kw = dict(SMALL, steps=14, checkpoint_every=4, reset_every=4, restart_warmup_steps=2,
              warmup_steps=2, lora_rank=2, lr=3e-3)
    full = dynlab.train("relora", out=str(tmp_path / "full"), **kw)
    part = tmp_path / "part"
    dynlab.train("relora", out=str(part), stop_at=9, **kw)
    assert [s for s, _ in complete_checkpoints(part)] == [0, 4, 8]
    assert max(losses(part)) == 9
    dynlab.train("relora", out=str(part), resume=True, **kw)
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(15))
    assert a == b  # exact
    wa = load_file(full / "checkpoints/step_14/weights.safetensors")
    wb = load_file(part / "checkpoints/step_14/weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ga = load_file(full / "checkpoints/step_14/grads.safetensors")
    gb = load_file(part / "checkpoints/step_14/grads.safetensors")
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    assert json.loads((part / "checkpoints/step_14/meta.json").read_text())["relora_cycle"] == 3


@pytest.mark.soak  # 60 steps three times; test_train_safety kills real trainers in make test
@pytest.mark.slow
def test_decoder_killed_subprocess_resumes_exactly(tmp_path):
    """A real `dynlab train decoder` process killed with SIGKILL mid-run, then --resume."""
    opts = ["--d-model", "16", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
            "--hidden-dim", "32", "--seq-len", "16", "--batch-size", "2", "--ld-batch-size",
            "3", "--vocab-size", "300", "--n-documents", "150", "--eval-every", "0",
            "--no-progress", "--log-every", "1", "--steps", "60", "--checkpoint-every", "5",
            "--warmup-steps", "3"]
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([PY, "-m", "dynlab_cli.main", "train", "decoder", "--out",
                             str(killed), *opts], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not (killed / "checkpoints" / "step_10" / "meta.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = [s for s, _ in complete_checkpoints(killed)]
    assert 10 <= done[-1] < 60, "the process must be killed mid-run"

    from dynlab_cli.main import app

    res = CliRunner().invoke(app, ["train", "decoder", "--out", str(killed), "--resume",
                                   *opts])
    assert res.exit_code == 0, res.output
    full = tmp_path / "full"
    res = CliRunner().invoke(app, ["train", "decoder", "--out", str(full), *opts])
    assert res.exit_code == 0, res.output
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(61))
    assert a == b
    wa = load_file(full / "checkpoints/step_60/weights.safetensors")
    wb = load_file(killed / "checkpoints/step_60/weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_paper_compat_run_learns_nothing_in_wrapped_layers_before_first_reset(tmp_path):
    run = dynlab.train("relora", out=str(tmp_path / "p"), steps=7, checkpoint_every=3,
                       reset_every=5, warmup_steps=2, restart_warmup_steps=2, lora_rank=2,
                       paper_compat=True, **SMALL)
    assert json.loads((run / "run.json").read_text())["relora"]["paper_compat"] is True
    w = {s: load_file(p / "weights.safetensors") for s, p in complete_checkpoints(run)}
    meta = {s: json.loads((p / "meta.json").read_text()) for s, p in complete_checkpoints(run)}
    assert sorted(w) == [0, 3, 6, 7]
    # the reset due after update 6 (6 > warmup, 6 mod 5 = 1) runs after checkpoint 6
    assert [meta[s]["relora_cycle"] for s in (0, 3, 6, 7)] == [0, 0, 0, 1]
    wrapped = [k for k in w[0] if k.endswith(".lora_A")]
    for a in wrapped:
        mod = a[: -len(".lora_A")]
        for s in (0, 3, 6):  # A = B = 0 through the first cycle: nothing learned
            assert torch.count_nonzero(w[s][a]) == 0
            assert torch.count_nonzero(w[s][mod + ".lora_B"]) == 0
            assert torch.equal(w[s][mod + ".weight"], w[0][mod + ".weight"])
        assert torch.count_nonzero(w[7][a]) > 0  # Kaiming A after the first reset
        assert torch.count_nonzero(w[7][mod + ".lora_B"]) > 0  # ... so B learns
    assert not torch.equal(w[3]["embedding_proj.weight"], w[0]["embedding_proj.weight"])


def test_relora_warm_start_from_decoder(tmp_path):
    dec = dynlab.train("decoder", out=str(tmp_path / "dec"), steps=3, checkpoint_every=3,
                       **SMALL)
    rel = dynlab.train("relora", out=str(tmp_path / "rel"), steps=1, checkpoint_every=1,
                       warm_start=str(dec), rank=2, **SMALL)  # old name of lora_rank
    assert (rel / "tokenizer.json").read_text() == (dec / "tokenizer.json").read_text()
    w_dec = load_file(dec / "checkpoints/step_3/weights.safetensors")
    w_rel = load_file(rel / "checkpoints/step_0/weights.safetensors")
    for k, v in w_dec.items():  # B = 0: the effective weights are the decoder's
        assert torch.equal(w_rel[k], v), k
    with pytest.raises(ValueError, match="warm-start .* differs"):
        dynlab.train("relora", out=str(tmp_path / "rel2"), steps=1, warm_start=str(dec),
                     **(SMALL | dict(d_model=32)))


# ------------------------------------------------------------------ data


def test_text_jsonl_npy_bin_sources(tmp_path):
    from dynlab.data.grammar import generate_corpus
    from dynlab.training.config import TrainConfig
    from dynlab.training.data import load_data

    docs = generate_corpus(60, seed=3)
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(docs))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    base = TrainConfig(seq_len=16, ld_batch_size=2, vocab_size=300).resolved()
    import dataclasses

    tok_t, data_t = load_data(dataclasses.replace(base, data=str(txt)), None)
    tok_j, data_j = load_data(dataclasses.replace(base, data=str(jsonl)), None)
    assert DOC.read_text_documents(txt) == docs == DOC.read_text_documents(jsonl)
    assert np.array_equal(data_t.train_tokens, data_j.train_tokens)
    # the stream: [eot] doc_1 [eot] doc_2 ...
    stream = np.concatenate([data_t.ld_batch.flatten().numpy(), data_t.train_tokens])
    first = tok_t.encode(docs[0]).ids
    assert stream[0] == 0 and list(stream[1:1 + len(first)]) == first
    assert stream[1 + len(first)] == 0
    # pre-tokenised arrays with the tokenizer they come from
    tok_path = tmp_path / "tok.json"
    tok_t.save(str(tok_path))
    np.save(tmp_path / "c.npy", stream.astype(np.int32))
    stream.astype(np.uint16).tofile(tmp_path / "c.bin")
    for f in ("c.npy", "c.bin"):
        _, d = load_data(dataclasses.replace(base, data=str(tmp_path / f),
                                             tokenizer=str(tok_path)), tok_path)
        assert np.array_equal(d.train_tokens, data_t.train_tokens)
        assert torch.equal(d.ld_batch, data_t.ld_batch)
    with pytest.raises(ValueError, match="needs --tokenizer"):
        load_data(dataclasses.replace(base, data=str(tmp_path / "c.npy")), None)


def test_tokenizer_cache_and_vocab(tmp_path):
    docs = ["the cat sat on the mat .", "a dog ran ."] * 20
    tok = TK.get_tokenizer(docs, 280, cache=tmp_path)
    cached = list(tmp_path.glob("bpe-*.json"))
    assert len(cached) == 1
    assert cached[0].name == f"bpe-{TK.corpus_hash(docs, 280)}.json"
    again = TK.get_tokenizer(docs, 280, cache=tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    assert tok.token_to_id(TK.EOT) == 0 and tok.get_vocab_size() <= 280
    assert tok.decode(tok.encode("the cat sat").ids) == "the cat sat"
    assert TK.corpus_hash(docs, 280) != TK.corpus_hash(docs, 281)


def test_window_order_covers_each_epoch_and_shards():
    n = 7
    idx = D.sample_indices(0, 21, n, seed=5)
    for e in range(3):
        assert sorted(idx[e * n:(e + 1) * n]) == list(range(n))
    assert idx[:7] != idx[7:14]  # a new order each epoch
    assert D.sample_indices(4, 6, n, seed=5) == idx[4:10]  # resumable from a position
    assert D.shard([10, 11, 12, 13, 14, 15], 1, 3) == [11, 14]


def test_hf_dataset_without_datasets_package(tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"`datasets` package"):
        dynlab.train("decoder", out=str(tmp_path / "r"), data="someone/some-dataset", **SMALL)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("opts, err, msg", [
    (dict(preset="huge"), ValueError, "unknown preset"),
    (dict(n_kv_heads=3), ValueError, r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
    (dict(d_model=18), ValueError, r"d_model \(18\) must be divisible by n_heads \(4\)"),
    (dict(seq_len=200), ValueError, "exceeds max_seq_len 128"),
    (dict(data="missing.txt"), FileNotFoundError, "missing.txt: file not found"),
    (dict(data="EMPTY"), ValueError, "no documents"),
])
def test_bad_input_fails_before_training(tmp_path, opts, err, msg):
    if opts.get("data") == "EMPTY":
        (tmp_path / "empty.txt").write_text("\n\n")
        opts = dict(data=str(tmp_path / "empty.txt"))
    elif opts.get("data"):
        opts = dict(data=str(tmp_path / opts["data"]))
    with pytest.raises(err, match=msg):
        dynlab.train("decoder", out=str(tmp_path / "run"), **(SMALL | opts))
    assert not (tmp_path / "run").exists()


def test_out_dir_resume_and_nan(tmp_path):
    run = dynlab.train("decoder", out=str(tmp_path / "run"), steps=4, checkpoint_every=2,
                       **SMALL)
    # an existing non-empty --out without --resume / --overwrite
    with pytest.raises(FileExistsError, match="--resume .* --overwrite"):
        dynlab.train("decoder", out=str(run), steps=4, **SMALL)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a dynlab run"):
        dynlab.train("decoder", out=str(other), overwrite=True, **SMALL)
    assert (other / "notes.txt").exists()
    # --resume into a run of another model
    with pytest.raises(ValueError, match="another model: .* kind='decoder', given 'relora'"):
        dynlab.train("relora", out=str(run), resume=True, **SMALL)
    with pytest.raises(ValueError, match="another model: .* d_model=16, given 32"):
        dynlab.train("decoder", out=str(run), resume=True, **(SMALL | dict(d_model=32)))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        dynlab.train("decoder", out=str(tmp_path / "none"), resume=True, **SMALL)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = T.train_step, []

    def step_then_nan(*args, **kwargs):
        calls.append(1)
        return float("nan") if len(calls) == 3 else real(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", step_then_nan)
    run = tmp_path / "run"
    with pytest.raises(T.TrainingDiverged, match=r"loss is nan at step 3.*step_2"):
        dynlab.train("decoder", out=str(run), steps=8, checkpoint_every=2, **SMALL)
    assert [s for s, _ in complete_checkpoints(run)] == [0, 2]
    assert max(losses(run)) == 2


def test_train_step_skips_the_update_on_a_nan_loss():
    from dynlab.model import ModelConfig, PicoDecoder

    torch.manual_seed(0)
    model = PicoDecoder(ModelConfig(16, 1, 4, 2, 8, 11, 8))
    with torch.no_grad():
        model.embedding_proj.weight[3, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    batch = torch.tensor([[3, 1, 2, 4, 5]])
    loss = T.train_step(model, opt, [batch], 0.1, torch.device("cpu"))
    assert loss != loss  # nan
    assert not opt.state  # no update was made
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k], ) or k == "embedding_proj.weight"
               for k in before)
    assert torch.equal(before["embedding_proj.weight"].nan_to_num(),
                       after["embedding_proj.weight"].nan_to_num())


def test_yaml_config_and_explicit_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 3\ncheckpoint-every: 3\nlr: 0.001\nseed: 4\n")
    run = dynlab.train("decoder", config=str(cfg), out=str(tmp_path / "r"), seed=9, **SMALL)
    train = json.loads((run / "run.json").read_text())["train"]
    assert (train["steps"], train["lr"], train["seed"]) == (3, 0.001, 9)
    assert [s for s, _ in complete_checkpoints(run)] == [0, 3]
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="unknown option 'stepz'"):
        dynlab.train("decoder", config=str(bad), out=str(tmp_path / "r2"), **SMALL)
