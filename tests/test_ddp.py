"""Distributed training with real processes (gloo on CPU, 127.0.0.1, free ports): two
processes train what one process trains, checkpoints and resume included, and a ReLoRA
reset leaves every rank's parameters and optimizer state bitwise equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import dynlab
from dynlab.runs.layout import complete_checkpoints
from dynlab.runs.metrics import read_metrics
from dynlab.training import ddp

pytestmark = [pytest.mark.slow,  # real torchrun processes
              pytest.mark.usefixtures("one_thread", "private_cache")]

ROOT = Path(__file__).resolve().parents[1]

# tiny model, one thread per process; lr 3e-4 and s = alpha / r = 2 keep Adam's amplification
# of float rounding (sign-like updates of freshly pruned moments) well below the tolerance
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=64,
            seq_len=16, ld_batch_size=3, vocab_size=300, n_documents=150, eval_every=0,
            progress=False, log_every=1, threads=1, lr=3e-4, warmup_steps=2)
RELORA = dict(lora_rank=2, lora_alpha=4.0, lora_dropout=0.0, reset_every=3,
              restart_warmup_steps=1, prune_ratio=0.5, prune_method="random")
TOL = dict(rtol=1e-5, atol=1e-5)


def flags(options: dict) -> list[str]:
    out = []
    for k, v in options.items():
        if v is True:
            out.append("--" + k.replace("_", "-"))
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        else:
            out.append(f"--{k.replace('_', '-')}={v}")
    return [f.replace("--activation-hidden-dim", "--hidden-dim") for f in out]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def assert_same_training(one: Path, two: Path, steps: list[int]) -> None:
    """Loss curves equal to 1e-5; weights and learning-dynamics grads of the given
    checkpoints equal to 1e-5 (relative or absolute)."""
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b)
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst < 1e-5, (worst, a, b)
    assert len(set(a.values())) > len(a) // 2  # the loss moves: a real curve
    for s in steps:
        for f in ("weights", "grads"):
            x = load_file(one / f"checkpoints/step_{s}/{f}.safetensors")
            y = load_file(two / f"checkpoints/step_{s}/{f}.safetensors")
            assert x.keys() == y.keys()
            for k in x:
                torch.testing.assert_close(y[k], x[k], **TOL, msg=f"step {s} {f} {k}")


def test_decoder_two_processes_match_one_and_resume_with_one(tmp_path):
    """`dynlab train decoder --nproc 2` (global batch 4 = 2 per process, 2 micro-batches
    per update) equals one process; interrupted, it resumes in ONE process from rank 0's
    checkpoint (the data position counts global samples) and still equals it."""
    opts = dict(TINY, steps=12, checkpoint_every=4, batch_size=4, grad_accum=2)
    one = dynlab.train("decoder", out=str(tmp_path / "one"), **opts)
    two = tmp_path / "two"
    res = run([sys.executable, "-m", "dynlab_cli.main", "train", "decoder", "--out", str(two),
               "--nproc", "2", "--stop-at", "10", *flags(opts)])
    assert res.stdout.strip().splitlines() == [str(two)]  # rank 0 alone prints
    assert [s for s, _ in complete_checkpoints(two)] == [0, 4, 8]
    run_json = json.loads((two / "run.json").read_text())
    assert run_json["distributed"] == {"world_size": 2, "backend": "gloo",
                                       "batch_size_per_process": 2}
    meta8 = json.loads((two / "checkpoints/step_8/meta.json").read_text())
    assert (meta8["world_size"], meta8["ranks_in_step"]) == (2, True)
    assert meta8["tokens"] == 8 * 4 * 2 * 16  # global tokens: steps x batch x accum x seq
    assert max(losses(two)) == 10
    dynlab.train("decoder", out=str(two), resume=True, **opts)  # one process
    assert_same_training(one, two, [0, 4, 8, 12])
    assert "world_size" not in json.loads((two / "checkpoints/step_12/meta.json").read_text())


@pytest.mark.soak  # four torchrun launches; make test keeps the decoder's two processes
def test_relora_torchrun_matches_one_process_through_resets_and_resume(tmp_path):
    """`torchrun --nproc-per-node 2 -m dynlab train relora`, stopped after step 8 and resumed
    under torchrun from checkpoint 5: resets after steps 3, 6 and 9 (the latter two replayed
    on resume), random pruning of half the Adam moments. Every loss, weight and gradient
    equals the single-process run."""
    opts = dict(TINY, **RELORA, steps=10, checkpoint_every=5, batch_size=4)
    one = dynlab.train("relora", out=str(tmp_path / "one"), **opts)
    two = tmp_path / "two"
    cmd = ["-m", "dynlab", "train", "relora", "--out", str(two), *flags(opts)]
    run(ddp.launch_command(2, cmd + ["--stop-at=8"]))
    assert [s for s, _ in complete_checkpoints(two)] == [0, 5]
    run(ddp.launch_command(2, cmd + ["--resume"]))
    assert_same_training(one, two, [0, 5, 10])
    for s in (5, 10):
        m1 = json.loads((one / f"checkpoints/step_{s}/meta.json").read_text())
        m2 = json.loads((two / f"checkpoints/step_{s}/meta.json").read_text())
        assert m1["relora_cycle"] == m2["relora_cycle"] == {5: 1, 10: 3}[s]
        assert m2["ranks_in_step"] is True and m2["world_size"] == 2
    ts = torch.load(two / "checkpoints/step_10/trainer_state.pt", weights_only=True)
    assert len(ts["rng_by_rank"]) == 2
    assert not torch.equal(ts["rng_by_rank"][0]["cpu"], ts["rng_by_rank"][1]["cpu"])


# ------------------------------------------------------------------ reset in step


def _reset_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank: a relora model with LoRA dropout 0.1 and the trainer's per-rank RNG streams,
    two DDP steps on this rank's own data, a reset, one more step; then its parameters and
    Adam moments saved. Done twice: with the trainer's reset (ddp.relora_reset) and, as a
    control, with a bare merge_and_reset."""
    import torch.distributed as dist

    from dynlab.model.relora import merge_and_reset
    from dynlab.training.config import TrainConfig, model_config, relora_config
    from dynlab.training.step import train_step
    from dynlab.training.trainer import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        options = TINY | RELORA | dict(lora_dropout=0.1, prune_ratio=0.9, vocab_size=50)
        cfg = TrainConfig(kind="relora", **options).resolved()
        cpu = torch.device("cpu")
        gen = torch.Generator().manual_seed(100 + rank)
        for synced in (True, False):
            model = build_model(cfg, model_config(cfg, 50), None)
            torch.manual_seed(ddp.rank_seed(cfg.seed, rank))  # as the trainer does
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                    lr=1e-2)
            wrapped = ddp.wrap(model, cpu)
            for i in range(3):
                if i == 2:
                    if synced:
                        ddp.relora_reset(model, opt, relora_config(cfg))
                    else:
                        merge_and_reset(model, opt, relora_config(cfg))
                batch = torch.randint(0, 50, (2, 17), generator=gen)
                train_step(wrapped, opt, [batch], 1e-2, cpu, no_sync=wrapped.no_sync)
            n_differ, _ = ddp.out_of_step(ddp.state_tensors(model, opt))
            tensors = {k: v.detach().clone() for k, v in ddp.state_tensors(model, opt).items()}
            tensors["n_differ"] = torch.tensor([n_differ])
            from safetensors.torch import save_file

            save_file(tensors, f"{out}/{'sync' if synced else 'bare'}_rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_reset_leaves_ranks_bitwise_equal(tmp_path):
    """Two spawned processes whose RNG streams differ (LoRA dropout): after the trainer's
    reset and a further step, every parameter and Adam moment is bitwise equal across ranks.
    Control: a bare merge_and_reset re-initialises A and prunes moments differently per rank,
    which the comparison and the trainer's own check (out_of_step) both detect."""
    import torch.multiprocessing as mp

    mp.spawn(_reset_worker, args=(2, ddp.free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = load_file(tmp_path / "sync_rank0.safetensors")
    r1 = load_file(tmp_path / "sync_rank1.safetensors")
    assert r0.keys() == r1.keys()
    assert any(k.endswith("lora_A.exp_avg_sq") for k in r0)  # moments are compared too
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert r0["n_differ"].item() == r1["n_differ"].item() == 0
    b0 = load_file(tmp_path / "bare_rank0.safetensors")
    b1 = load_file(tmp_path / "bare_rank1.safetensors")
    differ = {k for k in b0 if not torch.equal(b0[k], b1[k])}
    assert "layers.0.attention.q_proj.lora_A" in differ
    assert "layers.1.swiglu.w_2.lora_B.exp_avg" in differ
    assert b0["n_differ"].item() == b1["n_differ"].item() > 0
    # before the reset the ranks agreed: frozen W (merged from equal factors) still agree
    assert "layers.0.attention.q_proj.weight" not in differ


# ------------------------------------------------------------------ options


def test_nproc_batch_size_must_divide(tmp_path):
    from dynlab_cli.main import app

    assert ddp.check_batch_size(8, 2) == 4
    with pytest.raises(ValueError, match=r"--batch-size 6: not divisible by the 4 processes"):
        ddp.check_batch_size(6, 4)
    res = CliRunner().invoke(app, ["train", "decoder", "--out", str(tmp_path / "r"),
                                   "--nproc", "2", "--batch-size", "3", "--no-progress"])
    assert res.exit_code == 2
    assert "--batch-size 3: not divisible by the 2 processes" in res.output
    assert not (tmp_path / "r").exists()
