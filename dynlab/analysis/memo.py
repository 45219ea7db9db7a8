"""Results of pure functions remembered by the content of their input.

An analysis meets the same matrices again: the target checkpoint's activations in every
comparison (`analysis.representations`), the factors of a checkpoint's circuits in its own
updates and the next checkpoint's (`analysis.components.spectral_norms`). `remembered(fn, x)`
computes fn(x) once per content of x (its dtype, shape and bytes, hashed with SHA-1), for the
most recent inputs whose results hold at most `MEMO_BYTES` together; `offer(fn, x, value)`
records a result known by other means (σ_1 of a stored matrix, from its spectrum).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

R = TypeVar("R")

#: bytes of the results kept, each counted with `ENTRY_BYTES` (the most recently used first)
MEMO_BYTES = 256 << 20
#: what an entry holds beside its result's arrays (its key, its digest, the dict's slot): so
#: that many small results, such as the spectral norms offered by every checkpoint of a long
#: run, are bounded too
ENTRY_BYTES = 256
_MEMO: collections.OrderedDict = collections.OrderedDict()  # key -> (result, bytes)
_HELD = [0]
_LOCK = threading.Lock()


def result_bytes(value) -> int:
    """Bytes of the arrays and tensors in a result (nested in tuples and lists)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(result_bytes(v) for v in value)
    return 0


def content_key(x: np.ndarray | torch.Tensor) -> tuple:
    """(dtype, shape, SHA-1 of the bytes) of an array or a CPU tensor (bfloat16 hashed
    through its bits)."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else x
    if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
        bits = np.ascontiguousarray(t.contiguous().view(torch.int16).numpy())
        return "bfloat16", bits.shape, hashlib.sha1(bits.reshape(-1).view(np.uint8)).digest()
    a = np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t)
    return a.dtype.str, a.shape, hashlib.sha1(a.reshape(-1).view(np.uint8)).digest()


def held_bytes() -> int:
    """Bytes of the results kept now (`ENTRY_BYTES` each beside their arrays)."""
    with _LOCK:
        return _HELD[0]


def memo_key(fn: Callable, x: np.ndarray | torch.Tensor, args: tuple) -> tuple | None:
    """The key of fn(x, *args), or None for inputs not hashed (tensors off the CPU)."""
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        return None
    return (fn.__module__, fn.__qualname__, args, content_key(x))


def keep(key: tuple, value) -> None:
    """Keep `value` under `key`, dropping the least recently used results beyond
    `MEMO_BYTES`."""
    size = result_bytes(value) + ENTRY_BYTES
    with _LOCK:
        if key not in _MEMO and size <= MEMO_BYTES:
            _MEMO[key] = (value, size)
            _HELD[0] += size
            while _HELD[0] > MEMO_BYTES:
                _HELD[0] -= _MEMO.popitem(last=False)[1][1]


def remembered(fn: Callable[..., R], x: np.ndarray | torch.Tensor, *args) -> R:
    """fn(x, *args), computed once per (fn, args, content of x); fn must be pure and its result
    is shared: callers must not modify it."""
    key = memo_key(fn, x, args)
    if key is None:
        return fn(x, *args)
    with _LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key][0]
    value = fn(x, *args)
    keep(key, value)
    return value


def offer(fn: Callable[..., R], x: np.ndarray | torch.Tensor, value: R, *args) -> None:
    """Record `value` as fn(x, *args), known by other means (the caller vouches that it is
    what fn would return, up to rounding), so that a later `remembered(fn, x, *args)` does not
    compute it."""
    key = memo_key(fn, x, args)
    if key is not None:
        keep(key, value)
