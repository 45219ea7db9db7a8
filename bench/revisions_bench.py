"""How `--revisions` ranges cost: matched against the revisions that exist
(`dynlab.sources.hub.select_revisions`) versus written out step by step and then checked
(`written_out`, what the analysis did before). Prints the time and peak Python memory
(tracemalloc) of each and their ratio, measured in this process.

    python bench/revisions_bench.py [--width 1000000]

The known revisions are Pythia's layout: step0, step1, 2, 4, ..., 512, then every 1000 up to
step143000 (154 branches). The range is `step0:step<width>:1`; a range of 10^9 steps is
matched in the same time as one of 10^6 (its cost does not grow with the width), while
writing it out would need ~60 GB.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from dynlab.sources.hub import select_revisions

KNOWN = ["step0", *(f"step{2 ** i}" for i in range(10)),
         *(f"step{n}" for n in range(1000, 143001, 1000))]


def written_out(width: int, known: list[str]) -> list[str]:
    """The earlier way: every name of the range listed, then those that exist kept."""
    names = list(dict.fromkeys(f"step{n}" for n in range(0, width + 1)))
    have = set(known)
    return [r for r in names if r in have]


def measure(fn) -> tuple[float, float, object]:
    """(seconds, peak MiB, result) of fn()."""
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1_000_000, help="steps the range spans")
    width = ap.parse_args().width
    spec = f"step0:step{width}:1"
    listed_s, listed_mib, listed = measure(lambda: written_out(width, KNOWN))
    matched_s, matched_mib, matched = measure(lambda: select_revisions(spec, KNOWN, "here"))
    huge_s, huge_mib, huge = measure(lambda: select_revisions("step0:step1000000000:1", KNOWN,
                                                              "here"))
    assert matched == listed and huge == KNOWN
    print(f"known revisions: {len(KNOWN)}; range {spec}: {len(matched)} match")
    print(f"written out (before): {listed_s:.3f} s, peak {listed_mib:.1f} MiB")
    print(f"matched (now):        {matched_s * 1e3:.2f} ms, peak {matched_mib:.3f} MiB")
    print(f"matched, 10^9 steps:  {huge_s * 1e3:.2f} ms, peak {huge_mib:.3f} MiB")
    print(f"ratio time before/now: {listed_s / matched_s:.0f}x; "
          f"memory: {listed_mib / matched_mib:.0f}x")


if __name__ == "__main__":
    main()
