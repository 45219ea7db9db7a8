"""The analysis store survives interruption and concurrency: real `dynlab analyze` processes
killed (SIGKILL) or interrupted (SIGINT) at named phases (`dynlab.faults`), two writers at
once, a read-only file system, damaged stores for `dynlab report`, and a hypothesis property
test of the growth logic. Every end state is compared, variable by variable (NaN positions
included), with the store analysed in one go."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from safetensors.torch import load_file
from typer.testing import CliRunner

import dynlab
import dynlab.analysis
import dynlab.analysis.serial
import dynlab.analysis.store
import dynlab.analysis.task
from dynlab.analysis.storelock import StoreAccess, StoreBusy, lock_path
from dynlab.runs.checkpoints import CheckpointError, ModelSpec
from dynlab.testing import make_run

SPEC = ModelSpec(d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, activation_hidden_dim=12,
                 vocab_size=16)
BIN = Path(sys.executable).parent / "dynlab"
A_STEPS = [0, 5, 10, 20, 30]
B_STEPS = [0, 15]
#: perplexity domains per step of run a: step 5 brings "a", which sorts before the others
DOMAINS = {0: ["c"], 5: ["a", "c"], 10: ["c", "d"], 20: ["d"], 30: ["e"]}


def meta_a(step: int) -> dict:
    return {"train_loss": 5.0 - step / 10, "lr": 1e-3 * (1 + step), "tokens": 64 * step,
            "eval": {"perplexity": {"by_domain": {d: 10.0 + step + k for k, d in
                                                  enumerate(DOMAINS[step])},
                                    "macro": 10.0 + step},
                     "blimp": {"by_uid": {"u1": 0.5 + step / 100}, "by_field": {"f": 0.5},
                               "overall": 0.5}}}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    a = make_run(root / "a", SPEC, A_STEPS, grads=False, meta=meta_a)
    b = make_run(root / "b", SPEC, B_STEPS, grads=False, seed=2,
                 meta=lambda s: {"train_loss": 7.0 + s, "relora_cycle": 0})
    return a, b


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """The store of both whole runs, analysed in one go (kinds weights, updates)."""
    out = dynlab.analyze(list(source), tmp_path_factory.mktemp("ref") / "ref.zarr",
                         metrics="per", progress=False)
    return xr.open_zarr(out).load()


class Work:
    """Working copies of the source runs that gain checkpoints as a test goes on (a
    checkpoint appears the way the trainer writes it: the folder, meta.json last)."""

    def __init__(self, source, root: Path):
        self.src = dict(zip(("a", "b"), source, strict=True))
        self.root = root
        self.out = root / "store.zarr"

    def run(self, name: str) -> Path:
        return self.root / name

    def stage(self, name: str, steps) -> Path:
        dst = self.run(name)
        (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy(self.src[name] / "run.json", dst / "run.json")
        for s in steps:
            target = dst / "checkpoints" / f"step_{s}"
            if not target.exists():
                shutil.copytree(self.src[name] / "checkpoints" / f"step_{s}", target)
        return dst

    def complete(self) -> Path:
        """Stage everything and analyse both runs in process; returns the store."""
        self.stage("a", A_STEPS)
        self.stage("b", B_STEPS)
        return dynlab.analyze([self.run("a"), self.run("b")], self.out, metrics="per",
                              progress=False)


@pytest.fixture
def work(source, tmp_path):
    return Work(source, tmp_path)


def assert_same_store(path: Path, reference: xr.Dataset, any_run_order: bool = False) -> None:
    """Every variable, coordinate and attribute equal (NaN where NaN), as xarray reads it.
    any_run_order: runs keep the order in which they were added (when writers race, either)."""
    ds = xr.open_zarr(path).load()
    if any_run_order:
        reference = reference.sel(run=ds.run.values)
    xr.testing.assert_identical(ds, reference)


def assert_still_reads(path: Path, before: xr.Dataset) -> None:
    """The store opens with plain xr.open_zarr and holds every cell it held before."""
    after = xr.open_zarr(path).load()
    sel = {d: before[d].values for d in ("run", "step", "domain", "uid", "field")
           if d in before.dims}
    for name in before.data_vars:
        xr.testing.assert_identical(after[name].sel({d: v for d, v in sel.items()
                                                     if d in before[name].dims}),
                                    before[name])


# ---------------------------------------------------------------------------------------
# real processes


def analyze_cmd(work: Work, runs, *extra) -> list[str]:
    return [str(BIN), "analyze", *(str(work.run(r)) for r in runs), "-o", str(work.out),
            "--metrics", "per", "--no-progress", *extra]


def spawn(cmd, fault: str | None = None, mark: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("DYNLAB_FAULT", None)
    if fault:
        env["DYNLAB_FAULT"] = fault
    if mark:
        env["DYNLAB_FAULT_MARK"] = str(mark)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def wait_for(mark: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not mark.exists():
        assert proc.poll() is None, f"exited early: {proc.communicate()[1]}"
        assert time.time() < deadline, "the process never reached its fault point"
        time.sleep(0.02)


def killed(code: int) -> bool:
    return code == -signal.SIGKILL


INTERRUPTED = "interrupted; rerun the same command to resume"


@pytest.mark.slow
def test_kill_during_creation_leaves_no_store_and_the_rerun_creates_it(work, reference):
    work.stage("a", [0, 10])
    code, err = finish(spawn(analyze_cmd(work, ["a"]), "store.create:kill"))
    assert killed(code), err
    assert not work.out.exists()  # never a half-created store at the path
    assert (work.out.with_name("store.zarr.rebuild") / ".dynlab-building").is_file()
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)  # the same again
    assert not work.out.with_name("store.zarr.rebuild").exists()
    assert_same_store(work.complete(), reference)


@pytest.mark.slow
def test_kill_while_growing_by_a_new_run_keeps_the_store_as_it_was(work, reference):
    work.stage("a", [0, 10])
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    before = xr.open_zarr(work.out).load()
    work.stage("b", [0])
    code, err = finish(spawn(analyze_cmd(work, ["a", "b"]), "store.grow:kill@3"))
    assert killed(code), err
    assert (work.out / dynlab.analysis.store.JOURNAL).is_file()  # really killed mid-growth
    xr.testing.assert_identical(xr.open_zarr(work.out).load(), before)
    assert_same_store(work.complete(), reference)


@pytest.mark.slow
def test_ctrl_c_while_growing_by_new_steps(work, reference):
    work.stage("a", [0, 10])
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    before = xr.open_zarr(work.out).load()
    work.stage("a", [20, 30])
    code, err = finish(spawn(analyze_cmd(work, ["a"]), "store.grow:interrupt@2"))
    assert code == 130 and INTERRUPTED in err and "Traceback" not in err, err
    xr.testing.assert_identical(xr.open_zarr(work.out).load(), before)
    assert_same_store(work.complete(), reference)


def exchange_works(root: Path) -> bool:
    """Whether this file system exchanges two directories atomically."""
    x, y = root / "exchange-x", root / "exchange-y"
    x.mkdir()
    y.mkdir()
    try:
        return dynlab.analysis.store.exchange(x, y)
    finally:
        x.rmdir()
        y.rmdir()


@pytest.mark.slow
@pytest.mark.parametrize("fault", [
    "store.rebuild:kill@3",
    pytest.param("store.swap:kill", marks=pytest.mark.soak)])  # a third kill in a rebuild
def test_kill_while_a_late_checkpoint_is_sorted_in(work, reference, fault):
    """Step 5 completes after 10 and 20 were analysed: the store is rebuilt with sorted
    steps (and the new domain label 'a' first) and swapped in."""
    work.stage("a", [0, 10, 20])
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    before = xr.open_zarr(work.out).load()
    work.stage("a", [5])
    code, err = finish(spawn(analyze_cmd(work, ["a"]), fault))
    assert killed(code), err
    if fault.startswith("store.rebuild"):  # killed while copying: the old store is intact
        xr.testing.assert_identical(xr.open_zarr(work.out).load(), before)
    elif exchange_works(work.root):
        assert_still_reads(work.out, before)  # swapped atomically: the new store is in place
    assert_same_store(work.complete(), reference)


@pytest.mark.soak  # make test kills creation, growth and a rebuild
@pytest.mark.slow
def test_kill_while_writing_training_variables_keeps_other_runs(work, reference):
    work.stage("a", [0, 10])
    work.stage("b", [0])
    dynlab.analyze([work.run("a"), work.run("b")], work.out, metrics="per", progress=False)
    before = xr.open_zarr(work.out).load()
    work.stage("a", [20])
    code, err = finish(spawn(analyze_cmd(work, ["a"]), "store.meta:kill"))
    assert killed(code), err
    assert_still_reads(work.out, before)
    after = xr.open_zarr(work.out).load()
    for name in ("train_loss", "relora_cycle", "ppl", "blimp"):
        xr.testing.assert_identical(after[name].sel(run="b", step=before.step),
                                    before[name].sel(run="b"))
    assert_same_store(work.complete(), reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGKILL, marks=pytest.mark.soak),
                                 signal.SIGINT])  # SIGKILL: the kill tests above
def test_signal_in_the_middle_of_the_analysis(work, reference, sig, tmp_path):
    work.stage("a", [0, 10, 20])
    mark = tmp_path / "paused"
    proc = spawn(analyze_cmd(work, ["a"]), "analyze.checkpoint:pause@2", mark)
    wait_for(mark, proc)
    before = xr.open_zarr(work.out).load()
    assert int(before.analyzed.sum()) == 2
    proc.send_signal(sig)
    code, err = finish(proc)
    if sig == signal.SIGINT:
        assert code == 130 and INTERRUPTED in err and "Traceback" not in err, err
        assert not lock_path(work.out).exists()  # released on the way out
    else:
        assert killed(code)
    xr.testing.assert_identical(xr.open_zarr(work.out).load(), before)
    assert_same_store(work.complete(), reference)


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(
        work, reference, tmp_path):
    work.stage("a", [0, 10, 20])
    mark = tmp_path / "paused"
    first = spawn(analyze_cmd(work, ["a"]), "analyze.checkpoint:pause", mark)
    wait_for(mark, first)
    code, err = finish(spawn(analyze_cmd(work, ["a"])))
    assert code == 1 and "Traceback" not in err, err
    said = " ".join(err.split())
    assert f"pid {first.pid} on {socket.gethostname()}, since 20" in said
    assert "another dynlab analyze is writing this store" in said and "--wait" in said
    first.send_signal(signal.SIGKILL)
    first.wait()
    stale = json.loads(lock_path(work.out).read_text())
    assert stale["pid"] == first.pid  # left behind by the killed writer
    with pytest.warns(UserWarning, match=f"pid {first.pid} on"):
        dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    assert not lock_path(work.out).exists()
    assert_same_store(work.complete(), reference)


@pytest.mark.slow
def test_second_writer_waits_with_wait_then_writes_its_run(work, reference, tmp_path):
    work.stage("a", [0, 10, 20])
    work.stage("b", [0, 15])
    mark = tmp_path / "paused"
    first = spawn(analyze_cmd(work, ["a"]), "analyze.checkpoint:pause", mark)
    wait_for(mark, first)
    second = spawn(analyze_cmd(work, ["b"], "--wait"))
    said = ""
    deadline = time.time() + 120
    while "waiting for" not in said:  # its first line on stderr says that it waits
        assert second.poll() is None and time.time() < deadline, said
        said += second.stderr.readline()
    assert f"waiting for the analysis that is writing it (pid {first.pid}" in said
    first.send_signal(signal.SIGINT)
    assert finish(first)[0] == 130
    code, err = finish(second)
    assert code == 0, said + err
    ds = xr.open_zarr(work.out).load()
    assert ds.analyzed.sel(run="b", step=[0, 15]).values.tolist() == [1, 1]
    assert ds.train_loss.sel(run="b", step=15).item() == 22.0
    assert_same_store(work.complete(), reference)


@pytest.mark.soak  # three processes; make test keeps a refused and a waiting second writer
@pytest.mark.slow
def test_three_concurrent_writers_same_run_different_steps_different_runs(work, reference):
    """Three real processes started together on one store (--wait): two on run a from
    folders with different steps (0, 10, 20 and 0, 10, 30), one on run b. All finish, nothing
    is lost or set to NaN, and the store equals the one analysed in one go."""
    work.stage("a", [0, 10, 20])
    work.stage("b", B_STEPS)
    other = Work(tuple(work.src.values()), work.root / "copy")
    other.out = work.out
    other.stage("a", [0, 10, 30])
    procs = [spawn(analyze_cmd(work, ["a"], "--wait")),
             spawn(analyze_cmd(other, ["a"], "--wait")),
             spawn(analyze_cmd(work, ["b"], "--wait"))]
    for p in procs:
        code, err = finish(p)
        assert code == 0 and "Traceback" not in err, err
    ds = xr.open_zarr(work.out).load()
    assert ds.analyzed.sel(run="a", step=[0, 10, 20, 30]).values.tolist() == [1, 1, 1, 1]
    assert ds.analyzed.sel(run="b", step=B_STEPS).values.tolist() == [1, 1]
    for name in ("train_loss", "per"):  # every analysed cell holds its value
        v = ds[name].sel(run="a", step=[0, 10, 20, 30])
        assert not np.isnan(v.sel(kind="weights") if "kind" in v.dims else v).any()
    assert_same_store(work.complete(), reference, any_run_order=True)


def read_only(path: Path, *cmd: str) -> subprocess.CompletedProcess:
    """Run `cmd` with `path` bind-mounted read-only (a user + mount namespace)."""
    script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && '
              'exec "$@"')
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(path), *cmd],
                          capture_output=True, text=True)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_read_only_file_system(work):
    if shutil.which("unshare") is None or read_only(work.root, "true").returncode != 0:
        pytest.skip("no user/mount namespaces here to make a read-only file system")
    work.stage("a", [0, 10])
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    before = tree_digest(work.root)
    res = read_only(work.root, *analyze_cmd(work, ["a"]))
    assert res.returncode == 0, res.stderr  # complete: nothing to write
    assert res.stdout.strip() == str(work.out)
    work.stage("a", [20])
    before = tree_digest(work.root)
    res = read_only(work.root, *analyze_cmd(work, ["a"]))
    said = " ".join(res.stderr.split())
    assert res.returncode == 1 and "Traceback" not in said, res.stderr
    assert "the analysis needs to add 1 step to the store" in said
    assert "Read-only file system" in said
    assert tree_digest(work.root) == before


# ---------------------------------------------------------------------------------------
# in process


def per_of(w: np.ndarray) -> float:
    """Proportional effective rank, numpy float64 (independent of dynlab)."""
    s = np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum()) / min(w.shape)


def weights(run: Path, step: int, name: str) -> np.ndarray:
    return load_file(str(run / "checkpoints" / f"step_{step}" / "weights.safetensors"))[
        name].double().numpy()


def test_late_checkpoint_sorts_steps_and_recomputes_its_successors_updates(work, reference):
    work.stage("a", [0, 10, 20])
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    ds = xr.open_zarr(work.out)
    assert ds.prev_step.sel(run="a").values.tolist() == [-1, 0, 10]
    work.stage("a", [5])  # its meta.json appears late
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    ds = xr.open_zarr(work.out).load()  # plain xarray: no sorting by the reader
    assert ds.step.values.tolist() == [0, 5, 10, 20]
    assert int(ds.isel(step=-1).step) == 20
    assert ds.prev_step.sel(run="a").values.tolist() == [-1, 0, 5, 10]
    assert ds.domain.values.tolist() == ["a", "c", "d"]
    name = "layers.0.swiglu.w_2.weight"
    w10, w5 = weights(work.run("a"), 10, name), weights(work.run("a"), 5, name)
    got = float(ds.per.sel(run="a", kind="updates", step=10, layer=0, matrix="swiglu.w_2"))
    assert got == pytest.approx(per_of(w10 - w5), rel=1e-9)
    assert ds.ppl.sel(run="a", step=5, domain="a").item() == 15.0
    assert np.isnan(ds.ppl.sel(run="a", step=10, domain="a").item())
    sel = dict(run="a", step=[0, 5, 10, 20])
    for name in ("per", "sigma", "analyzed", "prev_step", "train_loss", "blimp"):
        xr.testing.assert_identical(ds[name].sel(sel), reference[name].sel(sel))
    xr.testing.assert_identical(ds.ppl.sel(sel), reference.ppl.sel(**sel, domain=["a", "c", "d"]))
    assert not any(p.name.startswith("store.zarr.") for p in work.root.iterdir())


def test_a_refused_analysis_creates_nothing(work):
    run = work.stage("a", [0, 10])
    w = run / "checkpoints" / "step_0" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="step_0/weights.safetensors"):
        dynlab.analyze([run], work.out, metrics="per", progress=False)
    with pytest.raises(CheckpointError, match="step_0/weights.safetensors"):
        dynlab.analyze([run], work.root / "new" / "dir" / "s.zarr", progress=False)
    assert sorted(p.name for p in work.root.iterdir()) == ["a"]
    good = work.stage("b", [0])  # a store exists: the bad run is not added to it
    dynlab.analyze([good], work.out, metrics="per", kinds="weights", progress=False)
    before = tree_digest(work.out)
    with pytest.raises(CheckpointError, match="step_0/weights.safetensors"):
        dynlab.analyze([good, run], work.out, metrics="per", kinds="weights", progress=False)
    assert tree_digest(work.out) == before


def legacy_half_created(path: Path, arrays: bool) -> None:
    """What an older dynlab left when killed while creating a store."""
    import zarr

    g = zarr.open_group(str(path), mode="w-", zarr_format=3,
                        attributes={"schema_version": 1, "metrics": ["per"],
                                    "kinds": ["weights", "updates"], "run_configs": "{}"})
    if arrays:
        g.create_array("run", shape=(1,), dtype="<U256", fill_value="",
                       dimension_names=("run",))[...] = ["a"]
        g.create_array("layer", shape=(0,), dtype="int64", fill_value=0,
                       dimension_names=("layer",))


@pytest.mark.parametrize("arrays", [False, True])
def test_an_interrupted_creation_is_recreated(work, reference, arrays):
    legacy_half_created(work.out, arrays)
    work.stage("a", [0, 10])
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    assert_same_store(work.complete(), reference)


def test_array_lengths_left_by_an_older_dynlab_are_repaired(work, reference):
    """Old growth resized arrays one by one, the coordinate last: killed in between, the
    store did not open ("conflicting sizes for dimension 'step'")."""
    import zarr

    work.stage("a", [0, 10])
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    g = zarr.open_group(str(work.out), mode="r+", use_consolidated=False)
    for name in ("per", "analyzed", "train_loss"):
        arr = g[name]
        dims = arr.metadata.dimension_names
        shape = list(arr.shape)
        shape[dims.index("step")] += 2
        arr.resize(tuple(shape))
    zarr.consolidate_metadata(str(work.out))
    with pytest.raises(ValueError, match="conflicting sizes"):
        xr.open_zarr(work.out)
    assert_same_store(work.complete(), reference)


def test_complete_store_is_not_written_again(work):
    work.stage("a", [0, 10])
    work.stage("b", [0])
    dynlab.analyze([work.run("a"), work.run("b")], work.out, metrics="per", progress=False)
    files = {p: p.stat().st_mtime_ns for p in work.out.rglob("*")}
    digest = tree_digest(work.out)
    time.sleep(0.01)
    dynlab.analyze([work.run("b")], work.out, metrics="per", progress=False)
    dynlab.analyze([work.run("a"), work.run("b")], work.out, metrics="per", progress=False)
    assert tree_digest(work.out) == digest
    assert {p: p.stat().st_mtime_ns for p in work.out.rglob("*")} == files


def test_lock_refuses_and_waits_in_process(work):
    work.stage("a", [0])
    with StoreAccess(work.out) as held:
        assert held.writable and lock_path(work.out).is_file()
        with pytest.raises(StoreBusy, match=rf"pid {os.getpid()} on .*since"):
            dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
        with pytest.raises(StoreBusy):  # a Dask client is refused before it starts a cluster
            dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False,
                           scheduler="local:1")
        t = time.monotonic()
        with pytest.raises(StoreBusy), pytest.warns(UserWarning, match="waiting for"):
            dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False, wait=0.5)
        assert time.monotonic() - t >= 0.5
    assert not work.out.exists() and not lock_path(work.out).exists()
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)


def test_training_values_of_runs_not_named_are_never_rewritten(work):
    work.stage("a", [0, 10])
    work.stage("b", [0])
    dynlab.analyze([work.run("a"), work.run("b")], work.out, metrics="per", progress=False)
    chunk = work.out / "train_loss" / "c" / "1" / "0"  # run b, step 0
    stamp = chunk.stat().st_mtime_ns, chunk.stat().st_ino
    shutil.rmtree(work.run("b"))  # its checkpoints are gone
    work.stage("a", [20])
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    assert (chunk.stat().st_mtime_ns, chunk.stat().st_ino) == stamp
    ds = xr.open_zarr(work.out)
    assert ds.train_loss.sel(run="b", step=0).values.item() == 7.0


# ---------------------------------------------------------------------------------------
# `dynlab report` on damaged stores


def report(*args) -> tuple[int, str]:
    from dynlab_cli.main import app

    res = CliRunner().invoke(app, ["report", *map(str, args)])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, " ".join(res.output.replace("│", " ").split())


def test_report_on_damaged_or_half_created_stores(work, tmp_path):
    out = tmp_path / "r.html"
    half = tmp_path / "half.zarr"
    (tmp_path / "half.zarr.rebuild").mkdir()
    (tmp_path / "half.zarr.rebuild" / ".dynlab-building").touch()
    code, said = report(half, "-o", out)
    assert code == 2 and "half.zarr: no such file" in said
    assert "interrupted while rebuilding" in said and "rerun the same `dynlab analyze`" in said

    work.stage("a", [0, 10])
    dynlab.analyze([work.run("a")], work.out, metrics="per", progress=False)
    broken = tmp_path / "broken.zarr"
    shutil.copytree(work.out, broken)
    (broken / "zarr.json").write_text("{ not json")
    code, said = report(broken, "-o", out)
    assert code == 2 and "broken.zarr: not a readable analysis store" in said, said

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(work.out, damaged)
    (damaged / "train_loss" / "c" / "0" / "0").write_bytes(b"garbage")
    code, said = report(damaged, "-o", out)
    assert code == 1 and "reading " in said and "damaged.zarr" in said, said

    legacy = tmp_path / "legacy.zarr"
    legacy_half_created(legacy, arrays=False)
    code, said = report(legacy, "-o", out)
    assert code == 2 and "legacy.zarr" in said and "rerun the same `dynlab analyze`" in said
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# property: any sequence of analyses, new checkpoints and interruptions ends in the store
# analysed in one go

PHASES = ["store.create", "store.grow", "store.rebuild", "store.swap", "store.meta",
          "analyze.write", "analyze.checkpoint"]


class Interrupted(BaseException):
    """A simulated kill at a fault point (the real-signal tests above cover real ones)."""


@pytest.mark.slow
def test_any_sequence_of_analyses_and_interruptions_ends_in_the_one_go_store(
        source, reference, tmp_path_factory, monkeypatch):
    pytest.importorskip("hypothesis", reason="hypothesis (the dev extra) is not installed")
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    step = st.one_of(
        st.tuples(st.just("add"), st.sampled_from(["a", "b"]),
                  st.sampled_from(sorted(set(A_STEPS) | set(B_STEPS)))),
        st.tuples(st.just("analyze"), st.sampled_from(["a", "ab"]),
                  st.one_of(st.none(), st.tuples(st.sampled_from(PHASES),
                                                 st.integers(1, 3)))),
    )
    counter = {}
    hits = []

    def fault(phase: str) -> None:
        counter[phase] = counter.get(phase, 0) + 1
        if counter.get("target") == (phase, counter[phase]):
            hits.append(phase)
            raise Interrupted(phase)

    monkeypatch.setattr(dynlab.analysis.store, "fault_point", fault)
    monkeypatch.setattr(dynlab.analysis.task, "fault_point", fault)  # analyze.write
    monkeypatch.setattr(dynlab.analysis.serial, "fault_point", fault)  # analyze.checkpoint

    first = ("analyze", "a", None)
    late = [first, ("add", "a", 5)]  # a checkpoint before analysed ones: rebuild and swap

    @settings(max_examples=3, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(step, min_size=1, max_size=5))
    @example([("analyze", "a", ("store.create", 1))])
    @example([first, ("add", "a", 20), ("add", "b", 0), ("analyze", "ab", ("store.grow", 2))])
    @example(late + [("analyze", "a", ("store.rebuild", 2))])
    @example(late + [("analyze", "a", ("store.swap", 1)), ("add", "a", 30)])
    @example([("add", "b", 0), ("analyze", "ab", ("store.meta", 2))])
    @example([("analyze", "a", ("analyze.write", 2))])
    @example([("add", "a", 20), ("analyze", "a", ("analyze.checkpoint", 2)), ("add", "a", 5),
              ("analyze", "ab", ("store.rebuild", 1))])
    def check(ops):
        work = Work(source, tmp_path_factory.mktemp("prop"))
        work.stage("a", [0, 10])
        for op in ops:
            if op[0] == "add":
                steps = A_STEPS if op[1] == "a" else B_STEPS
                if op[2] in steps:
                    work.stage(op[1], [op[2]])
                continue
            runs = [work.run("a")] + ([work.run("b")] if op[1] == "ab" and
                                      work.run("b").exists() else [])
            counter.clear()
            counter["target"] = op[2]
            try:
                dynlab.analyze(runs, work.out, metrics="per", progress=False)
            except Interrupted:
                pass
            counter.clear()
            if work.out.exists():  # every result so far still opens with plain xarray
                xr.open_zarr(work.out).load()
        assert_same_store(work.complete(), reference)

    check()
    assert set(hits) == set(PHASES), hits  # every phase really was interrupted
