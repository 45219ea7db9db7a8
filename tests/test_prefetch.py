"""The checkpoint prefetcher: order, errors, and how far it reads ahead (memory bound)."""

from __future__ import annotations

import threading
import time

import pytest

from dynlab.runs.checkpoints import prefetch


def test_prefetch_order_and_values():
    assert list(prefetch(list(range(5)), lambda i: i * i)) == [(i, i * i) for i in range(5)]
    assert list(prefetch([], lambda i: i)) == []


def test_prefetch_raises_at_the_failing_item():
    def load(i):
        if i == 2:
            raise ValueError("bad item 2")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 2"):
        for item, _ in prefetch(list(range(5)), load):
            got.append(item)
    assert got == [0, 1]


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetch_loads_at_most_depth_items_ahead(depth):
    """While the caller holds item i, no item past i + depth has started loading, even when
    the caller is slow; and the loader does run ahead by `depth` (overlap is real)."""
    started: list[int] = []
    lock = threading.Lock()

    def load(i):
        with lock:
            started.append(i)
        return i

    ahead = []
    for item, _ in prefetch(list(range(8)), load, depth=depth):
        time.sleep(0.05)  # a slow computation: the loader has every chance to run ahead
        with lock:
            furthest = max(started)
        assert furthest <= item + depth
        ahead.append(furthest - item)
    assert max(ahead) == depth  # it did read ahead while the caller computed


def test_prefetch_stops_its_thread_when_the_caller_stops():
    before = {t.name for t in threading.enumerate() if t.name == "dynlab-prefetch"}
    gen = prefetch(list(range(100)), lambda i: i)
    next(gen)
    gen.close()
    time.sleep(0.1)
    alive = [t for t in threading.enumerate() if t.name == "dynlab-prefetch"]
    assert len(alive) <= len(before)
