"""`dynlab export --format tensorboard|wandb` and `dynlab train --log`: what the files hold,
read back with each tool's own reader (TensorBoard's EventAccumulator; wandb's protobuf
records of the offline run), equals the store / metrics.jsonl."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from builders import TINY_SPEC_ARGS

import dynlab
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run

pytest.importorskip("tensorboard")
SPEC = ModelSpec(**TINY_SPEC_ARGS)


def cli(*args):
    from typer.testing import CliRunner

    from dynlab_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    def meta(step):  # what the trainer records at each checkpoint
        return {"train_loss": 5.0 - step / 7, "lr": 1e-3 * (1 + step), "tokens": 64 * step}

    dec = make_run(root / "dec", SPEC, [0, 10, 20], meta=meta)
    rel = make_run(root / "rel", SPEC, [0, 10], relora={"r": 4, "alpha": 8}, seed=2, meta=meta)
    return dynlab.analyze([dec, rel], root / "s.zarr", metrics="per,cn", progress=False,
                          device="cpu")


def accumulator(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    return ea


def tb_scalar(ea, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in ea.Scalars(tag)}


def f32(v) -> float:
    """TensorBoard's scalars are float32 (its Summary.simple_value)."""
    return float(np.float32(float(v)))


def test_tensorboard_export_equals_the_store(store, tmp_path):
    out = tmp_path / "tb"
    res = cli("export", store, "--format", "tensorboard", "-o", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["dec", "rel"]  # one TensorBoard run each
    ds = xr.open_zarr(store)
    ea = accumulator(out / "dec")
    sel = ds.sel(run="dec")
    got = tb_scalar(ea, "per/layers.1.attention.v_proj.weights")
    want = sel.per.sel(kind="weights", layer=1, matrix="attention.v_proj")
    assert got == {int(s): f32(v) for s, v in zip(want.step.values, want.values, strict=True)}
    got = tb_scalar(ea, "cn/layers.0.ov_circuit.updates.heads.2")
    want = sel.head_cn.sel(kind="updates", layer=0, head=2)
    # updates start at the second checkpoint: step 0 has none (NaN in the store, no point)
    assert got == {int(s): f32(v) for s, v in zip(want.step.values, want.values, strict=True)
                   if np.isfinite(v)}
    assert sorted(got) == [10, 20]
    got = tb_scalar(ea, "per/de_embedding_proj.gradients")
    want = sel.emb_per.sel(kind="grads", embedding="de_embedding_proj")
    assert got == {int(s): f32(v) for s, v in zip(want.step.values, want.values, strict=True)}
    got = tb_scalar(ea, "per/layers.1.qk_circuit.weights")
    want = sel.qk_per.sel(kind="weights", layer=1)
    assert got == {int(s): f32(v) for s, v in zip(want.step.values, want.values, strict=True)}
    # every per-checkpoint value the store has (NaN ones left out), bookkeeping excepted
    per_step = [n for n, da in sel.data_vars.items() if da.dims == ("step",)
                and n not in ("analyzed", "prev_step") and np.isfinite(da.values).any()]
    assert {"train_loss", "lr", "tokens"} <= set(per_step)
    for name in per_step:
        assert tb_scalar(ea, f"training/{name}") == {
            int(s): f32(v) for s, v in zip(sel.step.values, sel[name].values, strict=True)
            if np.isfinite(v)}, name
    assert not [t for t in ea.Tags()["scalars"] if t in ("training/analyzed",
                                                          "training/prev_step")]
    # the relora run has its LoRA products; the decoder run has none
    rel = accumulator(out / "rel")
    lora = rel.Tags()["scalars"]
    assert "per/layers.0.swiglu.w_2.lora" in lora
    assert not [t for t in ea.Tags()["scalars"] if t.endswith(".lora")]
    want = ds.sel(run="rel").per.sel(kind="lora", layer=0, matrix="swiglu.w_2")
    assert tb_scalar(rel, "per/layers.0.swiglu.w_2.lora") == {
        int(s): f32(v) for s, v in zip(want.step.values, want.values, strict=True)
        if np.isfinite(v)}
    # the spectra as histograms: count, extremes and sums of the stored singular values
    h = {e.step: e.histogram_value for e in ea.Histograms("sigma/layers.0.swiglu.w_2.weights")}
    assert sorted(h) == [0, 10, 20]
    for step, hv in h.items():
        s = sel.sigma.sel(kind="weights", layer=0, matrix="swiglu.w_2", step=step).values
        s = s[np.isfinite(s)]
        assert hv.num == s.size == 32
        assert (hv.min, hv.max) == (s.min(), s.max())
        assert hv.sum == pytest.approx(s.sum(), rel=1e-12)
        assert hv.sum_squares == pytest.approx(np.square(s).sum(), rel=1e-12)
        assert sum(hv.bucket) == s.size
        assert hv.bucket_limit[-1] == s.max()


def wandb_history(run_dir: Path) -> dict[int, dict[str, object]]:
    """step -> {key: value} from an offline run's .wandb file: wandb's record framing (a
    ':W&B' header, then 32 KiB blocks of LevelDB-log records) holding wandb's own protobuf
    `Record` messages, parsed with wandb's classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    buf = Path(path).read_bytes()
    assert buf[:4] == b":W&B"
    pos, block, pending, history = 7, 32768, b"", {}
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        data, pos = buf[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (2, 3):  # FIRST, MIDDLE
            pending += data
            continue
        if kind not in (1, 4):  # FULL, LAST; anything else is padding
            continue
        rec = pb.Record()
        rec.ParseFromString(pending + data)
        pending = b""
        if rec.WhichOneof("record_type") == "history":
            row = history.setdefault(rec.history.step.num, {})
            for item in rec.history.item:
                row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history


@pytest.mark.slow
def test_wandb_export_is_an_offline_run_equal_to_the_store(store, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "wb"
    res = cli("export", store, "--format", "wandb", "-o", out, "--run", "rel")
    assert res.exit_code == 0, res.output
    assert [p.name for p in out.iterdir()] == ["rel"]  # always OUT/<run>/, even for one
    hist = wandb_history(out / "rel")
    ds = xr.open_zarr(store).sel(run="rel")
    assert sorted(hist) == [0, 10]
    for step in (0, 10):
        row = hist[step]
        assert row["per/layers.1.attention.v_proj.weights"] == float(
            ds.per.sel(kind="weights", layer=1, matrix="attention.v_proj", step=step))
        assert row["cn/layers.0.ov_circuit.weights.heads.3"] == float(
            ds.head_cn.sel(kind="weights", layer=0, head=3, step=step))
        assert row["training/tokens"] == float(ds.tokens.sel(step=step))
        # a wandb.Histogram of the 32 stored singular values (nested keys joined by "/")
        tag = "sigma/layers.0.swiglu.w_2.weights"
        assert row[f"{tag}/_type"] == "histogram"
        s = ds.sigma.sel(kind="weights", layer=0, matrix="swiglu.w_2", step=step).values
        assert sum(row[f"{tag}/values"]) == np.isfinite(s).sum() == 32
        assert (row[f"{tag}/bins"][0], row[f"{tag}/bins"][-1]) == (np.nanmin(s), np.nanmax(s))
    assert hist[10]["per/layers.0.swiglu.w_2.updates"] == float(
        ds.per.sel(kind="updates", layer=0, matrix="swiglu.w_2", step=10))
    assert "per/layers.0.swiglu.w_2.updates" not in hist[0]  # NaN in the store: left out


TRAIN = dict(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=32,
             seq_len=16, batch_size=2, ld_batch_size=3, vocab_size=300, n_documents=150,
             progress=False, steps=6, checkpoint_every=3, warmup_steps=2, threads=1,
             eval_every=3, log_every=2, eval_ppl_docs=4, eval_pairs_per_uid=2)


def metrics_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_log_tensorboard_equals_metrics_jsonl(tmp_path):
    run = dynlab.train("decoder", out=str(tmp_path / "run"), log="tensorboard", **TRAIN)
    lines = metrics_lines(run)
    ea = accumulator(run / "tensorboard")
    assert tb_scalar(ea, "train/loss") == {r["step"]: f32(r["loss"]) for r in lines}
    assert tb_scalar(ea, "train/lr") == {r["step"]: f32(r["lr"]) for r in lines}
    assert tb_scalar(ea, "train/tokens_per_second") == {
        r["step"]: f32(r["tokens_per_second"]) for r in lines}
    evaluated = [r for r in lines if "eval" in r]
    assert [r["step"] for r in evaluated] == [0, 3, 6]
    assert tb_scalar(ea, "eval/ppl_macro") == {
        r["step"]: f32(r["eval"]["perplexity"]["macro"]) for r in evaluated}
    assert tb_scalar(ea, "eval/blimp_overall") == {
        r["step"]: f32(r["eval"]["blimp"]["overall"]) for r in evaluated}
    domain = sorted(evaluated[0]["eval"]["perplexity"]["by_domain"])[0]
    assert tb_scalar(ea, f"eval/ppl/{domain}") == {
        r["step"]: f32(r["eval"]["perplexity"]["by_domain"][domain]) for r in evaluated}


@pytest.mark.slow
def test_train_log_wandb_equals_metrics_jsonl(tmp_path):
    pytest.importorskip("wandb")
    run = dynlab.train("decoder", out=str(tmp_path / "run"), log="wandb", **TRAIN)
    lines = metrics_lines(run)
    hist = wandb_history(run)
    assert sorted(hist) == [r["step"] for r in lines]
    for r in lines:
        assert hist[r["step"]]["train/loss"] == r["loss"]
        assert hist[r["step"]]["train/lr"] == r["lr"]
        if "eval" in r:
            assert hist[r["step"]]["eval/ppl_macro"] == r["eval"]["perplexity"]["macro"]


def test_bad_log_and_format_are_input_errors(tmp_path, store):
    with pytest.raises(ValueError, match="--log: expected tensorboard or wandb"):
        dynlab.train("decoder", out=str(tmp_path / "r"), log="mlflow", **TRAIN)
    res = cli("export", store, "--format", "mlflow", "-o", tmp_path / "x")
    assert res.exit_code == 2
    assert not (tmp_path / "x").exists()
