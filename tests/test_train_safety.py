"""Runs survive interruptions and bad input: real `dynlab train` processes are killed (SIGKILL)
or interrupted (SIGINT) at named phases (dynlab.faults), rerun, and compared with an
uninterrupted run file by file; the training RNG is independent of evaluation and of
learning-dynamics capture; bad input to `dynlab train` / `dynlab eval` is a one-line message
with exit status 2, never a traceback, and never costs a file dynlab did not write."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import dynlab
from dynlab.eval import EvalDataWarning
from dynlab.runs.layout import complete_checkpoints, remove_run_files
from dynlab.runs.metrics import read_metrics, record_from_meta, repaired_metrics
from dynlab_cli.console import INTERRUPTED_MESSAGE
from dynlab_cli.main import app

ROOT = Path(__file__).resolve().parents[1]

# the smallest runs that exercise every path: 6 updates, a checkpoint every 2
TINY = dict(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=32,
            seq_len=16, batch_size=2, ld_batch_size=3, vocab_size=300, n_documents=150,
            progress=False, log_every=1, threads=1, steps=6, checkpoint_every=2,
            warmup_steps=2)
DECODER = dict(TINY, eval_every=0)
# relora with LoRA dropout (draws from the training RNG), resets and in-training evaluation
RELORA = dict(TINY, eval_every=2, reset_every=2, restart_warmup_steps=1, lora_rank=2,
              lr=3e-3)
TIMING = {"wall_seconds", "tokens_per_second", "gpu_hours"}  # wall-clock measures


def cli_args(kind: str, out: Path, opts: dict) -> list[str]:
    """The `dynlab train KIND` command line for these options (as the Python API takes them)."""
    args = ["train", kind, "--out", str(out)]
    for name, value in opts.items():
        flag = "--" + ("hidden-dim" if name == "activation_hidden_dim"
                       else name.replace("_", "-"))
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


@contextlib.contextmanager
def quiet_eval():
    """Silence the evaluation data's warnings (pairs longer than the tiny context)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvalDataWarning)
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tokenizer cache for the module, shared with the processes it starts."""
    path = tmp_path_factory.mktemp("cache")
    before = os.environ.get("DYNLAB_CACHE")
    os.environ["DYNLAB_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("DYNLAB_CACHE", None)
    else:
        os.environ["DYNLAB_CACHE"] = before


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """Uninterrupted runs, trained in this process: {"decoder": RUN, "relora": RUN}."""
    root = tmp_path_factory.mktemp("reference")
    with quiet_eval():
        relora = dynlab.train("relora", out=str(root / "relora"), **RELORA)
    return {"decoder": dynlab.train("decoder", out=str(root / "decoder"), **DECODER),
            "relora": relora}


def without_timing(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING}


def assert_same_run(a: Path, b: Path) -> None:
    """metrics.jsonl line by line and every checkpoint (weights, gradients, meta.json) equal,
    bitwise; only the wall-clock fields may differ."""
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in mb] == [r["step"] for r in ma]
    assert [without_timing(r) for r in mb] == [without_timing(r) for r in ma]
    ca, cb = complete_checkpoints(a), complete_checkpoints(b)
    assert [s for s, _ in cb] == [s for s, _ in ca]
    for (_, pa), (_, pb) in zip(ca, cb, strict=True):
        for name in ("weights.safetensors", "grads.safetensors"):
            ta, tb = load_file(pa / name), load_file(pb / name)
            assert ta.keys() == tb.keys()
            assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{pb / name} differs"
        meta_a = json.loads((pa / "meta.json").read_text())
        meta_b = json.loads((pb / "meta.json").read_text())
        assert without_timing(meta_b) == without_timing(meta_a)
    assert not list((b / "checkpoints").glob(".tmp-*")), "temporary checkpoints left behind"


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


# ------------------------------------------------------------------ processes and faults


def dynlab_cmd(args: list[str], fault: str | None = None, mark: Path | None = None,
               **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("DYNLAB_FAULT", None)
    if fault:
        env["DYNLAB_FAULT"] = fault
    if mark:
        env["DYNLAB_FAULT_MARK"] = str(mark)
    return subprocess.Popen([sys.executable, "-m", "dynlab_cli.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run_dynlab(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    proc = dynlab_cmd(args, fault)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # timed out: end the process this test started
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_between_checkpoint_rename_and_metrics_line_is_repaired(reference, tmp_path):
    """SIGKILL after checkpoint step_2 is renamed into place, before its metrics line: the
    resumed run restores that line from step_2/meta.json and ends equal to the uninterrupted
    run."""
    out = tmp_path / "run"
    args = cli_args("decoder", out, DECODER)
    res = run_dynlab(args, fault="checkpoint.renamed:kill@2")
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert [s for s, _ in complete_checkpoints(out)] == [0, 2]
    assert [r["step"] for r in read_metrics(out)] == [0, 1]  # step 2's line was lost
    res = run_dynlab(args + ["--resume"])
    assert res.returncode == 0, res.stderr
    assert_same_run(reference["decoder"], out)
    # the rebuilt line: the checkpoint's values (its rate is the run's mean up to it)
    meta = json.loads((out / "checkpoints/step_2/meta.json").read_text())
    line = next(r for r in read_metrics(out) if r["step"] == 2)
    assert line["tokens_per_second"] == pytest.approx(meta["tokens"] / meta["wall_seconds"])


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_same_command_continues_relora_exactly(reference, tmp_path):
    """SIGINT after update 3 of a relora run (dropout, resets, evaluation every 2 steps):
    exit 130 with the one-line message; rerunning the very same command continues the run
    (said on the console), and the result equals the uninterrupted run bitwise."""
    out = tmp_path / "run"
    args = cli_args("relora", out, RELORA)
    res = run_dynlab(args, fault="train.step:interrupt@3")
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip().splitlines()[-1] == INTERRUPTED_MESSAGE
    assert "Traceback" not in res.stderr
    assert [s for s, _ in complete_checkpoints(out)] == [0, 2]
    res = run_dynlab(args)  # the same command, no --resume
    assert res.returncode == 0, res.stderr
    assert "unfinished run of these options; continuing it" in res.stderr
    assert_same_run(reference["relora"], out)


@pytest.mark.soak  # three processes; make test kills at a checkpoint's rename
@pytest.mark.slow
def test_kill_while_resume_replaces_the_metrics_log(reference, tmp_path):
    """Killed mid-run, then killed again while the resume replaces metrics.jsonl: the log is
    never truncated in place (the old one is intact), and a third run completes exactly."""
    out = tmp_path / "run"
    args = cli_args("decoder", out, DECODER)
    res = run_dynlab(args, fault="train.step:kill@3")
    assert res.returncode == -signal.SIGKILL
    before = (out / "metrics.jsonl").read_text()
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]
    res = run_dynlab(args + ["--resume"], fault="metrics.before-replace:kill")
    assert res.returncode == -signal.SIGKILL
    assert (out / "metrics.jsonl").read_text() == before
    res = run_dynlab(args + ["--resume"])
    assert res.returncode == 0, res.stderr
    assert_same_run(reference["decoder"], out)


@pytest.mark.slow
def test_ctrl_c_from_outside_while_a_checkpoint_is_written(reference, tmp_path):
    """The process pauses with checkpoint step_4 assembled but not renamed; the test sends
    SIGINT: exit 130, step_4 absent (its temporary directory is cleaned on resume), and the
    resumed run equals the uninterrupted one."""
    out, mark = tmp_path / "run", tmp_path / "paused"
    args = cli_args("decoder", out, DECODER)
    proc = dynlab_cmd(args, fault="checkpoint.before-rename:pause@3", mark=mark)
    try:
        wait_for(mark, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == INTERRUPTED_MESSAGE
    assert [s for s, _ in complete_checkpoints(out)] == [0, 2]
    assert list((out / "checkpoints").glob(".tmp-step_4-*"))
    res = run_dynlab(args + ["--resume"])
    assert res.returncode == 0, res.stderr
    assert_same_run(reference["decoder"], out)


@pytest.mark.slow
def test_ctrl_c_during_eval_exits_130_and_the_rerun_completes(copy_run, tmp_path):
    """`dynlab eval RUN` interrupted (SIGINT) after its second checkpoint: exit 130 with the
    one-line message, the finished eval.json files intact; the rerun evaluates all four,
    equal to what the interrupted one had written."""
    run = copy_run()
    ppl = tmp_path / "held_out.txt"
    ppl.write_text("the cat sat on the mat.\n\nthe dog saw the cat.\n")
    args = ["eval", str(run), "--blimp", "none", "--ppl", str(ppl)]
    res = run_dynlab(args, fault="eval.stored:interrupt@2")
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip().splitlines()[-1] == INTERRUPTED_MESSAGE
    done = {s: (c / "eval.json").read_text() for s, c in complete_checkpoints(run)
            if (c / "eval.json").exists()}
    assert sorted(done) == [0, 2]
    res = run_dynlab(args)
    assert res.returncode == 0, res.stderr
    after = {s: (c / "eval.json").read_text() for s, c in complete_checkpoints(run)}
    assert sorted(after) == [0, 2, 4, 6]
    assert {s: after[s] for s in done} == done


# ------------------------------------------------------------------ the training RNG


@pytest.mark.slow  # four training runs
@pytest.mark.parametrize("kind", ["decoder", "relora"])
def test_loss_curve_independent_of_evaluation_and_activations(kind, reference, tmp_path):
    """Evaluating at every step and saving activations change nothing in training: the loss
    curve and the final weights equal those of a run that does neither, bitwise."""
    opts = dict(RELORA if kind == "relora" else DECODER)
    plain = dynlab.train(kind, out=str(tmp_path / "plain"), **(opts | dict(eval_every=0)))
    with quiet_eval():
        busy = dynlab.train(kind, out=str(tmp_path / "busy"),
                            **(opts | dict(eval_every=1, save_activations=True)))
    assert "eval" in read_metrics(busy)[1]
    assert (busy / "checkpoints/step_2/activations.safetensors").is_file()
    assert losses(busy) == losses(plain)
    wa = load_file(plain / "checkpoints/step_6/weights.safetensors")
    wb = load_file(busy / "checkpoints/step_6/weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_relora_with_evaluation_stopped_and_resumed_is_exact(reference, tmp_path):
    """Stopped after update 3 (between evaluations at 2 and 4, with a reset pending), then
    resumed: equal to the uninterrupted run with the same evaluations, bitwise."""
    out = tmp_path / "run"
    with quiet_eval():
        dynlab.train("relora", out=str(out), stop_at=3, **RELORA)
        dynlab.train("relora", out=str(out), resume=True, **RELORA)
    assert_same_run(reference["relora"], out)


def test_unwrap_leaves_the_global_rng_alone():
    from dynlab.model import ModelConfig, PicoDecoder
    from dynlab.model.relora import ReLoRAConfig, unwrap, wrap_relora

    torch.manual_seed(3)
    model = wrap_relora(PicoDecoder(ModelConfig(16, 1, 4, 2, 8, 11, 8)),
                        ReLoRAConfig(r=2, alpha=4.0, reset_every=5, restart_warmup_steps=0))
    state = torch.get_rng_state()
    plain = unwrap(model)
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.randint(0, 11, (2, 8))
    model.eval()
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the metrics log


def test_repaired_metrics_keeps_earlier_lines_and_rebuilds_lost_checkpoint_lines():
    def line(step, loss):
        return (step, json.dumps({"step": step, "loss": loss}))

    lines = [line(0, 5.0), line(1, 4.0), line(3, 3.0), line(5, 2.0)]
    metas = [{"step": 0, "train_loss": 5.0, "tokens": 0, "lr": 0.1, "wall_seconds": 1.0},
             {"step": 2, "train_loss": 3.5, "tokens": 64, "lr": 0.2, "wall_seconds": 2.0,
              "relora_cycle": 1, "eval": {"x": 1}},
             {"step": 4, "train_loss": 2.5, "tokens": 128, "lr": 0.3, "wall_seconds": 4.0}]
    got = [json.loads(x) for x in repaired_metrics(lines, 3, metas)]
    # step 0 keeps its own line, step 2 is rebuilt, step 4 and 5 are beyond the resume point
    assert got == [{"step": 0, "loss": 5.0}, {"step": 1, "loss": 4.0},
                   {"step": 2, "loss": 3.5, "lr": 0.2, "tokens": 64, "wall_seconds": 2.0,
                    "tokens_per_second": 32.0, "relora_cycle": 1, "eval": {"x": 1}},
                   {"step": 3, "loss": 3.0}]
    assert repaired_metrics(lines, -1, metas) == []


def test_a_checkpoint_line_rebuilt_from_meta_equals_the_logged_one(reference):
    run = reference["relora"]
    logged = {r["step"]: r for r in read_metrics(run)}
    for step, ckpt in complete_checkpoints(run):
        rebuilt = record_from_meta(json.loads((ckpt / "meta.json").read_text()))
        assert list(rebuilt) == list(logged[step])  # same keys, same order
        assert without_timing(rebuilt) == without_timing(logged[step])


# ------------------------------------------------------------------ --out: never lose a file


def foreign_files(run: Path) -> dict[str, bytes]:
    (run / "notes.txt").write_text("keep me")
    (run / "store.zarr").mkdir()
    (run / "store.zarr" / "zarr.json").write_text("{}")
    return {"notes.txt": b"keep me", "store.zarr/zarr.json": b"{}"}


def assert_kept(run: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        assert (run / name).read_bytes() == content, f"{name} was lost"


def test_resume_with_no_checkpoint_starts_again_and_deletes_nothing_foreign(reference, tmp_path):
    """A run interrupted before its first checkpoint: --resume says so, keeps the user's files,
    removes only dynlab's unfinished checkpoint, and trains the run from step 0."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "tokenizer.json"):
        shutil.copy(reference["decoder"] / name, run / name)
    (run / "checkpoints" / ".tmp-step_0-1234").mkdir(parents=True)
    files = foreign_files(run)
    with pytest.warns(UserWarning, match="no complete checkpoint; starting the run at step 0"):
        dynlab.train("decoder", out=str(run), resume=True)
    assert_kept(run, files)
    assert_same_run(reference["decoder"], run)


def test_resume_outside_a_run_is_an_error_that_changes_nothing(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    files = foreign_files(out)
    res = CliRunner().invoke(app, cli_args("decoder", out, DECODER) + ["--resume"])
    assert res.exit_code == 2
    assert "has no run.json (nothing to resume)" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "store.zarr"]
    assert_kept(out, files)


def test_overwrite_replaces_only_what_dynlab_wrote(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["decoder"], run)
    files = foreign_files(run)
    (run / "checkpoints" / "README").write_text("mine")
    dynlab.train("decoder", out=str(run), overwrite=True, **(DECODER | dict(steps=2)))
    assert_kept(run, files | {"checkpoints/README": b"mine"})
    assert [s for s, _ in complete_checkpoints(run)] == [0, 2]
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]
    remove_run_files(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "notes.txt", "store.zarr"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["README"]


# ------------------------------------------------------------------ bad input: messages


def invoke(*args) -> object:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), \
        res.exception
    return res


@pytest.fixture
def copy_run(reference, tmp_path):
    def make(kind: str = "decoder") -> Path:
        run = tmp_path / kind
        shutil.copytree(reference[kind], run)
        return run
    return make


def edit_run_json(run: Path, section: str, key: str, value) -> None:
    rec = json.loads((run / "run.json").read_text())
    rec[section][key] = value
    (run / "run.json").write_text(json.dumps(rec))


@pytest.mark.parametrize("key,value", [("n_heads", "four"), ("n_kv_heads", 0)])
def test_bad_run_json_is_named_on_resume_and_on_eval(copy_run, key, value):
    run = copy_run()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    edit_run_json(run, "train", key, value)
    res = invoke(*cli_args("decoder", run, DECODER), "--resume")
    assert res.exit_code == 2
    assert str(run / "run.json") in res.output and key in res.output
    edit_run_json(run, "model", key, value)
    res = invoke("eval", run, "--blimp", "none", "--ppl", "none")
    assert res.exit_code == 2
    assert str(run / "run.json") in res.output and key in res.output
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


@pytest.mark.parametrize("line,message", [
    ('lr: "fast"', "--lr: expected a number, got 'fast'"),
    ('alpha: [1]', "--lora-alpha: expected a number, got [1]"),
    ('seed: "x"', "--seed: expected an integer, got 'x'"),
    ("data: 7", "--data: expected a string, got 7"),
    ("warm-start: 3", "--warm-start: expected a string, got 3"),
    ('progress: "no"', "--progress: expected true or false, got 'no'"),
])
def test_config_value_of_the_wrong_type(tmp_path, line, message):
    config = tmp_path / "c.yaml"
    config.write_text(line + "\n")
    res = invoke("train", "relora", "--config", config, "--out", tmp_path / "r")
    assert res.exit_code == 2
    assert message in res.output
    assert not (tmp_path / "r").exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name", ["trainer_state.pt", "weights.safetensors"])
def test_truncated_checkpoint_file_on_resume(copy_run, name):
    """The latest checkpoint's file is cut in half: a message naming it (and how to resume
    from the checkpoint before), exit 2, and not one file changed."""
    run = copy_run()
    path = run / "checkpoints" / "step_6" / name
    truncate(path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = invoke(*cli_args("decoder", run, DECODER), "--resume")
    assert res.exit_code == 2
    assert str(path) in res.output
    assert "truncated" in res.output and "move" in res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


class NotAState:
    """A class torch's weights_only unpickler refuses."""


def test_trainer_state_that_is_not_ours_is_never_unpickled(copy_run):
    run = copy_run()
    path = run / "checkpoints" / "step_6" / "trainer_state.pt"
    torch.save({"state": {}, "optimizer": {}, "rng": {}, "frozen_weights": {},
                "x": NotAState()}, path)
    res = invoke(*cli_args("decoder", run, DECODER), "--resume")
    assert res.exit_code == 2
    assert f"{path}: not a dynlab trainer state" in res.output
    assert "weights_only" not in res.output
    # a plain mapping that is not a trainer state is refused too
    torch.save({"weights": torch.zeros(2)}, path)
    res = invoke(*cli_args("decoder", run, DECODER), "--resume")
    assert res.exit_code == 2
    assert f"{path}: not a dynlab trainer state (expected a mapping with 'state'" in res.output


def test_binary_blimp_file_is_named(copy_run, tmp_path):
    run = copy_run()
    binary = tmp_path / "blimp.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    res = invoke("eval", run / "checkpoints" / "step_6", "--blimp", binary, "--ppl", "none")
    assert res.exit_code == 2
    assert str(binary) in res.output and "not a UTF-8" in res.output


def test_eval_with_a_truncated_checkpoint(copy_run, tmp_path):
    """--on-error fail names the checkpoint (exit 2); skip evaluates the others, writes them
    to -o and exits 1."""
    run = copy_run()
    ppl = tmp_path / "held_out.txt"
    ppl.write_text("the cat sat on the mat.\n\nthe dog saw the cat.\n")
    truncate(run / "checkpoints" / "step_2" / "weights.safetensors")
    res = invoke("eval", run, "--blimp", "none", "--ppl", ppl)
    assert res.exit_code == 2
    assert str(run / "checkpoints" / "step_2" / "weights.safetensors") in res.output
    out = tmp_path / "eval.json"
    res = invoke("eval", run, "--blimp", "none", "--ppl", ppl, "--on-error", "skip",
                 "-o", out)
    assert res.exit_code == 1
    assert "skipped" in res.output and "step_2" in res.output
    results = json.loads(out.read_text())
    assert [r["step"] for r in results] == [0, 4, 6]
    # each equals a separate evaluation of that checkpoint
    one = tmp_path / "one.json"
    assert invoke("eval", run / "checkpoints" / "step_4", "--blimp", "none", "--ppl", ppl,
                  "-o", one).exit_code == 0
    assert json.loads(one.read_text()) == results[1]


def test_plot_of_a_corrupt_store_is_a_message(tmp_path):
    store = tmp_path / "bad.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{not json")
    res = invoke("plot", store, "-o", tmp_path / "fig.html")
    assert res.exit_code == 2
    assert f"store {store}: not a readable dynlab store" in res.output
    assert not (tmp_path / "fig.html").exists()


@pytest.mark.parametrize("key,value", [("n_heads", "four"), ("n_kv_heads", 0)])
def test_bad_run_json_is_named_for_analysis(reference, key, value):
    from dynlab.runs.checkpoints import CheckpointError, ModelSpec

    config = json.loads((reference["decoder"] / "run.json").read_text())
    config["model"][key] = value
    with pytest.raises(CheckpointError, match=rf"run.json: run.json's model.{key} must be a "
                                              rf"positive integer, got {value!r}"):
        ModelSpec.from_run_config(config, Path("RUN/run.json"))
