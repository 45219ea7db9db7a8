"""Benchmark `dynlab eval` on a Hugging Face checkpoint (perplexity) against a plain batched
loop, in one run.

Writes a GPT-NeoX (Pythia-shaped: parallel residual, partial rotary) causal LM with
transformers' own save_pretrained, seeded random weights (speed does not depend on them), and
a byte-level BPE tokenizer trained on a text file and saved beside it; then scores every
document of the text (blank-line separated) in non-overlapping windows of the model's context:

  dynlab  `dynlab.eval.sources.evaluate_checkpoint` on the checkpoint as `dynlab eval SOURCE`
          runs it (the model through dynlab.sources.models, tokenisation with a fresh cache,
          length-sorted batches, per-domain units); model loading excluded from both
  plain   a plain loop: tokenise once, cut [bos] + ids into the same windows, group them by
          length and score each group with one forward pass per `--plain-batch` rows
          (transformers' model(input_ids).logits, float32 cross-entropy summed in float64)

Rounds alternate (dynlab, plain, plain, dynlab, ...) and the medians are compared; the total
NLL of both must agree to 1e-6 relative. Goal on CPU: dynlab / plain <= 1.3.

GPU throughput target (`--device cuda --autocast bf16`, the default `--layers 12 --d-model 768`
Pythia-160M shape, context 2048): at least 100k scored tokens per second on one H100
(a 160M-parameter forward costs ~2·160M FLOPs per token, so 100k tok/s is ~32 TFLOP/s, about
3% of the H100's bf16 dense peak: a floor that only data handling, not the GPU, can miss).

    python bench/eval_sources_bench.py [--text ../shared/data/tinyshakespeare.txt]
        [--layers 2 --d-model 128 --context 256] [--device cuda --autocast bf16]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def write_checkpoint(root: Path, docs: list[str], args) -> Path:
    """A GPT-NeoX checkpoint and its tokenizer, written by transformers and tokenizers."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok,
                                                eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.d_model,
        intermediate_size=4 * args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=max(args.d_model // 64, 2), rotary_pct=0.25,
        use_parallel_residual=True, max_position_embeddings=args.context,
        tie_word_embeddings=False)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(root)
    fast.save_pretrained(root)
    return root


@torch.no_grad()
def plain_nll(model, tokenizer, docs: list[str], context: int, batch: int,
              device: str) -> tuple[float, int]:
    """Total NLL (nats) and scored tokens: [bos] + ids in windows of context + 1 tokens
    sharing their boundary token, grouped by length, `batch` rows per forward pass."""
    bos = tokenizer.eos_token_id
    windows: list[list[int]] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        x = [bos, *ids]
        windows += [x[a: a + context + 1] for a in range(0, len(ids), context)]
    by_len: dict[int, list[list[int]]] = defaultdict(list)
    for w in windows:
        by_len[len(w)].append(w)
    nll, n = 0.0, 0
    for rows in by_len.values():
        for start in range(0, len(rows), batch):
            x = torch.tensor(rows[start: start + batch], device=device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         x[:, 1:].reshape(-1), reduction="sum").double())
            n += x[:, 1:].numel()
    return nll, n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=SHARED / "tinyshakespeare.txt")
    ap.add_argument("--docs", type=int, default=400, help="documents scored")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="dynlab's batch (its default)")
    ap.add_argument("--plain-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", default="none", choices=("none", "bf16", "fp16"))
    args = ap.parse_args(argv)
    if not args.text.exists():
        sys.exit(f"{args.text}: missing (a text file of blank-line separated documents)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from dynlab.data.documents import read_text_documents
    from dynlab.eval import EvalData, evaluate
    from dynlab.eval.sources import autocast_dtype
    from dynlab.sources import open_sources
    from dynlab.sources.models import load_causal_lm

    docs = [d for d in read_text_documents(args.text) if d.strip()][: args.docs]
    with tempfile.TemporaryDirectory(prefix="dynlab-evalbench-") as tmp:
        ckpt_dir = write_checkpoint(Path(tmp) / "neox", docs, args)
        (run,) = open_sources([ckpt_dir])
        lm = load_causal_lm(run, run.checkpoints[0], device=args.device)
        data = EvalData({"text": docs}, [])
        amp = autocast_dtype(args.autocast)

        def run_dynlab() -> tuple[float, int]:
            ppl = evaluate(lm.model, lm.tokenizer, data, device=args.device,
                           batch_size=args.batch_size, max_seq_len=lm.context_length,
                           bos=lm.bos_id, autocast=amp, cache={})["perplexity"]
            n = ppl["tokens_by_domain"]["text"]
            return ppl["loss"] * n, n

        def run_plain() -> tuple[float, int]:
            ctx = (torch.autocast(args.device.split(":")[0], dtype=amp) if amp is not None
                   and args.device.startswith("cuda") else torch.autocast("cpu",
                                                                          enabled=False))
            with ctx:
                return plain_nll(lm.model.hf, lm.tokenizer.native, docs, lm.context_length,
                                 args.plain_batch, args.device)

        times: dict[str, list[float]] = {"dynlab": [], "plain": []}
        results: dict[str, tuple[float, int]] = {}
        order: list[str] = []
        for r in range(args.rounds):
            order += ["dynlab", "plain"] if r % 2 == 0 else ["plain", "dynlab"]
        for name in order:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            results[name] = run_dynlab() if name == "dynlab" else run_plain()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    d, p = (statistics.median(times[k]) for k in ("dynlab", "plain"))
    (nd, td), (npl, tp) = results["dynlab"], results["plain"]
    same = td == tp and math.isclose(nd, npl, rel_tol=1e-6 if amp is None else 1e-2)
    n_params = sum(q.numel() for q in lm.model.parameters())
    print(f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {args.device}, autocast "
          f"{args.autocast}")
    print(f"model: GPT-NeoX {args.layers} layers d {args.d_model} ({n_params / 1e6:.1f}M "
          f"parameters), context {lm.context_length}, vocab {lm.vocab_size}; {len(docs)} "
          f"documents, {td} tokens")
    print(f"  dynlab eval  {d:7.2f} s (median of {len(times['dynlab'])}), "
          f"{td / d:,.0f} tokens/s")
    print(f"  plain loop   {p:7.2f} s (median of {len(times['plain'])}), {tp / p:,.0f} tokens/s")
    print(f"  dynlab / plain = {d / p:5.2f}x   (goal <= 1.3 on CPU)")
    print(f"  mean token loss dynlab {nd / td:.6f}, plain {npl / tp:.6f}; same: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
