"""hf://ORG/NAME through huggingface_hub's real code, offline, on a cache directory laid out as
huggingface_hub lays it out (blobs, snapshots of symlinks, refs), standing in for the Hub."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

import hf_fixtures as fx  # noqa: E402
from sources_refs import check, to64  # noqa: E402

import dynlab  # noqa: E402
from dynlab.runs.checkpoints import CheckpointError  # noqa: E402
from dynlab.sources import hub as H  # noqa: E402
from dynlab.sources import open_sources  # noqa: E402

REPO = "tiny-org/tiny-pythia"
STEPS = (0, 2, 4)
BIN = Path(sys.executable).parent / "dynlab"


def lay_out_cache(cache: Path, repo_id: str, revisions: dict[str, Path]) -> None:
    """huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> blob,
    refs/<revision> holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for rev, model_dir in revisions.items():
        commit = hashlib.sha1(rev.encode()).hexdigest()
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in sorted(model_dir.iterdir()):
            data = f.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            blob = repo / "blobs" / sha
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / rev).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    saved = fx.train_and_save("gpt_neox", root / "dirs", STEPS, "step{}")
    cache = root / "cache"
    lay_out_cache(cache, REPO, {f"step{s}": root / "dirs" / f"step{s}" for s in STEPS})
    info = huggingface_hub.scan_cache_dir(cache)  # the real code reads our layout
    (repo,) = info.repos
    assert repo.repo_id == REPO and len(repo.revisions) == 3
    return cache, saved


def files_in(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*")}


def test_parse_revisions():
    assert H.parse_revisions("step0,step1000:step3000:1000") == [
        "step0", "step1000", "step2000", "step3000"]
    assert H.parse_revisions("step0:step143000:10000")[-1] == "step140000"
    assert H.parse_revisions("step0:step143000:10000")[:2] == ["step0", "step10000"]
    with pytest.raises(CheckpointError, match="A <= B"):
        H.parse_revisions("step5:step1:1")


def test_offline_analysis_from_cache(hub_cache, tmp_path, monkeypatch):
    cache, saved = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = files_in(cache)
    store = dynlab.analyze([f"hf://{REPO}"], tmp_path / "a.zarr", revisions="step0:step4:2",
                           cache_dir=cache, metrics="per,er,spectral_norm,frobenius_norm",
                           device="cpu", progress=False)
    ds = dynlab.open_store(store)
    assert list(ds.run.values) == [REPO] and list(ds.step.values) == list(STEPS)
    assert list(ds.kind.values) == ["weights", "updates"]
    for step in STEPS:
        sd = saved[step]
        check(ds, {"run": REPO, "kind": "weights", "step": step, "layer": 1,
                   "matrix": "attention.o_proj"},
              to64(sd["gpt_neox.layers.1.attention.dense.weight"]))
        check(ds, {"run": REPO, "kind": "weights", "step": step, "layer": 0,
                   "matrix": "swiglu.w_2"},
              to64(sd["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"]))
    d = (to64(saved[4]["embed_out.weight"]) - to64(saved[2]["embed_out.weight"]))
    check(ds, {"run": REPO, "kind": "updates", "step": 4, "embedding": "de_embedding_proj"}, d,
          prefix="emb_")
    assert files_in(cache) == before  # revisions that were in the cache are never deleted
    # default revisions offline: every step<N> ref in the cache
    (run,) = open_sources([f"hf://{REPO}"], cache_dir=cache)
    assert [c.step for c in run.checkpoints] == list(STEPS)


def test_streaming_deletes_what_it_fetched(hub_cache, tmp_path, monkeypatch):
    """Revisions dynlab fetched are deleted once analysed (through huggingface_hub's cache
    manager), at most two on disk at a time; --keep-downloads keeps them."""
    cache, _ = hub_cache
    import shutil

    mine = tmp_path / "cache"
    shutil.copytree(cache, mine, symlinks=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen: list[int] = []
    readers = []

    def fresh(repo_id, wanted, cache_dir):  # as if every revision had been downloaded now
        return frozenset()

    monkeypatch.setattr(H, "preexisting_revisions", fresh)
    real_open = H.open_hub_run

    def spy(*a, **k):
        run = real_open(*a, **k)
        readers.append(run.reader)
        return run

    monkeypatch.setattr(H, "open_hub_run", spy)

    def count(task):
        snaps = mine / ("models--" + REPO.replace("/", "--")) / "snapshots"
        seen.append(len(list(snaps.iterdir())) if snaps.is_dir() else 0)

    dynlab.analyze([f"hf://{REPO}"], tmp_path / "b.zarr", cache_dir=mine, metrics="per",
                   device="cpu", progress=False, on_checkpoint=count)
    assert readers[0].state.max_live == 2  # t+1 fetched while t is analysed, never more
    assert seen == [3, 2, 1]  # each revision deleted right after its analysis
    assert all(len(r.revisions) == 0 for r in huggingface_hub.scan_cache_dir(mine).repos)
    ds = dynlab.open_store(tmp_path / "b.zarr")
    assert int(ds.analyzed.sum()) == 3


def test_missing_revision_offline(hub_cache, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"revision\(s\) step6 do not exist in the local "
                       r"cache \(HF_HUB_OFFLINE is set\)"):
        open_sources([f"hf://{REPO}"], revisions="step0,step6", cache_dir=cache)


@pytest.mark.slow
def test_cli_offline_and_unreachable(hub_cache, tmp_path):
    """The real command: HF_HUB_OFFLINE=1 reads the cache; with the Hub unreachable (and not
    offline) the message says so and the exit status is 2."""
    cache, _ = hub_cache
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    off = subprocess.run(
        [str(BIN), "analyze", f"hf://{REPO}", "--revisions", "step2,step4", "--hub-cache",
         str(cache), "-o", str(tmp_path / "c.zarr"), "--metrics", "per", "--device", "cpu",
         "--no-progress"], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300)
    assert off.returncode == 0, off.stderr
    ds = dynlab.open_store(tmp_path / "c.zarr")
    assert list(ds.step.values) == [2, 4] and int(ds.analyzed.sum()) == 2
    down = subprocess.run(
        [str(BIN), "analyze", f"hf://{REPO}", "--revisions", "step2", "--hub-cache", str(cache),
         "-o", str(tmp_path / "d.zarr"), "--no-progress"],
        env={**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"},
        capture_output=True, text=True, timeout=300)
    assert down.returncode == 2, down.stderr
    assert "Hugging Face Hub cannot be reached" in down.stderr
    assert "HF_HUB_OFFLINE=1" in down.stderr
    assert "Traceback" not in down.stderr


def test_reader_is_a_plain_dataclass(hub_cache, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (run,) = open_sources([f"hf://{REPO}"], revisions="step4", cache_dir=cache)
    assert dataclasses.is_dataclass(run.reader) and run.reader.revisions == ("step4",)
    assert run.config["source"]["architecture"] == "gpt_neox"


# ---- a pico run on the Hub: one branch, one commit per save ---------------------------------


class _HubStandIn:
    """A local HTTP server standing in for the Hub's listing endpoints (`routes`: path ->
    JSON answer, e.g. /api/models/ORG/NAME/commits/BRANCH or /api/models/ORG/NAME/refs);
    every other request gets 500, so huggingface_hub falls back to its local cache as it does
    when the Hub is down."""

    def __init__(self, routes: dict[str, object]):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        bodies = {path: json.dumps(answer).encode() for path, answer in routes.items()}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = bodies.get(self.path.split("?")[0])
                ok = body is not None
                self.send_response(200 if ok else 500)
                self.send_header("Content-Type", "application/json")
                data = body if ok else b"{}"
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def _commit(title: str) -> dict:
    return {"id": hashlib.sha1(title.encode()).hexdigest(), "title": title, "message": "",
            "authors": [{"user": "pico"}], "date": "2025-01-01T00:00:00.000Z"}


def test_pico_run_on_the_hub(tmp_path, monkeypatch):
    """Steps come from the commit titles; weights from each 'Saving HF Model' commit, the
    gradients from each '(val)' learning-dynamics commit; the shipped .py is never read."""
    from test_sources_pico import STEPS, write_pico_run

    run = tmp_path / "pico-run"
    written = write_pico_run(run)
    repo, branch = "pico-org/pico-decoder-tiny", "run-1"
    cache = tmp_path / "cache"
    folder = cache / ("models--" + repo.replace("/", "--"))
    commits = []
    for step in STEPS:
        src = run / "checkpoints" / f"step_{step}"
        model_commit = _commit(f"Saving HF Model -- Step {step}")
        ld_commit = _commit(f"Saving Learning Dynamics Data (val) -- Step {step}")
        fabric_commit = _commit(f"Saving Fabric Checkpoint -- Step {step}")
        for c, files in ((model_commit, {"config.json": src / "config.json",
                                         "model.safetensors": src / "model.safetensors",
                                         "pico_decoder.py": None}),
                         (ld_commit, {f"learning_dynamics/{f.name}": f
                                      for f in (src / "learning_dynamics").iterdir()})):
            snap = folder / "snapshots" / c["id"]
            for name, f in files.items():
                target = snap / name
                target.parent.mkdir(parents=True, exist_ok=True)
                data = b"raise SystemExit('never imported')\n" if f is None else f.read_bytes()
                blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
                blob.parent.mkdir(parents=True, exist_ok=True)
                blob.write_bytes(data)
                target.symlink_to(os.path.relpath(blob, target.parent))
        commits = [ld_commit, fabric_commit, model_commit] + commits  # newest first
    server = _HubStandIn({f"/api/models/{repo}/commits/{branch}": commits})
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        store = dynlab.analyze([f"hf://{repo}@{branch}"], tmp_path / "p.zarr", cache_dir=cache,
                               metrics="per,er,spectral_norm,frobenius_norm", device="cpu",
                               progress=False, keep_downloads=True)
        with pytest.raises(CheckpointError, match=r"branch nope does not exist|cannot be "
                           r"reached"):
            open_sources([f"hf://{repo}@nope"], cache_dir=cache)
    finally:
        server.close()
    ds = dynlab.open_store(store)
    name = f"{repo}@{branch}"
    assert list(ds.step.values) == list(STEPS)
    assert list(ds.kind.values) == ["weights", "grads", "updates", "train_grads"]
    for step in STEPS:
        w = written[step]["weights"]
        check(ds, {"run": name, "kind": "weights", "step": step, "layer": 1,
                   "matrix": "attention.k_proj"}, to64(w["layers.1.attention.k_proj.weight"]))
        g = written[step]["val_grads"]["_forward_module.layers.0.swiglu.w_2"]
        check(ds, {"run": name, "kind": "grads", "step": step, "layer": 0,
                   "matrix": "swiglu.w_2"}, to64(g))


def test_hub_analysis_resumes(hub_cache, tmp_path, monkeypatch):
    """A second run with more revisions analyses only the new ones (the store knows what is
    done) and gives the same store as one run over all of them."""
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = []
    kw = dict(cache_dir=cache, metrics="per", device="cpu", progress=False,
              kinds="weights,updates")
    dynlab.analyze([f"hf://{REPO}"], tmp_path / "r.zarr", revisions="step0,step2", **kw)
    dynlab.analyze([f"hf://{REPO}"], tmp_path / "r.zarr", revisions="step0:step4:2",
                   on_checkpoint=lambda t: done.append(t.checkpoint.step), **kw)
    assert done == [4]
    whole = dynlab.analyze([f"hf://{REPO}"], tmp_path / "w.zarr", revisions="step0:step4:2",
                           **kw)
    a, b = dynlab.open_store(tmp_path / "r.zarr"), dynlab.open_store(whole)
    import numpy as np

    np.testing.assert_array_equal(a.per.values, b.per.values)


def test_default_revisions_from_the_hubs_refs(hub_cache, tmp_path, monkeypatch):
    """Online, the revisions are the step<N> branches that list_repo_refs gives (main and
    tags ignored), fetched through snapshot_download; a revision the Hub lacks is named."""
    cache, saved = hub_cache
    refs = {"branches": [{"name": n, "ref": f"refs/heads/{n}",
                          "targetCommit": hashlib.sha1(n.encode()).hexdigest()}
                         for n in ("main", "step4", "step0", "step2")],
            "tags": [{"name": "v1", "ref": "refs/tags/v1", "targetCommit": "0" * 40}],
            "converts": []}
    server = _HubStandIn({f"/api/models/{REPO}/refs": refs})
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        (run,) = open_sources([f"hf://{REPO}"], cache_dir=cache)
        assert [c.step for c in run.checkpoints] == list(STEPS)
        store = dynlab.analyze([f"hf://{REPO}"], tmp_path / "o.zarr", cache_dir=cache,
                               revisions="step4", metrics="per,er,spectral_norm,frobenius_norm",
                               device="cpu", progress=False)
        check(dynlab.open_store(store), {"run": REPO, "kind": "weights", "step": 4, "layer": 0,
                                         "matrix": "swiglu.w_1"},
              to64(saved[4]["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]))
        with pytest.raises(CheckpointError, match=r"revision\(s\) step9 do not exist on the Hub"):
            open_sources([f"hf://{REPO}"], revisions="step0,step9", cache_dir=cache)
    finally:
        server.close()


def test_activations_data_from_the_hub(tmp_path, monkeypatch):
    """--activations-data on hf://: the revision's weights and its own tokenizer from the
    cache, the same activations as the local directory gives."""
    from dynlab.analysis import activations as A
    from dynlab.analysis import representations as R

    fx.train_and_save("gpt_neox", tmp_path / "dirs", (0, 2), "step{}")
    for s in (0, 2):
        fx.save_tokenizer(tmp_path / "dirs" / f"step{s}")
    cache = tmp_path / "cache"
    lay_out_cache(cache, "tiny-org/tok", {f"step{s}": tmp_path / "dirs" / f"step{s}"
                                          for s in (0, 2)})
    text = fx.write_text(tmp_path / "docs.txt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = files_in(cache)
    store = dynlab.analyze(["hf://tiny-org/tok"], tmp_path / "a.zarr", cache_dir=cache,
                           metrics="per", device="cpu", progress=False,
                           activations_data=str(text), activations_batch=4)
    assert files_in(cache) == before  # cached before: never deleted
    ds = dynlab.open_store(store)
    (local,) = open_sources([tmp_path / "dirs"])
    acts = A.computed_activations(local, local.checkpoints[0], str(text), 4, "sample:16", {})
    want = R.anisotropy(acts["layers.1"].double().numpy())
    got = float(ds.anisotropy.sel(run="tiny-org/tok", step=0, layer=1, act_site="residual"))
    assert got == pytest.approx(want, rel=1e-12)
    assert int(ds.act_analyzed.sum()) == 2
