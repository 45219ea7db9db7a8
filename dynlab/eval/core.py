"""Evaluation data and `evaluate`: perplexity per domain and BLiMP accuracy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynlab.eval.blimp import (
    blimp,
    encode_pairs,
    filter_pairs,
    read_blimp,
)
from dynlab.eval.perplexity import (
    count_windows,
    domain_bytes,
    encode_domains,
    perplexity,
    read_ppl_domains,
    report_problem,
)
from dynlab.eval.scoring import model_device

NONE = "none"  # `--ppl none` / `--blimp none` disables that part


@dataclass
class EvalData:
    """Held-out documents by domain and BLiMP records; an empty part is not evaluated."""

    ppl_domains: dict[str, list[str]] = field(default_factory=dict)
    blimp_pairs: list[dict] = field(default_factory=list)


def default_eval_data(n_ppl_docs: int | None = 200, n_pairs_per_uid: int | None = 50) -> EvalData:
    """The embedded grammar's held-out domains (n_ppl_docs documents per domain) and its
    minimal pairs (n_pairs_per_uid per UID), both from seeds disjoint from training.
    None means the default size."""
    from dynlab.data.grammar import heldout_domains, minimal_pairs

    return EvalData(heldout_domains(200 if n_ppl_docs is None else n_ppl_docs),
                    minimal_pairs(50 if n_pairs_per_uid is None else n_pairs_per_uid))


def load_eval_data(ppl: str | Path | None = None, blimp: str | Path | None = None, *,
                   uid_filter: str | list[str] | None = None,
                   limit_per_uid: int | None = None, on_error: str = "fail",
                   split: str = "val") -> EvalData:
    """Evaluation data from files; a part left None comes from default_eval_data(), a part
    given as "none" is skipped. ppl: directory / file / glob (see dynlab.eval.perplexity);
    blimp: directory / file / glob of BLiMP jsonl, or "nyu-mll/blimp". split: the split folder
    of data in Paloma's layout."""
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    default = default_eval_data() if ppl is None or blimp is None else None
    if ppl is None:
        domains = default.ppl_domains
    elif str(ppl).lower() == NONE:
        domains = {}
    else:
        domains = read_ppl_domains(ppl, on_error, split)
    if blimp is None:
        pairs = default.blimp_pairs
    elif str(blimp).lower() == NONE:
        pairs = []
    else:
        pairs = read_blimp(blimp, on_error)
    if uid_filter or limit_per_uid is not None:
        pairs = filter_pairs(pairs, uid_filter, limit_per_uid)
    return EvalData(domains, pairs)


def context_length(model: torch.nn.Module, max_seq_len: int | None = None) -> int:
    """The context to score in: max_seq_len (at most the model's), else the model's."""
    cfg = getattr(model, "config", None)
    model_max = getattr(cfg, "max_seq_len", None)
    if max_seq_len is None:
        if not model_max:
            raise ValueError("evaluate: pass max_seq_len (the model has no config.max_seq_len)")
        return int(model_max)
    if max_seq_len < 1 or (model_max and max_seq_len > model_max):
        raise ValueError(f"evaluate: max_seq_len {max_seq_len} must be in [1, the model's "
                         f"max_seq_len {model_max}]")
    return int(max_seq_len)


def cache_key(tokenizer) -> str:
    """The identity of a tokenizer's definition: TextTokenizer.fingerprint, a `tokenizers`
    Tokenizer's JSON digest, else the object's id."""
    import hashlib

    fp = getattr(tokenizer, "fingerprint", None)
    if fp is not None:
        return fp()
    to_str = getattr(tokenizer, "to_str", None)
    if to_str is not None:
        return hashlib.sha1(to_str().encode()).hexdigest()
    return str(id(tokenizer))


def evaluate(model: torch.nn.Module, tokenizer, data: EvalData, *, device: str | None = "cpu",
             batch_size: int = 32, max_seq_len: int | None = None, stride: int | None = None,
             on_error: str = "skip",
             progress: Callable[[int, int], None] | None = None, bos: int | None = None,
             autocast: torch.dtype | None = None, cache: dict | None = None) -> dict:
    """{"perplexity": {"by_domain", "macro"}, "blimp": {"by_uid", "by_field", "overall"}}.

    Parts whose data is empty (or, with on_error="skip", has nothing scorable) are left
    out. `device` (None: the model's own device) is where the forward passes run; the model
    is moved there for the evaluation and moved back, and its train/eval mode is restored.
    Pairs that cannot be scored (empty, longer than the context) are skipped with an
    EvalDataWarning (on_error="skip") or raise ValueError ("fail").
    `progress(done, total)` counts scored sequences.
    bos: the document-start token (default the tokenizer's `<|endoftext|>`). autocast: run the
    forward passes under torch.autocast in this dtype (bf16 / fp16; CUDA only, ignored on CPU;
    losses are still taken in float32 and summed in float64). cache: a dict kept across calls
    holding the tokenised data per (tokenizer, context) key (`cache_key`), so that every
    checkpoint of a run shares one tokenisation.
    """
    import contextlib

    from dynlab.data.tokenizer import bos_id

    bos = bos_id(tokenizer) if bos is None else int(bos)
    context = context_length(model, max_seq_len)
    home = model_device(model)
    target = home if device is None else torch.device(device)
    was_training = model.training
    result: dict = {}
    try:
        model.to(target).eval()
        key = (cache_key(tokenizer), context, id(data))
        if cache is not None and key in cache:
            encoded, n_bytes, (kept, good, bad) = cache[key]
        else:
            encoded = encode_domains(tokenizer, data.ppl_domains) if data.ppl_domains else {}
            n_bytes = domain_bytes(data.ppl_domains, tokenizer) if data.ppl_domains else {}
            kept, good, bad = (encode_pairs(tokenizer, data.blimp_pairs, context, on_error)
                               if data.blimp_pairs else ([], [], []))
            if cache is not None:
                cache[key] = (encoded, n_bytes, (kept, good, bad))
        total = count_windows(encoded, context, stride) + 2 * len(kept)
        done = 0

        def tick(k: int) -> None:
            nonlocal done
            done += k
            if progress:
                progress(done, total)

        amp = (torch.autocast(target.type, dtype=autocast)
               if autocast is not None and target.type == "cuda" else contextlib.nullcontext())
        with amp:
            if encoded:
                ppl = perplexity(model, tokenizer, data.ppl_domains, bos, context,
                                 stride=stride, batch_size=batch_size, progress=tick,
                                 encoded=encoded, on_error=on_error, n_bytes=n_bytes)
                if ppl is not None:
                    result["perplexity"] = ppl
            if data.blimp_pairs and not kept:
                report_problem(f"BLiMP: none of the {len(data.blimp_pairs)} pairs can be "
                               f"scored (context {context}); BLiMP left out", on_error)
            elif data.blimp_pairs:
                result["blimp"] = blimp(model, tokenizer, data.blimp_pairs, bos, context,
                                        batch_size=batch_size, progress=tick,
                                        encoded=(kept, good, bad))
    finally:
        model.to(home)
        model.train(was_training)
    return result
