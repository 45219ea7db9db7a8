"""Hostile but fair use, done for real: two trainers on one run directory, a full disk (a
real tmpfs in a private mount namespace), run names and index files that point outside their
folder (with a marker file outside that must stay unread and unwritten), control characters
and rich markup in file content, duplicate step folders, unknown targets, malformed metadata
of every source, and a huge `--revisions` range under a memory ceiling."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train_safety import DECODER, assert_same_run, cli_args, wait_for

import dynlab
from dynlab.runs.layout import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a dynlab process started by a test: this tree first on the path
    (then what the test runner had), one thread, no fault injection."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)
    if "DYNLAB_FAULT" not in extra:
        env.pop("DYNLAB_FAULT", None)
    return env


def dynlab_cmd(args: list[str], fault: str | None = None, mark: Path | None = None
               ) -> subprocess.Popen:
    """A real `dynlab` process, running; `fault` and `mark` as dynlab.faults reads them."""
    extra = {"DYNLAB_FAULT": fault} if fault else {}
    if mark:
        extra["DYNLAB_FAULT_MARK"] = str(mark)
    return subprocess.Popen([sys.executable, "-m", "dynlab_cli.main", *map(str, args)],
                            env=child_env(**extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_dynlab(args: list[str]) -> subprocess.CompletedProcess:
    """A real `dynlab` process, run to its end (killed after 300 s)."""
    proc = dynlab_cmd(args)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny decoder run ({"decoder": RUN}), trained in this process, with a
    tokenizer cache shared by the processes the tests start."""
    root = tmp_path_factory.mktemp("reference")
    before = os.environ.get("DYNLAB_CACHE")
    os.environ["DYNLAB_CACHE"] = str(root / "cache")
    yield {"decoder": dynlab.train("decoder", out=str(root / "decoder"), **DECODER)}
    if before is None:
        os.environ.pop("DYNLAB_CACHE", None)
    else:
        os.environ["DYNLAB_CACHE"] = before


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ 1. two trainers, one run


@pytest.mark.slow
def test_second_trainer_on_a_run_directory_is_refused_and_a_stale_lock_is_taken_over(
        reference, tmp_path):
    """Trainer A pauses after update 3 (step_0 and step_2 written); trainer B on the same
    --out (with --resume, as from a second terminal, and as the very same command) is refused
    with exit 1 naming A's pid and command, and changes nothing. A is then killed (SIGKILL):
    its lock is stale, the next --resume takes it over, says so, and ends equal to an
    uninterrupted run."""
    out, mark = tmp_path / "run", tmp_path / "paused"
    args = cli_args("decoder", out, DECODER)
    a = dynlab_cmd(args, fault="train.step:pause@3", mark=mark)
    try:
        wait_for(mark, a)
        before = tree_bytes(out)
        assert [s for s, _ in complete_checkpoints(out)] == [0, 2]
        for second in (args + ["--resume"], args):
            res = run_dynlab(second)
            assert res.returncode == 1, res.stderr
            assert "Traceback" not in res.stderr
            assert "another dynlab train is writing this run directory" in res.stderr
            assert f"pid {a.pid} on " in res.stderr and "dynlab train decoder" in res.stderr
            assert tree_bytes(out) == before  # nothing read-modified, nothing removed
    finally:
        a.send_signal(signal.SIGKILL)
        a.communicate(timeout=60)
    assert (tmp_path / "run.lock").exists()  # left by the killed trainer: stale
    res = run_dynlab(args + ["--resume"])
    assert res.returncode == 0, res.stderr
    assert "took over the lock" in res.stderr and f"pid {a.pid}" in res.stderr
    assert not (tmp_path / "run.lock").exists()
    assert_same_run(reference["decoder"], out)


def test_run_lock_is_the_store_lock_mechanism(tmp_path):
    """The run directory's lock and the store's are one WriterLock: a second holder is
    refused naming the first (its own error type), the file is beside the target and gone
    on release, and folders made only for the lock are removed when nothing was written."""
    from dynlab.analysis.storelock import StoreAccess, StoreBusy
    from dynlab.locking import Busy, WriterLock
    from dynlab.runs.lock import RunBusy, run_lock

    run = tmp_path / "new" / "deeper" / "run"
    with run_lock(run) as held:
        assert isinstance(held, WriterLock) and (tmp_path / "new/deeper/run.lock").is_file()
        with pytest.raises(RunBusy, match=rf"{run}: another dynlab train is writing this run "
                           rf"directory \(pid {os.getpid()} on .*, since .*\); wait for it"):
            run_lock(run).acquire()
    assert not (tmp_path / "new").exists()  # nothing was trained: no folder left behind
    assert issubclass(RunBusy, Busy) and issubclass(StoreBusy, Busy)
    assert issubclass(StoreAccess, WriterLock)


# ------------------------------------------------------------------ a real full disk


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        res = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs "
                              "/mnt 2>/dev/null || mount -t tmpfs -o size=1m tmpfs /tmp"],
                             capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a "
                                 "private mount namespace here (unshare -rm)")

FILL = textwrap.dedent("""
    import os, sys
    path, leave = sys.argv[1], int(sys.argv[2])
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\\0" * 65536)
        except OSError:
            pass
    os.truncate(path, max(0, os.path.getsize(path) - leave))
""")


def in_tmpfs(tmp_path: Path, size: str, script: str, timeout: float = 600) -> Path:
    """Run the shell `script` in a private mount namespace where $MNT is a fresh tmpfs of
    `size` (a real file system that runs full), with `dynlab` ($DYN), a filler that leaves
    N bytes free ($FILL FILE N) and $OUT (tmp_path/out, outside the tmpfs) for what the test
    reads afterwards. Returns $OUT."""
    out, mnt = tmp_path / "out", tmp_path / "mnt"
    out.mkdir()
    mnt.mkdir()
    (tmp_path / "fill.py").write_text(FILL)
    env = child_env(MNT=str(mnt), OUT=str(out), DYN=f"{sys.executable} -m dynlab_cli.main",
                    FILL=f"{sys.executable} {tmp_path / 'fill.py'}")
    res = subprocess.run(["unshare", "-rm", "sh", "-c",
                          f'mount -t tmpfs -o size={size} tmpfs "$MNT" || exit 99\n{script}'],
                         env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def store_with_runs(path: Path, names: list[str]) -> Path:
    """The synthetic store of the figure tests (tests/viz_fixtures.py), its two runs renamed."""
    import viz_fixtures as vf

    ds = vf.make_dataset().assign_coords(run=names)
    return vf.write_dataset(ds, path)


@pytest.mark.soak
@pytest.mark.slow
@needs_tmpfs
def test_full_disk_keeps_the_previous_report_and_figure_byte_for_byte(tmp_path):
    """`dynlab report` and `dynlab plot` into a real tmpfs: the first writes fit; the tmpfs is
    then filled, and the second writes (another title) fail with exit 1 and 'disk full': the
    previous report and figure are byte for byte what they were, no temporary file is left."""
    store = store_with_runs(tmp_path / "s.zarr", ["decoder", "relora"])
    out = in_tmpfs(tmp_path, "40m", f"""
        $DYN report {store} -o "$MNT/report.html" --title first >/dev/null 2>"$OUT/err1"
        echo $? > "$OUT/rc1"
        $DYN plot {store} -o "$MNT/fig.html" >/dev/null 2>>"$OUT/err1"
        echo $? >> "$OUT/rc1"
        cp "$MNT/report.html" "$OUT/first.html"; cp "$MNT/fig.html" "$OUT/first-fig.html"
        $FILL "$MNT/filler" 4096
        $DYN report {store} -o "$MNT/report.html" --title second >/dev/null 2>"$OUT/err2"
        echo $? > "$OUT/rc2"
        $DYN plot {store} -o "$MNT/fig.html" --metrics er >/dev/null 2>>"$OUT/err2"
        echo $? >> "$OUT/rc2"
        cp "$MNT/report.html" "$OUT/after.html"; cp "$MNT/fig.html" "$OUT/after-fig.html"
        ls -a "$MNT" > "$OUT/listing"
    """)
    assert (out / "rc1").read_text().split() == ["0", "0"], (out / "err1").read_text()
    err = (out / "err2").read_text()
    assert (out / "rc2").read_text().split() == ["1", "1"], err
    assert err.count("disk full: no space left on the device while writing") == 2, err
    assert "Traceback" not in err
    assert b"first" in (out / "first.html").read_bytes()
    assert (out / "after.html").read_bytes() == (out / "first.html").read_bytes()
    assert (out / "after-fig.html").read_bytes() == (out / "first-fig.html").read_bytes()
    assert sorted((out / "listing").read_text().split()) == [".", "..", "fig.html", "filler",
                                                             "report.html"]


@pytest.mark.soak
@pytest.mark.slow
@needs_tmpfs
def test_full_disk_during_train_says_where_and_how_much_and_resumes_exactly(
        reference, tmp_path):
    """A run on a real tmpfs stops after step_2; the tmpfs is filled to 16 KiB free; the
    resumed run fails writing step_4 with exit 1 and a message naming the disk, the
    checkpoint and its size (not torch's 'enforce fail'); the partial checkpoint is gone and
    step_0/step_2 are intact. With space freed, --resume ends equal to an uninterrupted run."""
    args = " ".join(cli_args("decoder", Path("$MNT/run"), DECODER))
    out = in_tmpfs(tmp_path, "64m", f"""
        $DYN {args} --stop-at 2 >/dev/null 2>"$OUT/err1"; echo $? > "$OUT/rc1"
        $FILL "$MNT/filler" 16384
        $DYN {args} --resume >/dev/null 2>"$OUT/err2"; echo $? > "$OUT/rc2"
        cp -a "$MNT/run" "$OUT/full"
        rm "$MNT/filler"
        $DYN {args} --resume >/dev/null 2>"$OUT/err3"; echo $? > "$OUT/rc3"
        cp -a "$MNT/run" "$OUT/run"
    """)
    assert (out / "rc1").read_text().strip() == "0", (out / "err1").read_text()
    err = (out / "err2").read_text()
    assert (out / "rc2").read_text().strip() == "1", err
    assert "Traceback" not in err and "enforce fail" not in err
    mnt = tmp_path / "mnt"
    assert f"disk full: checkpoint {mnt}/run/checkpoints/step_4 needs about" in err
    assert f"file system holding {mnt}/run/checkpoints ran out of space" in err
    number, unit = err.split("needs about ")[1].split()[:2]
    need = float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    size = sum(f.stat().st_size for f in (out / "full/checkpoints/step_2").iterdir())
    assert 0.5 * size < need <= 1.01 * size  # the tensors' bytes: most of the folder
    assert [s for s, _ in complete_checkpoints(out / "full")] == [0, 2]
    assert not list((out / "full/checkpoints").glob(".tmp-*"))
    assert (out / "rc3").read_text().strip() == "0", (out / "err3").read_text()
    assert_same_run(reference["decoder"], out / "run")


# ------------------------------------------------------------------ 4. run names as paths


def tree_of(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root`: files with their bytes, folders as None."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("names", [["../r", "/r"], ["x/r", "[/x]"], ["..", "."]])
def test_export_writes_every_run_inside_out_under_a_mapped_name(tmp_path, names):
    """Runs named `../r`, `/r`, `x/r`, `..`, `.` (as folder names and `analyze r x/r` make
    them) are exported each to one folder directly inside --out, percent-encoded; the marker
    folder `r` beside --out and the filesystem root are untouched; the mapping is stated."""
    from typer.testing import CliRunner

    from dynlab.analysis.export import run_folder
    from dynlab_cli.main import app

    box = tmp_path / "box"
    (box / "r").mkdir(parents=True)
    (box / "r" / "marker").write_text("not dynlab's")
    store = store_with_runs(tmp_path / "s.zarr", names)
    before = tree_of(box)
    res = CliRunner().invoke(app, ["export", str(store), "-o", str(box / "exp")])
    assert res.exit_code == 0, res.output
    for name in names:
        assert f"run {name!r} is not a plain folder name; it is exported to " \
               f"{box / 'exp' / run_folder(name)}" in res.output
    folders = sorted(p.name for p in (box / "exp").iterdir())
    assert folders == sorted(run_folder(n) for n in names)
    assert all("/" not in f and f not in (".", "..") and not f.startswith(".") for f in folders)
    assert {k: v for k, v in tree_of(box).items() if not k.startswith("exp")} == before
    assert not Path("/r").exists()
    # every file of each run is under its own folder, with the values of that run
    for name in names:
        files = list((box / "exp" / run_folder(name)).rglob("*.json"))
        assert files and all(f.resolve().is_relative_to((box / "exp").resolve())
                             for f in files)


def test_run_folder_is_one_to_one_and_keeps_plain_names():
    from dynlab.analysis.export import run_folder

    names = ["r", "run-1.b", "../r", "x/r", "/r", "x%2Fr", ".", "..", ".hidden", "a b", "é"]
    assert run_folder("r") == "r" and run_folder("run-1.b") == "run-1.b"
    assert run_folder("x/r") == "x%2Fr" and run_folder("../r") == "%2E.%2Fr"
    folders = [run_folder(n) for n in names]
    assert len(set(folders)) == len(names)  # x/r and a run literally named x%2Fr differ
    from urllib.parse import unquote

    assert [unquote(f) for f in folders] == names


# ------------------------------------------------------------------ 7, 8, 10 on dynlab runs


@pytest.fixture
def run_copy(reference, tmp_path):
    run = tmp_path / "decoder"
    shutil.copytree(reference["decoder"], run)
    return run


def cli(*args, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """A real `dynlab` process run to its end; its stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "dynlab_cli.main", *map(str, args)],
                          env=child_env(**env),
                          capture_output=True, text=True, timeout=300, cwd=cwd, check=False)


def one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr
    return res.stderr


def invoke_error(*args, code: int = 2) -> str:
    """`dynlab ARGS` in this process (typer's runner): exit `code`, one line, no traceback;
    returns what it printed."""
    from typer.testing import CliRunner

    from dynlab_cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit | None), res.exception
    assert "Traceback" not in res.output and res.output.strip().count("\n") == 0, res.output
    return res.output


def test_duplicate_steps_unknown_target_and_integer_weights_are_errors(run_copy, tmp_path):
    """step_2 and step_02 (other weights) in one run: exit 2 naming both; --target 999: exit
    2 listing the steps there are, before any store is made; weights stored as int64: exit 2
    naming the file and tensor."""
    ckpts = run_copy / "checkpoints"
    shutil.copytree(ckpts / "step_4", ckpts / "step_02")
    meta = json.loads((ckpts / "step_02/meta.json").read_text())
    (ckpts / "step_02/meta.json").write_text(json.dumps(meta | {"step": 2}))
    err = invoke_error("analyze", run_copy, "-o", tmp_path / "a.zarr")
    assert f"{ckpts / 'step_02'} and {ckpts / 'step_2'} both claim step 2" in err
    shutil.rmtree(ckpts / "step_02")

    err = invoke_error("analyze", run_copy, "-o", tmp_path / "a.zarr", "--target", "999")
    assert "--target 999: run 'decoder' has no checkpoint at step 999 (steps: 0, 2, 4, 6" in err
    err = invoke_error("analyze", run_copy, "-o", tmp_path / "a.zarr", "--target", "decoder@5")
    assert "no checkpoint at step 5 (steps: 0, 2, 4, 6" in err
    assert not (tmp_path / "a.zarr").exists()

    from safetensors.torch import load_file, save_file

    path = ckpts / "step_0" / "weights.safetensors"
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith("attention.q_proj.weight"))
    tensors[name] = (tensors[name] * 1000).to(torch.int64)
    save_file(tensors, str(path))
    err = invoke_error("analyze", run_copy, "-o", tmp_path / "a.zarr")
    assert f"{path}: {name} is stored as int64; expected floating-point weights" in err


def test_latest_is_final():
    from dynlab.analysis.activations import parse_targets

    assert parse_targets("latest") == ["final"]
    assert parse_targets("latest,first,final") == ["final", "first"]


@pytest.mark.slow
def test_activations_data_with_a_tokenizer_larger_than_the_model(run_copy, tmp_path):
    """A run whose tokenizer.json has more ids than the model's 300 embedding rows:
    --activations-data is exit 2 naming the id and the rows, not torch's IndexError."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from dynlab.data.grammar import generate_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(generate_corpus(300), trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() > 300
    tok.save(str(run_copy / "tokenizer.json"))
    err = one_line_error(cli("analyze", run_copy, "-o", tmp_path / "a.zarr",
                             "--activations-data", "default"))
    assert "--activations-data default: the tokenizer gives token id" in err
    assert "has 300 embedding rows; its tokenizer does not belong to this model" in err


@pytest.mark.slow
def test_report_of_runs_named_with_markup_and_control_characters(tmp_path):
    """Runs named `[/x]` and `r\\x1b]0;owned\\x07`: `dynlab report` exits 0 (no MarkupError),
    shows `[/x]` as it is, and writes no ESC byte to the terminal."""
    store = store_with_runs(tmp_path / "s.zarr", ["[/x]", "r\x1b]0;owned\x07"])
    res = cli("report", store, "-o", tmp_path / "report.html", COLUMNS="300")
    assert res.returncode == 0, res.stderr
    assert "[/x]" in res.stdout and "r\\x1b]0;owned\\x07" in res.stdout
    assert "\x1b" not in res.stdout + res.stderr and "\x07" not in res.stdout + res.stderr
