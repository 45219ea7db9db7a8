"""Batched log-probabilities of token sequences under a causal language model.

A scored sequence is a list of token ids `x[0..m-1]`; the model reads `x[0..m-2]` and the last
`n_scored` targets are scored:

    log p = Σ_{t = m - n_scored}^{m-1}  log softmax(model(x[:m-1]))[t-1, x[t]]

Sequences are sorted by length, cut into batches of `batch_size`, right-padded (causal
attention never lets a real position see the padding after it) and scored with one forward
pass per batch; per-token log-probabilities come from `cross_entropy(reduction="none")` in the
model's float32 and are summed in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


def windows(ids: list[int], bos: int, context: int,
            stride: int | None = None) -> list[tuple[list[int], int]]:
    """Cut a document into (tokens, n_scored) windows that score every token exactly once.

    x = [bos] + ids; the targets are x[1..n]. Window k scores the targets x[a+1 .. b] with
    b - a <= stride, reading x[s .. b-1] where s = max(0, a - (context - stride)).
    stride = context (default): non-overlapping windows, x cut into consecutive chunks of
    context + 1 tokens sharing their boundary token (each chunk starts with fresh context);
    stride < context: overlapping windows, every target after the first window sees at least
    context - stride tokens of left context (stride = 1: every target sees min(t, context)).
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    x, n = [bos, *ids], len(ids)
    out: list[tuple[list[int], int]] = []
    done, end = 0, min(context, n)
    while done < n:
        start = max(0, done - (context - stride))
        out.append((x[start: end + 1], end - done))
        done, end = end, min(end + stride, n)
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, sequences: list[list[int]],
                      n_scored: list[int] | None = None, *, batch_size: int = 32,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Summed log-probability of the last n_scored[i] tokens of each sequence (float64 array).

    n_scored defaults to len(seq) - 1 (every token after the first). `progress(k)` is called
    after each batch with the number of sequences it scored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_scored = [len(s) - 1 for s in sequences] if n_scored is None else list(n_scored)
    if len(n_scored) != len(sequences):
        raise ValueError("sequences and n_scored differ in length")
    for s, k in zip(sequences, n_scored, strict=True):
        if not 0 <= k <= len(s) - 1:
            raise ValueError(f"cannot score {k} tokens of a sequence of length {len(s)}")
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = np.zeros(len(sequences), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        width = max(len(sequences[i]) for i in idx) - 1
        if width < 1:  # only 1-token sequences: nothing to score
            if progress:
                progress(len(idx))
            continue
        inputs = torch.zeros(len(idx), width, dtype=torch.long)
        targets = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(idx):
            seq, k = sequences[i], n_scored[i]
            m = len(seq)
            inputs[row, : m - 1] = torch.as_tensor(seq[:-1], dtype=torch.long)
            if k:
                targets[row, m - 1 - k: m - 1] = torch.as_tensor(seq[m - k:], dtype=torch.long)
        logits = model(inputs.to(device))
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                              targets.to(device).reshape(-1), ignore_index=IGNORE,
                              reduction="none")
        sums = -nll.view(len(idx), width).double().sum(dim=1)
        out[idx] = sums.cpu().numpy()
        if progress:
            progress(len(idx))
    return out
