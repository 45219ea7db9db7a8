"""Benchmark `dynlab eval`'s BLiMP scoring against a plain batched loop, in one run.

Builds a pico-decoder of a preset's shape (seeded random initialisation: speed does not
depend on the weights, and equal results are checked pair by pair) with a BPE tokenizer
trained on a text file, then scores every BLiMP pair:

  dynlab  `dynlab.eval.evaluate(model, tokenizer, EvalData(blimp_pairs=...))`, as the
          trainer and `dynlab eval` call it (tokenisation, length-sorted batches, accuracy)
  plain   a plain loop that tokenises once, groups the sequences by length and scores each
          length group in batches of `--plain-batch` (512) with one forward pass per batch

Rounds alternate (dynlab, plain, plain, dynlab, ...) and the medians are compared; the
per-UID accuracies of both must be identical. Threads: `--threads` (default: torch's).

    python bench/eval_bench.py [--blimp ../shared/data/blimp] [--preset micro] [--limit N]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dynlab.data.documents import read_text_documents
from dynlab.data.tokenizer import bos_id, get_tokenizer
from dynlab.eval import EvalData, evaluate
from dynlab.eval.blimp import blimp_accuracy, filter_pairs, read_blimp
from dynlab.model.pico_decoder import PRESETS, PicoDecoder

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@torch.no_grad()
def plain_blimp(model: torch.nn.Module, tokenizer, pairs: list[dict], batch: int) -> dict:
    """Tokenise once; score sequences grouped by length, `batch` rows per forward pass."""
    bos = bos_id(tokenizer)
    good = tokenizer.encode_batch([p["sentence_good"] for p in pairs], add_special_tokens=False)
    bad = tokenizer.encode_batch([p["sentence_bad"] for p in pairs], add_special_tokens=False)
    seqs = [[bos, *e.ids] for e in good] + [[bos, *e.ids] for e in bad]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        by_len[len(s)].append(i)
    lp = np.zeros(len(seqs))
    for n, idx in by_len.items():
        if n < 2:
            continue
        for start in range(0, len(idx), batch):
            rows = idx[start:start + batch]
            x = torch.tensor([seqs[i] for i in rows])
            logits = model(x[:, :-1]).float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="none").view(len(rows), -1)
            lp[rows] = (-nll.double().sum(1)).numpy()
    half = len(pairs)
    return blimp_accuracy(pairs, lp[:half] > lp[half:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blimp", type=Path, default=SHARED / "blimp")
    ap.add_argument("--text", type=Path, default=SHARED / "tinyshakespeare.txt",
                    help="text to train the BPE tokenizer on")
    ap.add_argument("--preset", default="micro", choices=sorted(PRESETS))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--limit", type=int, default=None, help="pairs per UID (default: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="dynlab's batch (its default)")
    ap.add_argument("--plain-batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    for path in (args.blimp, args.text):
        if not path.exists():
            sys.exit(f"{path}: missing (BLiMP jsonl directory and a text file are needed)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = get_tokenizer(read_text_documents(args.text), args.vocab_size)
    pairs = filter_pairs(read_blimp(args.blimp), limit_per_uid=args.limit)
    cfg = PRESETS[args.preset]
    cfg = dataclasses.replace(cfg, vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = PicoDecoder(cfg).to(args.device).eval()
    data = EvalData(blimp_pairs=pairs)

    def run_dynlab() -> dict:
        return evaluate(model, tokenizer, data, device=args.device,
                        batch_size=args.batch_size)["blimp"]

    def run_plain() -> dict:
        return plain_blimp(model, tokenizer, pairs, args.plain_batch)

    times: dict[str, list[float]] = {"dynlab": [], "plain": []}
    results: dict[str, dict] = {}
    order = []
    for r in range(args.rounds):
        order += ["dynlab", "plain"] if r % 2 == 0 else ["plain", "dynlab"]
    cpu0 = time.process_time()
    for name in order:
        t0 = time.perf_counter()
        results[name] = run_dynlab() if name == "dynlab" else run_plain()
        times[name].append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    d, p = (statistics.median(times[k]) for k in ("dynlab", "plain"))
    same = results["dynlab"]["by_uid"] == results["plain"]["by_uid"]
    print(f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {args.device}")
    print(f"model: {args.preset} shape, vocab {cfg.vocab_size}; {len(pairs)} BLiMP pairs, "
          f"{len(results['dynlab']['by_uid'])} UIDs")
    print(f"  dynlab evaluate  {d:7.2f} s (median of {len(times['dynlab'])})")
    print(f"  plain loop       {p:7.2f} s (median of {len(times['plain'])})")
    print(f"  dynlab / plain = {d / p:5.2f}x   (goal <= 1.3)")
    print(f"  CPU time of all rounds {cpu:.1f} s over {sum(map(sum, times.values())):.1f} s "
          f"wall")
    print(f"  per-UID accuracies identical: {same}; overall {results['dynlab']['overall']:.4f}")
    if not same or math.isnan(results["dynlab"]["overall"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
