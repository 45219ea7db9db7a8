"""`dynlab eval` on every source, in the field's units, into the store: the mean token loss
against transformers' own loss, bits per byte by hand, pico-train / relora-pico losses against
a forward written out by hand, Paloma's layout, bad inputs, and the store's guarantees."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

transformers = pytest.importorskip("transformers")

import hf_fixtures as fx  # noqa: E402
from test_models import by_hand_pico_logits  # noqa: E402
from test_sources_pico import SPEC, write_pico_run  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import dynlab  # noqa: E402
from dynlab.eval import EvalData  # noqa: E402
from dynlab.eval.perplexity import PretokenizedDocs  # noqa: E402
from dynlab.eval.sources import EvalOptions, evaluate_checkpoint, evaluate_sources  # noqa: E402
from dynlab.sources import open_sources  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BIN = Path(sys.executable).parent / "dynlab"
LN2 = math.log(2)


def docs(seed: int, n: int, length: int = 30) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        idx = torch.randint(0, len(fx.CHARS), (length + 7 * k,), generator=gen).tolist()
        out.append("".join(fx.CHARS[i] for i in idx).strip() or "a")
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfe")
    for arch in ("llama", "gpt_neox", "gpt2"):
        fx.train_and_save(arch, root / arch, (0, 2) if arch == "gpt2" else (2,))
        fx.save_tokenizer(root / arch)
    return root


def hf_loss(model_dir: Path, ids: list[int]) -> float:
    """transformers' own mean next-token loss of ids (model(ids, labels=ids).loss)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


def encode(model_dir: Path, text: str) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir.parent)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_mean_token_loss_is_transformers_own_and_bpb_by_hand(hf, arch):
    (run,) = open_sources([hf / arch])
    ckpt = run.checkpoints[-1]
    one, many = docs(1, 1), docs(2, 3)
    data = EvalData({"one": one, "many": many}, [])
    res = evaluate_checkpoint(run, ckpt, data, EvalOptions())["perplexity"]
    # one document: exactly transformers' loss of [bos] + its ids (bos = the EOS, id 0)
    ids = [0, *encode(ckpt.path, one[0])]
    assert res["loss_by_domain"]["one"] == pytest.approx(hf_loss(ckpt.path, ids), abs=1e-5)
    # several: token-weighted mean of transformers' per-document losses; bpb from bytes
    losses, counts, n_bytes = [], [], []
    for d in many:
        ids = [0, *encode(ckpt.path, d)]
        losses.append(hf_loss(ckpt.path, ids))
        counts.append(len(ids) - 1)
        n_bytes.append(len(d.encode("utf-8")))
    nll = sum(a * n for a, n in zip(losses, counts, strict=True))
    assert res["loss_by_domain"]["many"] == pytest.approx(nll / sum(counts), abs=1e-5)
    assert res["tokens_by_domain"]["many"] == sum(counts)
    assert res["bytes_by_domain"]["many"] == sum(n_bytes)
    assert res["bpb_by_domain"]["many"] == pytest.approx(nll / (LN2 * sum(n_bytes)), abs=1e-5)
    assert res["by_domain"]["many"] == pytest.approx(math.exp(nll / sum(counts)), rel=1e-5)
    nll_one = res["loss_by_domain"]["one"] * res["tokens_by_domain"]["one"]
    pooled = (nll + nll_one) / (sum(counts) + res["tokens_by_domain"]["one"])
    assert res["loss"] == pytest.approx(pooled, abs=1e-5)
    assert res["loss_macro"] == pytest.approx(
        (res["loss_by_domain"]["one"] + res["loss_by_domain"]["many"]) / 2, abs=1e-12)
    assert (res["max_length"], res["stride"]) == (64, 64)


def write_gz(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def paloma(root: Path) -> dict[tuple[str, str], list[str]]:
    """Two domains in Paloma's layout (gzip jsonl, val/test, a `text` field); returns the
    documents by (domain, split)."""
    texts = {}
    for k, dom in enumerate(("c4_en", "wikitext")):
        for j, split in enumerate(("val", "test")):
            d = docs(10 + 2 * k + j, 2 + j)
            texts[dom, split] = d
            write_gz(root / dom / split / f"{split}_{dom}.jsonl.gz",
                     [{"text": t, "id": str(i), "source": "paloma"} for i, t in enumerate(d)])
    return texts


@pytest.mark.parametrize("split", ["val", "test"])
def test_paloma_layout_per_domain_by_hand(hf, tmp_path, split):
    texts = paloma(tmp_path / "paloma")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(_app(), ["eval", str(hf / "gpt2"), "--ppl", str(tmp_path / "paloma"),
                                      "--split", split, "--blimp", "none", "-o", str(out),
                                      "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())["gpt2"]
    assert [r["step"] for r in got] == [0, 2]
    model_dir = hf / "gpt2" / "step2"
    ppl = got[1]["perplexity"]
    assert sorted(ppl["by_domain"]) == ["c4_en", "wikitext"]  # the folder names
    for dom in ("c4_en", "wikitext"):
        nll = n = b = 0
        for t in texts[dom, split]:
            ids = [0, *encode(model_dir, t)]
            nll += hf_loss(model_dir, ids) * (len(ids) - 1)
            n += len(ids) - 1
            b += len(t.encode())
        assert ppl["by_domain"][dom] == pytest.approx(math.exp(nll / n), rel=1e-5)
        assert ppl["bpb_by_domain"][dom] == pytest.approx(nll / (LN2 * b), abs=1e-5)
    assert ppl["macro"] == pytest.approx(np.mean(list(ppl["by_domain"].values())), rel=1e-12)


def test_pretokenized_paloma_is_scored_as_it_is(hf, tmp_path):
    """input_ids records: the first id is context, every later id scored: transformers'
    labels=input_ids loss exactly, with no tokenizer needed."""
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, fx.VOCAB, (n,), generator=gen).tolist() for n in (9, 20, 33)]
    write_gz(tmp_path / "p" / "dom" / "val" / "val.jsonl.gz", [{"input_ids": s} for s in seqs])
    from dynlab.eval import load_eval_data

    data = load_eval_data(tmp_path / "p", "none")
    assert isinstance(data.ppl_domains["dom"], PretokenizedDocs)
    (run,) = open_sources([hf / "llama"])
    res = evaluate_checkpoint(run, run.checkpoints[0], data, EvalOptions())["perplexity"]
    d = run.checkpoints[0].path
    nll = sum(hf_loss(d, s) * (len(s) - 1) for s in seqs)
    assert res["tokens_by_domain"]["dom"] == sum(len(s) - 1 for s in seqs)
    assert res["loss"] == pytest.approx(nll / res["tokens_by_domain"]["dom"], abs=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(hf / "llama")
    n_bytes = sum(len(tok.decode(s[1:]).encode()) for s in seqs)
    assert res["bytes_by_domain"]["dom"] == n_bytes


def test_text_longer_than_the_context_is_scored_in_windows(hf):
    """A document of 150 tokens in a model of context 64: non-overlapping windows (each
    window's first token is context for the next), every token scored once."""
    (run,) = open_sources([hf / "gpt2"])
    ckpt = run.checkpoints[-1]
    text = "".join(fx.CHARS[(7 * i) % len(fx.CHARS)] for i in range(150))
    res = evaluate_checkpoint(run, ckpt, EvalData({"long": [text]}, []),
                              EvalOptions())["perplexity"]
    x = [0, *encode(ckpt.path, text)]
    assert len(x) == 151
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt.path).eval()
    nll = 0.0
    for a in range(0, 150, 64):  # windows read x[a .. a+63] and score x[a+1 .. a+64]
        w = torch.tensor([x[a: min(a + 64, 150) + 1]])
        with torch.no_grad():
            logits = model(input_ids=w[:, :-1]).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
    assert res["tokens_by_domain"]["long"] == 150
    assert res["loss"] == pytest.approx(nll / 150, abs=1e-5)
    with pytest.raises(dynlab.errors.InputError, match="--max-length 65 exceeds the context"):
        evaluate_checkpoint(run, ckpt, EvalData({"long": [text]}, []),
                            EvalOptions(max_length=65))


@pytest.mark.parametrize("relora", [None, True])
def test_pico_and_relora_loss_is_the_forward_by_hand(tmp_path, relora):
    cfg = None if relora is None else {"r": 2, "lora_alpha": 6, "trainable_scaling": True}
    written = write_pico_run(tmp_path / "run", relora=cfg, steps=(0, 5))
    gen = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, SPEC.vocab_size, (n,), generator=gen).tolist() for n in (6, 12)]
    data = EvalData({"d": PretokenizedDocs(seqs)}, [])
    results = evaluate_sources([tmp_path / "run"], data, EvalOptions())["run"]
    stored = written[5]["stored"]
    w = {k.removeprefix("pico_decoder."): v for k, v in stored.items()
         if not k.endswith((".A_lora.weight", ".B_lora.weight", ".s"))}
    for k in [k for k in stored if k.endswith(".A_lora.weight")]:  # W + s·B·A by hand
        m = k.removeprefix("pico_decoder.").removesuffix(".A_lora.weight")
        s = math.tanh(float(stored[f"pico_decoder.{m}.s"]))
        w[m + ".weight"] = (w[m + ".weight"].double()
                            + s * stored[f"pico_decoder.{m}.B_lora.weight"].double()
                            @ stored[k].double())
    nll = 0.0
    for seq in seqs:
        logits = by_hand_pico_logits(w, torch.tensor([seq[:-1]]))[0]
        nll -= float(torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1),
                                                   torch.tensor(seq[1:])].sum())
    got = results[1]["perplexity"]
    assert got["tokens_by_domain"]["d"] == 16
    assert got["loss"] == pytest.approx(nll / 16, rel=1e-5)
    assert math.isnan(got["bpb"])  # no tokenizer: bytes unknown


# ---------------------------------------------------------------- bad input (CLI, exit 2)


def _app():
    from dynlab_cli.main import app

    return app


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(_app(), ["eval", *map(str, args), "--no-progress", "--device",
                                      "cpu"])
    return res.exit_code, res.output


def test_bad_inputs_give_messages_and_write_nothing(hf, tmp_path):
    store = tmp_path / "s.zarr"
    run = hf / "gpt2"
    bad = tmp_path / "bad" / "dom" / "val" / "val.jsonl.gz"
    bad.parent.mkdir(parents=True)
    good = gzip.compress(b'{"text": "abc"}\n' * 50)
    bad.write_bytes(good[: len(good) // 2])  # truncated gzip
    code, out = cli(run, "--ppl", tmp_path / "bad", "--blimp", "none", "--store", store)
    assert code == 2 and "val.jsonl.gz" in out and "Traceback" not in out, out
    paloma(tmp_path / "p")
    (tmp_path / "p" / "extra" / "val").mkdir(parents=True)  # a domain with val only
    code, out = cli(run, "--ppl", tmp_path / "p", "--split", "test", "--blimp", "none",
                    "--store", store)
    assert code == 2 and "domain folder extra/ has no test/ split" in out, out
    from tokenizers import Tokenizer, models

    vocab = {"<|endoftext|>": 0} | {f"w{i}": i + 1 for i in range(fx.VOCAB)}
    Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")).save(str(tmp_path / "big.json"))
    code, out = cli(run, "--tokenizer", tmp_path / "big.json", "--store", store)
    assert code == 2 and "41 ids but the model" in out, out
    code, out = cli(run, "--max-length", 100, "--store", store, "--blimp", "none")
    assert code == 2 and "--max-length 100 exceeds the context" in out, out
    assert not store.exists()  # nothing written, not even a store


# ---------------------------------------------------------------- into the store


def pico_data(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(9)
    f = tmp_path / "tok" / "a.jsonl"
    f.parent.mkdir()
    f.write_text("".join(json.dumps({"input_ids": torch.randint(
        0, SPEC.vocab_size, (n,), generator=gen).tolist()}) + "\n" for n in (7, 11)))
    return f


def test_store_holds_the_results_and_survives_analysis(hf, tmp_path):
    pico = tmp_path / "pico"
    write_pico_run(pico, steps=(0, 5))
    data = pico_data(tmp_path)
    store = tmp_path / "s.zarr"
    from dynlab.eval import load_eval_data

    loaded = load_eval_data(data, "none")
    got = evaluate_sources([pico], loaded, EvalOptions(), store=store, metrics="per")
    ds = dynlab.open_store(store).load()
    assert ds.ppl_evaluated.values.tolist() == [[1, 1]]
    for r in got["pico"]:
        p = r["perplexity"]
        cell = ds.sel(run="pico", step=r["step"])
        assert float(cell.eval_loss) == p["loss"]
        assert float(cell.ppl.sel(domain="a")) == p["by_domain"]["a"]
        assert float(cell.eval_loss_domain.sel(domain="a")) == p["loss_by_domain"]["a"]
        assert float(cell.eval_tokens.sel(domain="a")) == 16
        assert float(cell.ppl_macro) == p["macro"]
    assert evaluate_sources([pico], loaded, EvalOptions(), store=store) == {}  # resumed: done
    dynlab.analyze([pico], store, metrics="per", progress=False, activations=False)
    # the analysis keeps the evaluation
    after = dynlab.open_store(store).load()
    assert after.analyzed.values.tolist() == [[1, 1]]
    xr.testing.assert_identical(after.eval_loss, ds.eval_loss)
    xr.testing.assert_identical(after.ppl, ds.ppl)
    with pytest.raises(dynlab.analysis.store.StoreError, match="use another store"):
        evaluate_sources([pico], loaded, EvalOptions(stride=3), store=store)


@pytest.mark.soak
@pytest.mark.slow  # real processes killed at the fault points
@pytest.mark.parametrize("fault", ["eval.write:kill", "eval.checkpoint:kill@2",
                                   "store.meta:kill@3"])
def test_killed_evaluation_resumes_to_the_one_go_store(tmp_path, fault):
    pico = tmp_path / "pico"
    write_pico_run(pico, steps=(0, 5, 10))
    data = pico_data(tmp_path)
    ref = tmp_path / "ref.zarr"
    cmd = [str(BIN), "eval", str(pico), "--ppl", str(data), "--blimp", "none", "--no-progress",
           "--device", "cpu", "-m", "per", "--store"]
    assert subprocess.run([*cmd, str(ref)], capture_output=True).returncode == 0
    out = tmp_path / "s.zarr"
    env = {**os.environ, "DYNLAB_FAULT": fault}
    res = subprocess.run([*cmd, str(out)], capture_output=True, text=True, env=env)
    assert res.returncode == -signal.SIGKILL, res.stderr
    rerun = subprocess.run([*cmd, str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    xr.testing.assert_identical(xr.open_zarr(out).load(), xr.open_zarr(ref).load())


@pytest.mark.soak
@pytest.mark.slow  # real processes: an analysis holding the store while eval waits
def test_evaluation_waits_for_a_concurrent_analysis_and_both_land(tmp_path):
    import time

    pico = tmp_path / "pico"
    write_pico_run(pico, steps=(0, 5, 10))
    data = pico_data(tmp_path)
    ref = tmp_path / "ref.zarr"
    dynlab.analyze([pico], ref, metrics="per", progress=False)
    ev = [str(BIN), "eval", str(pico), "--ppl", str(data), "--blimp", "none", "--no-progress",
          "--device", "cpu", "--wait", "--store"]
    assert subprocess.run([*ev, str(ref)], capture_output=True).returncode == 0
    out = tmp_path / "s.zarr"
    mark = tmp_path / "paused"
    env = {**os.environ, "DYNLAB_FAULT": "analyze.checkpoint:pause@2",
           "DYNLAB_FAULT_MARK": str(mark)}
    first = subprocess.Popen([str(BIN), "analyze", str(pico), "-o", str(out), "-m", "per",
                              "--no-progress"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not mark.exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = subprocess.Popen([*ev, str(out)], stderr=subprocess.PIPE, text=True)
    said = ""
    while "waiting for" not in said:
        assert second.poll() is None and time.time() < deadline, said
        said += second.stderr.readline()
    first.send_signal(signal.SIGKILL)  # the analysis dies holding the lock
    first.wait()
    assert second.wait(timeout=300) == 0, second.stderr.read()
    again = subprocess.run([str(BIN), "analyze", str(pico), "-o", str(out), "-m", "per",
                            "--no-progress"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    xr.testing.assert_identical(xr.open_zarr(out).load(), xr.open_zarr(ref).load())


def test_report_figures_for_a_foreign_run(hf, tmp_path):
    """The training curves and the PER-against-loss figure of a Hugging Face run: the
    plotted points are the store's eval_loss and the layer mean of its PER."""
    from dynlab.eval import load_eval_data
    from dynlab.viz import report as R

    text = fx.write_text(tmp_path / "docs.txt")
    store = tmp_path / "s.zarr"
    evaluate_sources([hf / "gpt2"], load_eval_data(text, "none"), EvalOptions(), store=store,
                     metrics="per")
    dynlab.analyze([hf / "gpt2"], store, metrics="per", progress=False)
    ds = dynlab.open_store(store).load()
    sections = {s.title: s for s in R.report_sections(ds)}
    fig = sections["PER against loss"].figure
    (trace,) = [t for t in fig.data if (t.meta or {}).get("role") == "series"]
    assert list(trace.x) == ds.eval_loss.sel(run="gpt2").values.tolist()
    per = ds.per.sel(run="gpt2", kind="weights", matrix="ov_circuit").mean("layer")
    np.testing.assert_allclose(trace.y, per.values, rtol=1e-12)
    curves = sections["Training curves"].figure
    ppl = [t for t in curves.data if (t.meta or {}).get("variable") == "ppl_macro"]
    assert ppl and list(ppl[0].y) == ds.ppl_macro.sel(run="gpt2").values.tolist()


def test_hub_revisions_evaluate_as_the_local_directories(tmp_path, monkeypatch):
    """hf://ORG/NAME with --revisions from huggingface_hub's offline cache: the revision's
    weights and its own tokenizer, the same numbers as the local model directories; a
    revision cached before is never deleted."""
    from test_sources_hub import files_in, lay_out_cache

    fx.train_and_save("gpt_neox", tmp_path / "dirs", (0, 2), "step{}")
    for s in (0, 2):
        fx.save_tokenizer(tmp_path / "dirs" / f"step{s}")
    cache = tmp_path / "cache"
    lay_out_cache(cache, "tiny-org/ev", {f"step{s}": tmp_path / "dirs" / f"step{s}"
                                         for s in (0, 2)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = EvalData({"d": docs(3, 2)}, [])
    before = files_in(cache)
    hub = evaluate_sources(["hf://tiny-org/ev"], data, EvalOptions(), revisions="step2",
                           cache_dir=cache)
    local = evaluate_sources([tmp_path / "dirs"], data, EvalOptions())
    assert files_in(cache) == before
    assert [r["step"] for r in hub["tiny-org/ev"]] == [2]
    assert hub["tiny-org/ev"][0]["perplexity"] == local["dirs"][1]["perplexity"]


def test_follow_evaluates_checkpoints_as_they_complete(tmp_path):
    """--follow: a pass sees step 0 only; the next step appears while it waits; the
    evaluation ends once the run's last step (training.max_steps) is evaluated."""
    import shutil

    src = tmp_path / "src"
    write_pico_run(src, steps=(0, 5))
    live = tmp_path / "live"
    shutil.copytree(src, live, symlinks=True)
    shutil.rmtree(live / "checkpoints" / "step_5")
    (live / "checkpoints" / "latest").unlink()
    gen = torch.Generator().manual_seed(2)
    data = EvalData({"d": PretokenizedDocs([torch.randint(0, SPEC.vocab_size, (8,),
                                                          generator=gen).tolist()])}, [])
    sleeps = []

    def arrive(_poll):
        sleeps.append(_poll)
        shutil.copytree(src / "checkpoints" / "step_5", live / "checkpoints" / "step_5")

    got = evaluate_sources([live], data, EvalOptions(), follow=True, poll=0.1, sleep=arrive)
    assert [r["step"] for r in got["live"]] == [0, 5] and sleeps == [0.1]


def test_blimp_through_a_hf_checkpoint_is_transformers_comparison(hf):
    """BLiMP on a Hugging Face checkpoint: a pair is correct when transformers' own
    log-probability of the good sentence (after the start token) beats the bad one's."""
    (run,) = open_sources([hf / "gpt_neox"])
    ckpt = run.checkpoints[-1]
    sents = docs(6, 8, length=12)
    pairs = [{"sentence_good": sents[2 * k], "sentence_bad": sents[2 * k + 1],
              "UID": f"u{k % 2}", "field": "f", "pairID": str(k)} for k in range(4)]
    res = evaluate_checkpoint(run, ckpt, EvalData({}, pairs), EvalOptions())["blimp"]

    def logp(s: str) -> float:
        ids = [0, *encode(ckpt.path, s)]
        return -hf_loss(ckpt.path, ids) * (len(ids) - 1)

    correct = [logp(p["sentence_good"]) > logp(p["sentence_bad"]) for p in pairs]
    want = {u: float(np.mean([c for c, p in zip(correct, pairs, strict=True)
                              if p["UID"] == u])) for u in ("u0", "u1")}
    assert res["by_uid"] == want
    assert res["overall"] == pytest.approx(np.mean(list(want.values())), abs=1e-12)


@pytest.mark.slow  # three evaluations into a store
def test_a_broken_checkpoint_fails_or_is_skipped(tmp_path):
    """--on-error fail: exit 2 naming the checkpoint, the steps before it kept in the store;
    --on-error skip: the others evaluated, exit 1; once repaired, a rerun fills the gap."""
    import shutil

    from safetensors.torch import load_file, save_file

    pico = tmp_path / "pico"
    write_pico_run(pico, steps=(0, 5, 10))
    data = pico_data(tmp_path)
    f = pico / "checkpoints" / "step_5" / "model.safetensors"
    shutil.copy(f, tmp_path / "good.safetensors")
    w = load_file(str(f))
    w["pico_decoder.layers.0.attention.q_proj.weight"] = torch.zeros(3, 3)
    save_file(w, str(f))
    store = tmp_path / "s.zarr"
    base = [pico, "--ppl", data, "--blimp", "none", "-m", "per", "--store", store]
    code, out = cli(*base)
    assert code == 2 and "step_5" in out and "q_proj" in out, out
    assert dynlab.open_store(store).ppl_evaluated.values.tolist() == [[1, 0, 0]]
    code, out = cli(*base, "--on-error", "skip")
    assert code == 1 and "skipped pico step 5" in out and "pico@5" in out, out
    assert dynlab.open_store(store).ppl_evaluated.values.tolist() == [[1, 0, 1]]
    shutil.copy(tmp_path / "good.safetensors", f)
    code, out = cli(*base)
    assert code == 0, out
    assert dynlab.open_store(store).ppl_evaluated.values.tolist() == [[1, 1, 1]]


def test_pico_train_run_with_its_own_tokenizer(tmp_path):
    """A pico-train run whose folder holds a Hugging Face tokenizer: text is encoded with
    it, conditioned on its EOS, and scored by the step's weights (forward by hand)."""
    from tokenizers import Tokenizer, models

    root = tmp_path / "run"
    written = write_pico_run(root, steps=(0, 5))
    letters = "abcdefghijklmnopqr"
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(letters)}
    assert len(vocab) == SPEC.vocab_size
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        eos_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(root)
    text = "abcabqrponmlk"
    got = evaluate_sources([root], EvalData({"t": [text]}, []), EvalOptions())["run"][1]
    w = {k.removeprefix("pico_decoder."): v for k, v in written[5]["stored"].items()}
    ids = [0, *(vocab[c] for c in text)]
    logits = by_hand_pico_logits(w, torch.tensor([ids[:-1]]))[0]
    nll = -float(torch.log_softmax(logits, -1)[torch.arange(len(text)),
                                               torch.tensor(ids[1:])].sum())
    p = got["perplexity"]
    assert p["tokens_by_domain"]["t"] == len(text) and p["bytes_by_domain"]["t"] == len(text)
    assert p["loss"] == pytest.approx(nll / len(text), rel=1e-5)
    assert p["bpb"] == pytest.approx(nll / (LN2 * len(text)), rel=1e-5)
