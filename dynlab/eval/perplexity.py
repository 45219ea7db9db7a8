"""Perplexity per domain, Paloma's convention.

    ppl_d = exp( Σ_{docs in d} NLL / Σ_{docs in d} tokens )        macro = mean_d ppl_d

Tokens are counted in the model's own tokenizer. Each document is encoded without special
tokens and conditioned on one leading `<|endoftext|>` (the BOS convention, as the training
stream separates documents with it); every document token is scored once, the BOS itself is
not. Documents longer than the context are scored in non-overlapping windows of `context`
tokens (each window starts with fresh context), or overlapping ones with `stride` < context
(see `dynlab.eval.scoring.windows`).

Held-out text is grouped by domain: a directory with one domain per file (`*.txt`: documents
separated by blank lines; `*.jsonl` / `*.jsonl.gz`: a `text` field per line, domain = file
stem unless a line has a `source` field), a single such file, or a glob.
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dynlab.eval.scoring import sequence_logprobs, windows

PPL_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


class EvalDataWarning(UserWarning):
    """A problem in evaluation input that was skipped (`on_error="skip"`)."""


#: what reading a file that is not (gzipped) UTF-8 text raises
NOT_TEXT = (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error)


def report_problem(message: str, on_error: str) -> None:
    """Raise ValueError(message) for on_error="fail", warn for "skip"."""
    if on_error == "fail":
        raise ValueError(message)
    if on_error != "skip":
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    warnings.warn(message, EvalDataWarning, stacklevel=3)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in PPL_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def open_text(path: Path):
    """Open a text file, transparently decompressing `.gz`."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def read_ppl_file(path: Path, on_error: str = "fail") -> dict[str, list[str]]:
    """Documents of one file grouped by domain (the file stem, or each line's `source`); a
    file that is not UTF-8 text (binary, a broken .gz) is reported as the file."""
    try:
        return _read_ppl_documents(path, on_error)
    except NOT_TEXT as err:
        report_problem(f"--ppl {path}: not a UTF-8 text file ({err})", on_error)
        return {}


def _read_ppl_documents(path: Path, on_error: str) -> dict[str, list[str]]:
    domains: dict[str, list[str]] = {}
    if path.name.endswith(".txt"):
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        docs = [b.strip() for b in text.split("\n\n")]
        domains[_stem(path)] = [d for d in docs if d]
        return domains
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                report_problem(f"{path}:{lineno}: not valid JSON ({err.msg})", on_error)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                report_problem(f"{path}:{lineno}: expected an object with a 'text' string",
                               on_error)
                continue
            source = record.get("source", _stem(path))
            domains.setdefault(str(source), []).append(record["text"])
    return domains


def resolve_files(spec: str | Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """A directory (its files with these suffixes), a single file, or a glob pattern."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(suffixes))
        if not files:
            raise FileNotFoundError(f"{what} {path}: directory has no {'/'.join(suffixes)} files")
        return files
    if path.is_file():
        return [path]
    if any(c in str(spec) for c in "*?["):
        import glob

        files = sorted(Path(p) for p in glob.glob(str(spec)) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"{what} {spec}: no files match the pattern")
        return files
    raise FileNotFoundError(f"{what} {spec}: no such file or directory")


def read_ppl_domains(spec: str | Path, on_error: str = "fail") -> dict[str, list[str]]:
    """Held-out documents by domain from a directory, file or glob (see module docstring)."""
    domains: dict[str, list[str]] = {}
    for path in resolve_files(spec, PPL_SUFFIXES, "--ppl"):
        for dom, docs in read_ppl_file(path, on_error).items():
            domains.setdefault(dom, []).extend(docs)
    empty = [d for d, docs in domains.items() if not any(x.strip() for x in docs)]
    for dom in empty:
        report_problem(f"--ppl {spec}: domain {dom!r} has no non-empty documents", on_error)
        del domains[dom]
    if not domains:
        raise ValueError(f"--ppl {spec}: no documents found")
    return domains


def perplexity_from_sums(nll: float, tokens: int) -> float:
    """ppl = exp(total NLL / total tokens)."""
    if tokens <= 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return math.exp(nll / tokens)


def macro_average(values: dict[str, float]) -> float:
    """macro = (1 / D) Σ_d value_d (every domain weighs the same)."""
    return float(np.mean(list(values.values()))) if values else float("nan")


def domain_nll(model: torch.nn.Module, tokenizer, domains: dict[str, list[str]], bos: int,
               context: int, *, stride: int | None = None, batch_size: int = 32,
               progress: Callable[[int], None] | None = None,
               encoded: dict[str, list[list[int]]] | None = None
               ) -> dict[str, tuple[float, int]]:
    """(total NLL in nats, total scored tokens) per domain; all windows scored in one pass."""
    if encoded is None:
        encoded = encode_domains(tokenizer, domains)
    seqs: list[list[int]] = []
    n_scored: list[int] = []
    owner: list[str] = []
    for dom, docs in encoded.items():
        for ids in docs:
            for seq, k in windows(ids, bos, context, stride):
                seqs.append(seq)
                n_scored.append(k)
                owner.append(dom)
    logp = sequence_logprobs(model, seqs, n_scored, batch_size=batch_size, progress=progress)
    out = {dom: (0.0, 0) for dom in encoded}
    for dom, lp, k in zip(owner, logp, n_scored, strict=True):
        nll, n = out[dom]
        out[dom] = (nll - float(lp), n + k)
    return out


def encode_domains(tokenizer, domains: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """Token ids (no special tokens) of every document, by domain."""
    return {dom: [e.ids for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
            for dom, docs in domains.items()}


def count_windows(encoded: dict[str, list[list[int]]], context: int,
                  stride: int | None = None) -> int:
    """How many windows domain_nll will score (for progress bars)."""
    return sum(len(windows(ids, 0, context, stride)) for docs in encoded.values() for ids in docs)


def perplexity(model: torch.nn.Module, tokenizer, domains: dict[str, list[str]], bos: int,
               context: int, *, stride: int | None = None, batch_size: int = 32,
               progress: Callable[[int], None] | None = None) -> dict:
    """{"by_domain": {domain: ppl}, "macro": mean ppl over domains}."""
    sums = domain_nll(model, tokenizer, domains, bos, context, stride=stride,
                      batch_size=batch_size, progress=progress)
    by_domain = {}
    for dom, (nll, n) in sums.items():
        if n == 0:
            raise ValueError(f"perplexity domain {dom!r}: no tokens to score")
        by_domain[dom] = perplexity_from_sums(nll, n)
    return {"by_domain": by_domain, "macro": macro_average(by_domain)}
