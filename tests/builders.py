"""Builders of the tiny models and runs the tests share (imported by the test modules;
tests/ is on sys.path as pytest's rootdir-relative test folder)."""

from __future__ import annotations

from typing import Any

#: the shape of the tiny synthetic runs the analysis tests write (dynlab.runs.checkpoints.ModelSpec
#: arguments): 2 layers of d 32, 4 heads sharing 2 kv heads, hidden 48, vocabulary 64
TINY_SPEC_ARGS = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=48,
                      vocab_size=64)


def tiny_train_options(**overrides: Any) -> dict[str, Any]:
    """Options of dynlab.train (and `dynlab train`) for a model small enough for tests: 2
    layers of d 16, 300-token BPE on 150 generated documents, batches of 2 x 16 tokens, a
    3-sequence learning-dynamics batch, no evaluation, a metrics line per step; `overrides`
    replace or add options."""
    return dict(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=32,
                seq_len=16, batch_size=2, ld_batch_size=3, vocab_size=300, n_documents=150,
                eval_every=0, progress=False, log_every=1) | overrides


def tiny_model_config(**overrides: Any):
    """dynlab.model.ModelConfig of 2 layers of d 16, 4 heads sharing 2 kv heads, hidden 24,
    with `overrides` (vocab_size and max_seq_len are required)."""
    from dynlab.model import ModelConfig

    return ModelConfig(**(dict(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                               activation_hidden_dim=24) | overrides))


def heavy_tailed_run(out, steps=(0, 10)):
    """A synthetic dynlab run (dynlab.testing.make_run) of one layer of d 24 whose layer-0
    q_proj has a planted heavy-tailed spectrum (24 Pareto(1.5) singular values + 1, scaled by
    0.05; one seeded basis per step): the heavy-tail tests' store has tails to fit."""
    import numpy as np
    import torch

    from dynlab.runs.checkpoints import ModelSpec
    from dynlab.testing import make_run, matrix_with_spectrum

    spec = ModelSpec(d_model=24, n_layers=1, n_heads=4, n_kv_heads=2, activation_hidden_dim=32,
                     vocab_size=40)
    tail = torch.tensor(np.random.default_rng(5).pareto(1.5, 24) + 1.0).sort(descending=True)

    def plant(step, w, g):
        w["layers.0.attention.q_proj.weight"] = 0.05 * matrix_with_spectrum(
            24, 24, tail.values, torch.Generator().manual_seed(step)).float()

    return make_run(out, spec, list(steps), edit=plant)
