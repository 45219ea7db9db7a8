"""BLiMP: accuracy on minimal pairs.

A pair is correct when log p(sentence_good) > log p(sentence_bad), each the sum of the
log-probabilities of all the sentence's tokens conditioned on one leading `<|endoftext|>`
(the BOS convention). A tie counts as incorrect. Accuracy is reported per UID, per field
(the mean of that field's UID accuracies) and overall as the mean over UIDs (the study's
number; with equally sized UIDs it equals the pair-weighted mean).

Input: the official jsonl format (`sentence_good`, `sentence_bad`, `field`,
`linguistics_term`, `UID`, `pairID`) from a directory, a file or a glob, or the Hugging Face
dataset `nyu-mll/blimp` (needs the optional `datasets` package and network access).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dynlab.data.documents import jsonl_lines
from dynlab.eval.perplexity import NOT_TEXT, open_text, report_problem, resolve_files
from dynlab.eval.scoring import sequence_logprobs

BLIMP_SUFFIXES = (".jsonl", ".jsonl.gz")
HF_BLIMP = "nyu-mll/blimp"
REQUIRED = ("sentence_good", "sentence_bad", "UID")


def is_hf_spec(spec: str | Path) -> bool:
    """True for "nyu-mll/blimp" or "hf:<name>" when no local path of that name exists."""
    s = str(spec)
    return not Path(s).exists() and (s == HF_BLIMP or s.startswith("hf:"))


def read_blimp_file(path: Path, on_error: str = "fail") -> list[dict]:
    """BLiMP records of one jsonl file; malformed lines are reported as file:line, a file
    that is not UTF-8 text (binary, a broken .gz) as the file (no record of it is kept)."""
    try:
        return _read_blimp_records(path, on_error)
    except NOT_TEXT as err:
        report_problem(f"--blimp {path}: not a UTF-8 jsonl text file ({err})", on_error)
        return []


def _read_blimp_records(path: Path, on_error: str) -> list[dict]:
    records = []
    with open_text(path) as fh:
        for lineno, rec, problem in jsonl_lines(fh, path):
            if problem:
                report_problem(problem, on_error)
                continue
            if not isinstance(rec, dict):
                report_problem(f"{path}:{lineno}: expected a JSON object", on_error)
                continue
            missing = [k for k in REQUIRED if not isinstance(rec.get(k), str)]
            if missing:
                report_problem(f"{path}:{lineno}: missing string field(s) {missing}; a BLiMP "
                               "record needs sentence_good, sentence_bad and UID", on_error)
                continue
            rec.setdefault("field", "unknown")
            rec.setdefault("linguistics_term", "")
            rec.setdefault("pairID", str(lineno - 1))
            records.append(rec)
    return records


def load_hf_blimp(name: str = HF_BLIMP, uids: list[str] | None = None) -> list[dict]:
    """All (or the given) UID configs of a Hugging Face BLiMP dataset (needs `datasets`)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"--blimp {name}: reading BLiMP from the Hugging Face hub needs the optional "
            "`datasets` package (pip install datasets) and network access; or pass a local "
            "directory of BLiMP .jsonl files"
        ) from err
    configs = uids or datasets.get_dataset_config_names(name)
    records = []
    for uid in configs:
        for rec in datasets.load_dataset(name, uid, split="train"):
            records.append(dict(rec))
    return records


def read_blimp(spec: str | Path, on_error: str = "fail") -> list[dict]:
    """BLiMP records from a directory, file, glob, or "nyu-mll/blimp" / "hf:NAME"."""
    if is_hf_spec(spec):
        name = str(spec)[3:] if str(spec).startswith("hf:") else str(spec)
        return load_hf_blimp(name)
    records = []
    for path in resolve_files(spec, BLIMP_SUFFIXES, "--blimp"):
        records.extend(read_blimp_file(path, on_error))
    if not records:
        raise ValueError(f"--blimp {spec}: no BLiMP records found")
    return records


def filter_pairs(pairs: list[dict], uid_filter: str | list[str] | None = None,
                 limit_per_uid: int | None = None) -> list[dict]:
    """Keep UIDs matching any comma-separated fnmatch pattern; at most limit_per_uid each."""
    if uid_filter:
        patterns = uid_filter.split(",") if isinstance(uid_filter, str) else list(uid_filter)
        patterns = [p.strip() for p in patterns if p.strip()]
        available = sorted({p["UID"] for p in pairs})
        for pat in patterns:
            if not fnmatch.filter(available, pat):
                shown = ", ".join(available[:10]) + (" ..." if len(available) > 10 else "")
                raise ValueError(f"--uid {pat!r} matches no UID; available: {shown}")
        pairs = [p for p in pairs if any(fnmatch.fnmatchcase(p["UID"], q) for q in patterns)]
    if limit_per_uid is not None:
        if limit_per_uid < 1:
            raise ValueError(f"limit per UID must be >= 1, got {limit_per_uid}")
        seen: dict[str, int] = {}
        kept = []
        for p in pairs:
            if seen.get(p["UID"], 0) < limit_per_uid:
                seen[p["UID"]] = seen.get(p["UID"], 0) + 1
                kept.append(p)
        pairs = kept
    return pairs


def encode_pairs(tokenizer, pairs: list[dict], context: int,
                 on_error: str = "skip") -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """(kept pairs, good ids, bad ids); empty sentences and pairs longer than the context
    (more than `context` tokens in a sentence) are reported and dropped."""
    good = tokenizer.encode_batch([p["sentence_good"] for p in pairs], add_special_tokens=False)
    bad = tokenizer.encode_batch([p["sentence_bad"] for p in pairs], add_special_tokens=False)
    kept, g_ids, b_ids = [], [], []
    for p, g, b in zip(pairs, good, bad, strict=True):
        where = f"BLiMP pair {p['UID']}/{p.get('pairID', '?')}"
        if not p["sentence_good"].strip() or not p["sentence_bad"].strip():
            report_problem(f"{where}: empty sentence", on_error)
            continue
        n = max(len(g.ids), len(b.ids))
        if n > context:
            report_problem(f"{where}: {n} tokens, longer than the model's context of {context}",
                           on_error)
            continue
        kept.append(p)
        g_ids.append(g.ids)
        b_ids.append(b.ids)
    return kept, g_ids, b_ids


def pair_logprobs(model: torch.nn.Module, good: list[list[int]], bad: list[list[int]],
                  bos: int, *, batch_size: int = 32,
                  progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """log p(good) and log p(bad) per pair: Σ_t log p(w_t | <|endoftext|> w_<t)."""
    seqs = [[bos, *ids] for ids in good] + [[bos, *ids] for ids in bad]
    lp = sequence_logprobs(model, seqs, batch_size=batch_size, progress=progress)
    return lp[: len(good)], lp[len(good):]


def blimp_accuracy(pairs: list[dict], correct: np.ndarray | list[bool]) -> dict:
    """{"by_uid": mean correct per UID, "by_field": mean of the field's UID accuracies,
    "overall": mean of the UID accuracies}."""
    per_uid: dict[str, list[bool]] = {}
    field_of: dict[str, str] = {}
    for p, c in zip(pairs, correct, strict=True):
        per_uid.setdefault(p["UID"], []).append(bool(c))
        field_of.setdefault(p["UID"], str(p.get("field", "unknown")))
    by_uid = {u: float(np.mean(v)) for u, v in sorted(per_uid.items())}
    fields: dict[str, list[float]] = {}
    for u, acc in by_uid.items():
        fields.setdefault(field_of[u], []).append(acc)
    by_field = {f: float(np.mean(v)) for f, v in sorted(fields.items())}
    overall = float(np.mean(list(by_uid.values()))) if by_uid else float("nan")
    return {"by_uid": by_uid, "by_field": by_field, "overall": overall}


def blimp(model: torch.nn.Module, tokenizer, pairs: list[dict], bos: int, context: int, *,
          batch_size: int = 32, on_error: str = "skip",
          progress: Callable[[int], None] | None = None,
          encoded: tuple[list[dict], list[list[int]], list[list[int]]] | None = None) -> dict:
    """BLiMP accuracies of a model (see module docstring). `encoded`: the pairs already
    tokenised (encode_pairs)."""
    kept, good, bad = (encode_pairs(tokenizer, pairs, context, on_error) if encoded is None
                       else encoded)
    if not kept:
        raise ValueError("BLiMP: no scorable pairs")
    lp_good, lp_bad = pair_logprobs(model, good, bad, bos, batch_size=batch_size,
                                    progress=progress)
    return blimp_accuracy(kept, lp_good > lp_bad)
