"""Reproducing the study at its own scale: the study configs, the global batch, pre-tokenised
rows (local parquet/arrow, sharded and resumable), tokenizers by directory, pre-tokenised
Paloma perplexity, the --dry-run cost preview, GPU-hours, and multi-node torchrun."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from dynlab.data import documents as DOC
from dynlab.data import pretokenized as P
from dynlab.data import tokenizer as TK
from dynlab.errors import InputError
from dynlab.runs.layout import complete_checkpoints
from dynlab.runs.metrics import read_metrics
from dynlab.training import costs
from dynlab.training.batching import apply_batch, split_global_batch
from dynlab.training.config import make_config

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "study"
STUDY = ("decoder-tiny", "decoder-small", "relora-tiny", "relora-small")
# a model small enough for tests (the study's shapes are exercised on the meta device)
SMALL = dict(preset="micro", d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
             activation_hidden_dim=32, max_seq_len=64, seq_len=16, ld_batch_size=3,
             eval_every=0, progress=False, log_every=1, threads=1)


pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


# ------------------------------------------------------------------ local files in the formats


def tokenizer_dir(root: Path) -> tuple[Path, object]:
    """A directory holding a tokenizer.json made by the `tokenizers` library (as a Hugging
    Face model directory holds it)."""
    tok = TK.train_tokenizer(DOC.default_documents(300), 300)
    out = root / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out, tok


def token_rows(tok, n_rows: int, width: int) -> np.ndarray:
    """Rows of `width` ids cut from the embedded corpus ([eot] doc [eot] doc ...)."""
    stream = TK.encode_documents(tok, DOC.default_documents(4000))
    assert len(stream) >= n_rows * width
    return stream[: n_rows * width].reshape(n_rows, width)


def write_parquet(path: Path, rows: np.ndarray, row_group_size: int | None = None,
                  extra: dict | None = None) -> Path:
    """A parquet file with an `input_ids` list<int32> column, as pico-lm's datasets."""
    cols = {"input_ids": pa.array([list(map(int, r)) for r in rows], pa.list_(pa.int32()))}
    cols.update(extra or {})
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def write_arrow(path: Path, rows: np.ndarray, stream: bool) -> Path:
    """An Arrow IPC file: stream format (what datasets' save_to_disk writes) or file format."""
    table = pa.table({"input_ids": pa.array([list(map(int, r)) for r in rows],
                                            pa.list_(pa.int64()))})
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
        writer.write_table(table, max_chunksize=3)
        writer.close()
    return path


@pytest.fixture(scope="module")
def dataset_source(tmp_path_factory):
    """The tokenizer directory and token rows of `dataset`, trained and cut once per module."""
    tok_dir, tok = tokenizer_dir(tmp_path_factory.mktemp("study-tokenizer"))
    return tok_dir, tok, token_rows(tok, 60, SMALL["seq_len"] + 1)


@pytest.fixture
def dataset(tmp_path, dataset_source):
    """A parquet dataset directory of 2 shards (small row groups) and a tokenizer directory,
    each test's own (the tokenizer and rows come from `dataset_source`)."""
    import shutil

    source_dir, tok, rows = dataset_source
    tok_dir = Path(shutil.copytree(source_dir, tmp_path / "tokenizer"))
    rows = rows.copy()
    data = tmp_path / "dolma" / "data"
    data.mkdir(parents=True)
    write_parquet(data / "train-00000-of-00002.parquet", rows[:25], row_group_size=7)
    write_parquet(data / "train-00001-of-00002.parquet", rows[25:], row_group_size=10)
    return tmp_path / "dolma", tok_dir, tok, rows


# ------------------------------------------------------------------ the study configs


def _hand_count(V: int, d: int, hidden: int, layers: int = 12, heads: int = 12, kv: int = 4,
                r: int | None = None) -> tuple[int, int]:
    """(total, trainable) by hand: two V × d embeddings, per layer q/o (d × d), k/v
    (d × kv·hd), three SwiGLU matrices d × hidden and two norms, a final norm; LoRA adds
    r·(in + out) per wrapped matrix and freezes the wrapped W."""
    hd = d // heads
    mats = [(d, d), (d, kv * hd), (d, kv * hd), (d, d), (d, hidden), (d, hidden), (hidden, d)]
    dense = layers * sum(a * b for a, b in mats)
    norms = layers * 2 * d + d
    emb = 2 * V * d
    if r is None:
        return emb + dense + norms, emb + dense + norms
    lora = layers * sum(r * (a + b) for a, b in mats)
    return emb + dense + norms + lora, emb + norms + lora


# the study's write-up, in millions, to one decimal
STUDY_COUNTS = {"decoder-tiny": (11.2, None), "decoder-small": (64.6, None),
                "relora-tiny": (11.6, 10.0), "relora-small": (66.1, 40.2)}


@pytest.mark.parametrize("name", STUDY)
def test_study_config_parameter_counts(name):
    """Each study config, read as `dynlab train --config` reads it, builds (on the meta device)
    a model with the hand-computed parameter count, and that count is the study's figure to
    the precision it was printed with (one decimal of a million: |ours - study| < 0.1 M).
    Exact: decoder tiny 11,282,784, small 64,595,328; relora tiny 11,682,144 / 10,060,128
    trainable, small 66,192,768 / 40,240,512."""
    kind = name.split("-")[0]
    cfg = make_config(kind, {}, CONFIGS / f"{name}.yaml").resolved()
    assert cfg.model_vocab_size == 50304  # pico-train's VOCAB_SIZE (the OLMo tokenizer, padded)
    model = costs.meta_model(cfg, cfg.model_vocab_size)
    assert next(model.parameters()).device.type == "meta"
    counts = costs.parameter_counts(model)
    d, hidden = (96, 384) if "tiny" in name else (384, 1536)
    total, trainable = _hand_count(50304, d, hidden, r=16 if kind == "relora" else None)
    assert (counts["total"], counts["trainable"]) == (total, trainable)
    assert counts["embedding"] == 2 * 50304 * d
    assert counts["non_embedding"] == total - 2 * 50304 * d
    study_total, study_trainable = STUDY_COUNTS[name]
    assert abs(total / 1e6 - study_total) < 0.1
    if study_trainable is not None:
        assert abs(trainable / 1e6 - study_trainable) < 0.1


@pytest.mark.parametrize("name", STUDY)
def test_study_config_values_and_sources(name):
    """The study's values (pico-train defaults + relora-pico configs), each with a comment."""
    kind = name.split("-")[0]
    text = (CONFIGS / f"{name}.yaml").read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every value has its source: inline or just above
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), line
    raw = yaml.safe_load(text)
    cfg = make_config(kind, {}, CONFIGS / f"{name}.yaml").resolved()
    assert (cfg.global_batch_size, cfg.seq_len, cfg.steps) == (1024, 2048, 20000)
    assert cfg.global_batch_size * cfg.seq_len * cfg.steps == 41_943_040_000  # 41.9 B tokens
    assert (cfg.lr, cfg.weight_decay, cfg.checkpoint_every, cfg.ld_batch_size) == (
        3e-4, 0.01, 1000, 128)
    assert cfg.data == "pico-lm/pretokenized-dolma"
    assert cfg.tokenizer == "allenai/OLMo-7B-0724-hf"
    assert cfg.eval_ppl == "pico-lm/pretokenized-paloma-tinsy"
    assert cfg.eval_blimp == "nyu-mll/blimp"
    if kind == "decoder":  # linear warmup 2500, linear decay over max_steps 200 000
        assert (cfg.warmup_steps, cfg.schedule_horizon) == (2500, 200000)
    else:
        assert (cfg.warmup_steps, cfg.min_lr_ratio, cfg.restart_warmup_steps,
                cfg.reset_every, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (
            2000, 0.1, 100, 2000, 16, 32, 0.1)
        assert cfg.paper_compat is True and raw["paper-compat"] is True
        fixed = make_config(kind, dict(paper_compat=False), CONFIGS / f"{name}.yaml")
        assert fixed.resolved().paper_compat is False  # --no-paper-compat wins
    # the study's 16 GPUs: micro-batch 16 (tiny) / 8 (small) with accumulation 4 / 8
    micro = 16 if "tiny" in name else 8
    derived = apply_batch(cfg, 16, micro)
    assert (derived.grad_accum, derived.batch_size) == ((4, 256) if "tiny" in name else (8, 128))


def test_decoder_study_schedule_horizon():
    """With the study's 200 000-step horizon the decoder's lr at step 20 000 is
    (200 000 - 19 999) / (200 000 - 2500) of the peak; with a run-length horizon it reaches
    0 at the last update."""
    from dynlab.training.schedules import lr_multiplier

    assert lr_multiplier(19_999, kind="decoder", warmup=2500, total=200_000) == pytest.approx(
        180_001 / 197_500)
    assert lr_multiplier(19_999, kind="decoder", warmup=2500, total=20_000) == pytest.approx(
        1 / 17_500)


# ------------------------------------------------------------------ global batch


@pytest.mark.parametrize("G,W,m,expect", [
    (1024, 16, 16, (16, 4)), (1024, 16, 8, (8, 8)), (1024, 1, 64, (64, 16)),
    (1024, 4, None, (256, 1)), (12, 3, 2, (2, 2)),
])
def test_split_global_batch(G, W, m, expect):
    micro, accum = split_global_batch(G, W, m)
    assert (micro, accum) == expect
    assert W * micro * accum == G  # the update is the global batch whatever W


@pytest.mark.parametrize("G,W,m,msg", [
    (1024, 3, None, "not divisible by the 3 processes"),
    (1024, 16, 48, "must divide the per-process share 64"),
])
def test_split_global_batch_errors(G, W, m, msg):
    with pytest.raises(InputError, match=msg):
        split_global_batch(G, W, m)


def test_global_batch_excludes_batch_size():
    with pytest.raises(ValueError, match="not both"):
        make_config("decoder", dict(global_batch_size=8, batch_size=2))
    # presets tiny..large carry pico-train's global batch unless --batch-size is given
    assert make_config("decoder", dict(preset="tiny")).resolved().global_batch_size == 1024
    cfg = make_config("decoder", dict(preset="tiny", batch_size=8)).resolved()
    assert (cfg.global_batch_size, cfg.batch_size) == (None, 8)


# ------------------------------------------------------------------ pre-tokenised rows


def test_local_rows_across_files_and_row_groups(dataset):
    root, _, _, rows = dataset
    src = P.open_rows(str(root))
    assert isinstance(src, P.LocalRows) and src.n_rows == 60
    width = rows.shape[1]
    for first, count in [(0, 60), (5, 9), (20, 10), (24, 2), (59, 1)]:
        np.testing.assert_array_equal(src.read(first, count, width), rows[first:first + count])


@pytest.mark.parametrize("stream", [True, False])
def test_arrow_rows_and_save_to_disk_order(tmp_path, stream):
    rows = np.arange(12 * 5).reshape(12, 5)
    d = tmp_path / "saved"
    d.mkdir()
    write_arrow(d / "data-00000-of-00002.arrow", rows[6:], stream)
    write_arrow(d / "data-00001-of-00002.arrow", rows[:6], stream)
    # datasets.Dataset.save_to_disk lists the shard order in state.json
    (d / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00001-of-00002.arrow"}, {"filename": "data-00000-of-00002.arrow"}]}))
    src = P.open_rows(str(d))
    np.testing.assert_array_equal(src.read(0, 12, 5), rows)
    np.testing.assert_array_equal(src.read(4, 4, 5), rows[4:8])


def test_rows_sharded_deterministically_and_resumable(dataset):
    """Rank r of W takes samples r, r + W, ... of each global micro-batch: the union over ranks
    is the single process's batch; iterating from a position equals continuing; the data wraps
    to the first training row at its end."""
    root, tok_dir, tok, rows = dataset
    data = P.load_rows(P.open_rows(str(root)), 16, 3, tok, None, str(root))
    np.testing.assert_array_equal(data.ld_batch.numpy(), rows[:3])  # held out
    assert data.n_windows == 57
    def take(it, n=5):
        return [next(it)[1] for _ in range(n)]

    one = take(data.iter_batches(0, 4))
    assert torch.equal(one[0], torch.from_numpy(rows[3:7]))
    for W in (2, 4):
        per_rank = [take(data.iter_batches(0, 4 // W, r, W)) for r in range(W)]
        for k in range(5):
            merged = torch.empty_like(one[k])
            for r in range(W):
                merged[r::W] = per_rank[r][k]
            assert torch.equal(merged, one[k])
    it = data.iter_batches(0, 4)
    for _ in range(3):
        pos, _ = next(it)
    assert pos == 12
    assert torch.equal(next(data.iter_batches(pos, 4))[1], next(it)[1])
    # wrap: samples 55, 56 are rows 58, 59; samples 57, 58 are rows 3, 4 again
    np.testing.assert_array_equal(data.samples(55, 4), rows[[58, 59, 3, 4]])


def test_rows_bad_input(dataset, tmp_path):
    root, tok_dir, tok, rows = dataset
    with pytest.raises(InputError, match=r"17 ids; expected seq_len \+ 1 = 33"):
        P.load_rows(P.open_rows(str(root)), 32, 3, tok, None, str(root))
    bad = write_parquet(tmp_path / "bad.parquet", rows[:8] * 0 + 400)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        P.load_rows(P.open_rows(str(bad)), 16, 3, tok, None, str(bad))
    pq.write_table(pa.table({"tokens": [[1, 2]]}), tmp_path / "nocol.parquet")
    with pytest.raises(InputError, match="no `input_ids` column"):
        P.open_rows(str(tmp_path / "nocol.parquet"))
    with pytest.raises(InputError, match="smaller than the tokenizer"):
        P.model_vocab(tok, 10)


def test_missing_row_file_and_missing_tokenizer(dataset, tmp_path):
    root, _, _, _ = dataset
    with pytest.raises(FileNotFoundError, match=r"missing.parquet: file not found"):
        _train("decoder", tmp_path / "r", data=str(tmp_path / "missing.parquet"), steps=1,
               global_batch_size=2, **SMALL)
    with pytest.raises(ValueError, match="pre-tokenised data needs --tokenizer"):
        _train("decoder", tmp_path / "r", data=str(root), steps=1, global_batch_size=2,
               **SMALL)


def test_tokenizer_by_directory(dataset, tmp_path):
    _, tok_dir, tok, _ = dataset
    by_dir = TK.load_tokenizer(tok_dir)
    assert by_dir.get_vocab() == tok.get_vocab()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        TK.load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="file not found"):
        TK.load_tokenizer(tmp_path / "no" / "such")
    with pytest.raises(FileNotFoundError, match="file not found"):
        TK.load_tokenizer("no/tokenizer.json")


def test_streamed_rows_are_the_local_rows(dataset, monkeypatch):
    """The streaming reader (`datasets`, streaming=True, `.skip` to resume) gives the same
    rows, sharded the same way, as the local reader: here `datasets` streams the local parquet
    directory (offline), as it would stream pico-lm/pretokenized-dolma from the Hub."""
    pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, _, tok, rows = dataset
    local = P.load_rows(P.open_rows(str(root)), 16, 3, tok, None, str(root))
    streamed = P.load_rows(P.HubRows(str(root)), 16, 3, tok, None, str(root))
    assert torch.equal(local.ld_batch, streamed.ld_batch)
    for rank in (0, 1):
        a, b = local.iter_batches(8, 2, rank, 2), streamed.iter_batches(8, 2, rank, 2)
        for _ in range(4):
            (pa_, ba), (pb, bb) = next(a), next(b)
            assert pa_ == pb and torch.equal(ba, bb)


def test_hub_names_need_datasets_with_a_clear_message():
    """`datasets` is optional: streaming a Hub dataset without it says what to install."""
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"dynlab\[data\]"):
        P.HubRows("pico-lm/pretokenized-dolma")


# ------------------------------------------------------------------ training on rows


def _train(kind, out, **opts):
    from dynlab.training.trainer import train

    return train(kind, out=str(out), **opts)


@pytest.mark.slow
def test_study_config_trains_on_local_rows(dataset, tmp_path):
    """`configs/study/relora-tiny.yaml` as it is (the study's 11.7 M-parameter model, vocabulary
    50 304, paper-compat) trains a few steps on CPU on a local parquet dataset and tokenizer
    directory: only the scale (steps, sequence length, global and micro batch, learning-
    dynamics batch) and the evaluation (no network) are overridden."""
    tok_dir, tok = tokenizer_dir(tmp_path / "t")
    rows = token_rows(tok, 24, 33)
    data = write_parquet(tmp_path / "rows.parquet", rows)
    out = tmp_path / "run"
    _train("relora", out, config=CONFIGS / "relora-tiny.yaml", data=str(data),
           tokenizer=str(tok_dir), steps=2, seq_len=32, global_batch_size=4,
           micro_batch_size=2, ld_batch_size=2, eval_every=0, device="cpu", threads=1,
           progress=False, log_every=1)
    run = json.loads((out / "run.json").read_text())
    assert run["parameters"] == {"total": 11_682_144, "trainable": 10_060_128}
    assert run["model"]["vocab_size"] == 50304
    assert run["relora"]["paper_compat"] is True
    assert (run["train"]["global_batch_size"], run["train"]["batch_size"],
            run["train"]["grad_accum"]) == (4, 2, 2)
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert [r["tokens"] for r in recs] == [0, 128, 256]  # 4 sequences × 32 tokens per update
    # step 0's loss is the initial model's loss on the first global micro-batch: rows 2, 3
    # (rows 0, 1 are the learning-dynamics batch)
    from dynlab.model import load_checkpoint_model

    model = load_checkpoint_model(out / "checkpoints" / "step_0")
    x = torch.from_numpy(rows[2:4])
    with torch.no_grad():
        ref = F.cross_entropy(model(x[:, :-1]).reshape(-1, 50304), x[:, 1:].reshape(-1))
    assert recs[0]["loss"] == pytest.approx(ref.item(), rel=1e-5)


def test_rows_resume_at_the_exact_row(dataset, tmp_path):
    """Interrupted after step 3 and resumed, a run on parquet rows ends with the weights of the
    uninterrupted run (same rows in the same order); GPU-hours keep accumulating."""
    root, tok_dir, _, _ = dataset
    opts = dict(data=str(root), tokenizer=str(tok_dir), steps=6, global_batch_size=4,
                micro_batch_size=2, checkpoint_every=3, lr=3e-3, warmup_steps=1, **SMALL)
    _train("decoder", tmp_path / "full", **opts)
    _train("decoder", tmp_path / "cut", stop_at=4, **opts)
    _train("decoder", tmp_path / "cut", resume=True, progress=False)
    a = load_file(str(tmp_path / "full/checkpoints/step_6/weights.safetensors"))
    b = load_file(str(tmp_path / "cut/checkpoints/step_6/weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["loss"] for r in full] == [r["loss"] for r in cut]
    g = [r["gpu_hours"] for r in cut]
    assert all(x >= 0 for x in g) and g == sorted(g)


# ------------------------------------------------------------------ GPU-hours


def test_gpu_hours_in_metrics_store_and_figure(dataset, tmp_path):
    """gpu_hours = wall-clock × processes / 3600 in metrics.jsonl and meta.json, carried into
    the store by `dynlab analyze`, and the training-curve figure's time axis."""
    import dynlab
    from dynlab.viz.figures import training_curves

    root, tok_dir, _, _ = dataset
    out = tmp_path / "run"
    _train("decoder", out, data=str(root), tokenizer=str(tok_dir), steps=2,
           global_batch_size=2, checkpoint_every=1, **SMALL)
    metas = {s: json.loads((p / "meta.json").read_text()) for s, p in complete_checkpoints(out)}
    for r in read_metrics(out):  # a checkpointed step logs its checkpoint's value
        assert r["gpu_hours"] == metas[r["step"]]["gpu_hours"]
        assert r["gpu_hours"] * 3600 == pytest.approx(metas[r["step"]]["wall_seconds"],
                                                      abs=1e-3)
    store = dynlab.analyze([out], tmp_path / "a.zarr", metrics="per", kinds="weights",
                           progress=False)
    ds = dynlab.open_store(store)
    got = ds["gpu_hours"].sel(run="run").values
    want = [metas[int(s)]["gpu_hours"] for s in ds["step"].values]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    fig = training_curves(ds, time="gpu")
    series = [t for t in fig.data if t.meta and t.meta.get("x") == "gpu_hours"]
    assert series
    np.testing.assert_allclose(series[0].x, want, rtol=1e-12)
    assert training_curves(ds).layout.title.text.endswith("GPU-hours (bottom)")
    wall = training_curves(ds, time="wall")
    assert any(t.meta and t.meta.get("x") == "hours" for t in wall.data)


# ------------------------------------------------------------------ pre-tokenised Paloma


def test_pretokenized_paloma_perplexity_matches_hand_computation(dataset, tmp_path):
    """Pre-tokenised sequences are scored as they are (first id is context, no BOS added),
    in windows of the context for a longer sequence, per domain from a `source` column:
    ppl_d = exp(sum NLL / sum scored tokens), against a direct forward pass."""
    from dynlab.eval import evaluate, load_eval_data
    from dynlab.model.pico_decoder import ModelConfig, PicoDecoder

    _, _, tok, _ = dataset
    torch.manual_seed(0)
    ctx = 8
    model = PicoDecoder(ModelConfig(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                                    activation_hidden_dim=32, vocab_size=300,
                                    max_seq_len=ctx)).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 300, n).tolist() for n in (5, 9, 20, 3, 9)]
    src = ["a", "a", "b", "b", "b"]
    path = tmp_path / "paloma.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(seqs, pa.list_(pa.int32())),
                             "source": src}), path)
    data = load_eval_data(ppl=path, blimp="none")
    res = evaluate(model, tok, data, batch_size=2)["perplexity"]

    def nll(ids):  # non-overlapping windows of ctx inputs, each with fresh context
        total, n, start = 0.0, 0, 0
        while start < len(ids) - 1:
            seg = torch.tensor(ids[start:start + ctx + 1])
            with torch.no_grad():
                logp = torch.log_softmax(model(seg[None, :-1])[0].double(), -1)
            total -= logp[torch.arange(len(seg) - 1), seg[1:]].sum().item()
            n += len(seg) - 1
            start += ctx
        return total, n

    for dom in ("a", "b"):
        sums = [nll(s) for s, d in zip(seqs, src, strict=True) if d == dom]
        want = math.exp(sum(t for t, _ in sums) / sum(n for _, n in sums))
        assert res["by_domain"][dom] == pytest.approx(want, rel=1e-6)  # float32 logits
    assert res["macro"] == pytest.approx(np.mean(list(res["by_domain"].values())))
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2, 999]], pa.list_(pa.int32()))}), big)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        evaluate(model, tok, load_eval_data(ppl=big, blimp="none"), on_error="fail")


# ------------------------------------------------------------------ --dry-run


def test_dry_run_prints_the_study_numbers():
    """`dynlab train relora --config configs/study/relora-tiny.yaml --dry-run`: parameters,
    tokens, FLOPs (6N-style dense term + PaLM attention), memory and GPU-hours, each checked
    against a hand computation; nothing is written."""
    from dynlab_cli.main import app

    res = CliRunner().invoke(app, ["train", "relora", "--config",
                                   str(CONFIGS / "relora-tiny.yaml"), "--dry-run",
                                   "--micro-batch-size", "16", "--nproc", "16"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "11,682,144 total (11.68 M), 10,060,128 trainable (10.06 M)" in out
    assert "9,658,368 embedding, 2,023,776 non-embedding" in out
    assert "16 device(s) × micro-batch 16 (--micro-batch-size) × 4 accumulation" in out
    assert "2,097,152 per step, 41,943,040,000 in 20,000 steps (41.9 B)" in out
    assert "assumed MFU of 30%" in out and "H100" in out

    cfg = make_config("relora", dict(micro_batch_size=16), CONFIGS / "relora-tiny.yaml"
                      ).resolved()
    e = costs.estimate(cfg, 16, "h100", 0.3)
    d, L, V, T, r = 96, 12, 50304, 2048, 16
    mats = [(d, d), (d, 32), (d, 32), (d, d), (d, 384), (d, 384), (384, d)]
    W = L * sum(a * b for a, b in mats)  # frozen, used in the forward
    lora = L * sum(r * (a + b) for a, b in mats)
    head = V * d  # de_embedding_proj (trained); the input embedding is a lookup
    dense = 4 * (W + lora + head) + 2 * (lora + head)
    attention = 12 * L * 12 * 8 * T
    assert e["flops_per_token"]["dense"] == dense
    assert e["flops_per_token"]["attention"] == attention
    assert e["flops_total"] == (dense + attention) * 1024 * T * 20000
    assert e["gpu_hours"] == pytest.approx(e["flops_total"] / (989e12 * 0.3) / 3600)
    assert e["wall_hours"] == pytest.approx(e["gpu_hours"] / 16)
    mem = e["memory"]
    assert mem["parameters"] == 4 * 11_682_144 and mem["optimizer"] == 8 * 10_060_128
    assert mem["ddp_buckets"] == 4 * 10_060_128
    assert mem["activations"] == 34 * L * 16 * T * d + 10 * 16 * T * V
    # the decoder: 6N + attention
    dec = costs.estimate(make_config("decoder", {}, CONFIGS / "decoder-tiny.yaml").resolved())
    n = 12 * sum(a * b for a, b in mats) + V * d
    assert dec["flops_per_token"]["dense"] == 6 * n


def test_dry_run_counts_local_rows(dataset):
    """With a local pre-tokenised --data the preview counts its rows (metadata only) against
    the rows the run reads: the learning-dynamics batch plus steps × global batch."""
    root, tok_dir, _, _ = dataset
    cfg = make_config("decoder", dict(data=str(root), tokenizer=str(tok_dir), steps=30,
                                      global_batch_size=4, **SMALL)).resolved()
    e = costs.estimate(cfg)
    assert (e["data_rows"], e["rows_needed"]) == (60, 3 + 4 * 30)
    assert "60 rows; the run reads 123 (2.05 passes over the data)" in "\n".join(
        costs.format_estimate(e))
    assert e["vocab_size"] == 300 and e["vocab_source"].startswith("tokenizer")


def test_dry_run_bad_options():
    from dynlab_cli.main import app

    res = CliRunner().invoke(app, ["train", "decoder", "--config",
                                   str(CONFIGS / "decoder-tiny.yaml"), "--dry-run",
                                   "--gpu", "tpu"])
    assert res.exit_code == 2 and "unknown; choose one of" in res.output
    res = CliRunner().invoke(app, ["train", "decoder", "--config",
                                   str(CONFIGS / "decoder-tiny.yaml"), "--dry-run",
                                   "--nproc", "3"])
    assert res.exit_code == 2 and "not divisible by the 3 processes" in res.output


# ------------------------------------------------------------------ multi-node torchrun


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_through_c10d_rendezvous(dataset, tmp_path):
    """Two torchrun agents, one process each, standing in for 2 nodes × 1 GPU: they meet
    through the real c10d rendezvous on 127.0.0.1 (`--nnodes 2 --rdzv-backend c10d
    --rdzv-endpoint`), train on the same parquet rows with the global batch split across the
    nodes, and match a single process (loss curve and final weights within 1e-5); rank 0 alone
    writes the run, and GPU-hours count both processes."""
    root, tok_dir, _, _ = dataset
    common = ["--data", str(root), "--tokenizer", str(tok_dir), "--steps", "4",
              "--global-batch-size", "4", "--micro-batch-size", "1", "--checkpoint-every", "4",
              "--lr", "3e-3", "--warmup-steps", "1", "--preset", "micro", "--d-model", "16",
              "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--hidden-dim", "32",
              "--max-seq-len", "64", "--seq-len", "16", "--ld-batch-size", "3",
              "--eval-every", "0", "--no-progress", "--log-every", "1", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DYNLAB_CACHE=str(tmp_path / "cache"))
    # the single-process reference, in this process (same options as `common`)
    _train("decoder", tmp_path / "one", data=str(root), tokenizer=str(tok_dir), steps=4,
           global_batch_size=4, micro_batch_size=1, checkpoint_every=4, lr=3e-3,
           warmup_steps=1, **SMALL)
    port = _free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "study",
         "--local-addr", "127.0.0.1", "--max-restarts", "0",
         "-m", "dynlab", "train", "decoder", "--out", str(tmp_path / "two"), *common],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [a.communicate(timeout=300) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    for a in agents:
        assert a.returncode == 0, "\n----\n".join(e[-4000:] for _, e in results)
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["distributed"]["world_size"] == 2
    assert (run["train"]["batch_size"], run["train"]["grad_accum"]) == (2, 2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    # every update's loss; step 0's is measured on the first global micro-batch, which is
    # micro-batch × processes sequences, so it differs between W = 1 and W = 2 by design
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in two[1:]], [r["loss"] for r in one[1:]],
                               atol=1e-5)
    metas = {s: json.loads((p / "meta.json").read_text())
             for s, p in complete_checkpoints(tmp_path / "two")}
    for r in two:  # two processes: GPU-hours are twice the wall-clock
        wall = metas[r["step"]]["wall_seconds"] if r["step"] in metas else r["wall_seconds"]
        assert r["gpu_hours"] * 3600 == pytest.approx(2 * wall, abs=1e-2)
    a = load_file(str(tmp_path / "one/checkpoints/step_4/weights.safetensors"))
    b = load_file(str(tmp_path / "two/checkpoints/step_4/weights.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    meta = json.loads((tmp_path / "two/checkpoints/step_4/meta.json").read_text())
    assert meta["ranks_in_step"] is True
    assert not re.search(r"\.tmp-", " ".join(p.name for p in (tmp_path / "two").rglob("*")))
