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

Paloma's published layout is read as well: a folder of domains, each holding split folders
(`val/`, `test/`) of `*.jsonl.gz` (or `*.jsonl`) files whose records carry a `text` field, or,
in the pre-tokenised variant, an `input_ids` list (scored as below). The domain is the domain
folder's name; `split` picks the split folder (default `val`) and every domain must have it.

Units (`perplexity`): per domain the mean token loss L_d = NLL_d / tokens_d (nats), the
perplexity exp(L_d), and bits per byte NLL_d / (ln 2 · bytes_d), bytes_d the UTF-8 bytes of
the scored text (of the decoded ids for pre-tokenised data); macro averages over domains and
the pooled mean token loss and bits per byte over every scored token. Bits per byte does not
depend on the tokenizer, so it compares models with different tokenizers.

Pre-tokenised held-out data (pico's pre-tokenised Paloma) is scored as it is, in the ids it
was tokenised with: `.parquet` / `.arrow` files (a file, or a directory searched recursively)
or a Hugging Face dataset name (split `val`, streamed with `datasets`), with an `input_ids`
column of token-id sequences of any length and the domain from a `source`, `domain` or
`subdomain` column, else the file stem (the dataset name for the Hub). Each sequence is
scored as a document whose first id is its context (no BOS is added): every later id is
scored once, in windows of `context` tokens as above.
"""

from __future__ import annotations

import gzip
import math
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dynlab.data.documents import blank_line_documents, jsonl_lines
from dynlab.eval.scoring import sequence_logprobs, windows

PPL_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
DOMAIN_COLUMNS = ("source", "domain", "subdomain")
EVAL_SPLITS = ("val", "validation", "test")


class PretokenizedDocs(list):
    """A domain's pre-tokenised sequences (lists of ids), scored as they are: the first id is
    context, every later id is scored (no BOS added, no re-tokenisation)."""


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
        domains[_stem(path)] = blank_line_documents(path.read_text(encoding="utf-8"))
        return domains
    with open_text(path) as fh:
        for lineno, record, problem in jsonl_lines(fh, path):
            if problem:
                report_problem(problem, on_error)
                continue
            ids = record.get("input_ids") if isinstance(record, dict) else None
            if isinstance(ids, list) and "text" not in record:
                if not all(isinstance(t, int) and t >= 0 for t in ids):
                    report_problem(f"{path}:{lineno}: 'input_ids' must be a list of "
                                   "non-negative integers", on_error)
                    continue
                source = str(record.get("source", _stem(path)))
                docs = domains.setdefault(source, PretokenizedDocs())
                if not isinstance(docs, PretokenizedDocs):
                    raise ValueError(f"{path}:{lineno}: domain {source!r} mixes text and "
                                     "input_ids records")
                docs.append(list(ids))
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                report_problem(f"{path}:{lineno}: expected an object with a 'text' string "
                               "(or an 'input_ids' list)", on_error)
                continue
            source = str(record.get("source", _stem(path)))
            docs = domains.setdefault(source, [])
            if isinstance(docs, PretokenizedDocs):
                raise ValueError(f"{path}:{lineno}: domain {source!r} mixes text and "
                                 "input_ids records")
            docs.append(record["text"])
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


def _domains_from_rows(rows: list, labels: list | None, default: str,
                       domains: dict[str, PretokenizedDocs]) -> None:
    for i, ids in enumerate(rows):
        if ids is None:
            continue
        dom = str(labels[i]) if labels is not None and labels[i] is not None else default
        domains.setdefault(dom, PretokenizedDocs()).append([int(t) for t in ids])


def read_pretokenized_domains(spec: str | Path) -> dict[str, PretokenizedDocs] | None:
    """Pre-tokenised sequences by domain (module docstring), or None when `spec` is not
    pre-tokenised data (no local .parquet/.arrow files and not a Hugging Face name)."""
    from dynlab.data import pretokenized as P

    files = P.row_files(spec)
    domains: dict[str, PretokenizedDocs] = {}
    if files is not None:
        pa, pq = _arrow()
        for f in files:
            try:
                if f.suffix == ".parquet":
                    table = pq.read_table(f)
                else:
                    src = pa.memory_map(str(f))
                    reader = pa.ipc.open_file if _is_arrow_file(f) else pa.ipc.open_stream
                    table = reader(src).read_all()
            except Exception as err:
                raise ValueError(f"--ppl {f}: not a readable {f.suffix} file ({err})") from err
            if P.COLUMN not in table.column_names:
                raise ValueError(f"--ppl {f}: no `{P.COLUMN}` column (columns: "
                                 f"{', '.join(table.column_names)})")
            label = next((c for c in DOMAIN_COLUMNS if c in table.column_names), None)
            _domains_from_rows(table.column(P.COLUMN).to_pylist(),
                               table.column(label).to_pylist() if label else None,
                               _stem(f), domains)
    elif not Path(spec).expanduser().exists() and P.HUB_NAME.match(str(spec)):
        datasets = _hub()
        last = None
        for split in EVAL_SPLITS:
            try:
                stream = datasets.load_dataset(str(spec), split=split, streaming=True)
                records = list(stream)
                break
            except Exception as err:  # no such split, network, unknown name
                last = err
        else:
            raise ValueError(f"--ppl {spec}: cannot read this Hugging Face dataset "
                             f"(splits {', '.join(EVAL_SPLITS)}): {last}")
        if not records or P.COLUMN not in records[0]:
            return None  # a text dataset: not handled here
        label = next((c for c in DOMAIN_COLUMNS if c in records[0]), None)
        _domains_from_rows([r[P.COLUMN] for r in records],
                           [r[label] for r in records] if label else None,
                           str(spec).split("/")[-1], domains)
    else:
        return None
    if not any(len(ids) > 1 for docs in domains.values() for ids in docs):
        raise ValueError(f"--ppl {spec}: no sequence of two or more token ids to score")
    return domains


def _arrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading .parquet/.arrow evaluation data needs pyarrow "
                          "(pip install 'dynlab[data]')") from err
    return pa, pq


def _hub():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("reading a Hugging Face dataset needs the optional `datasets` "
                          "package (pip install 'dynlab[data]')") from err
    return datasets


def _is_arrow_file(path: Path) -> bool:
    """Arrow IPC file format (magic ARROW1 at the start) rather than the stream format."""
    with open(path, "rb") as fh:
        return fh.read(6) == b"ARROW1"


PALOMA_SPLITS = ("val", "test")


def is_paloma_layout(path: Path) -> bool:
    """A folder whose sub-folders (domains) hold `val/` or `test/` split folders."""
    return path.is_dir() and any((d / s).is_dir() for d in path.iterdir() if d.is_dir()
                                 for s in PALOMA_SPLITS)


def paloma_files(root: Path, split: str = "val") -> dict[str, list[Path]]:
    """Paloma's layout: {domain folder name: its `split` folder's .jsonl(.gz) files}.
    ValueError naming the folder for a domain without that split or with no files in it."""
    if split not in PALOMA_SPLITS:
        raise ValueError(f"--split must be one of {', '.join(PALOMA_SPLITS)}, not {split!r}")
    out: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        folder = d / split
        if not folder.is_dir():
            have = [s for s in PALOMA_SPLITS if (d / s).is_dir()]
            raise ValueError(f"--ppl {root}: domain folder {d.name}/ has no {split}/ split "
                             f"(it has {', '.join(have) or 'no split folder'}); expected "
                             f"{d.name}/{split}/*.jsonl.gz")
        files = sorted(f for f in folder.iterdir() if f.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise ValueError(f"--ppl {folder}: no .jsonl.gz or .jsonl files")
        out[d.name] = files
    return out


def read_paloma(root: Path, split: str = "val",
                on_error: str = "fail") -> dict[str, list[str]]:
    """Documents (or PretokenizedDocs) by domain of a folder in Paloma's layout (module
    docstring); the domain is the folder's name, whatever `source` its records carry."""
    domains: dict[str, list] = {}
    for dom, files in paloma_files(root, split).items():
        docs: list = []
        for f in files:
            for part in read_ppl_file(f, on_error).values():
                if docs and isinstance(part, PretokenizedDocs) != isinstance(docs,
                                                                          PretokenizedDocs):
                    raise ValueError(f"--ppl {f}: domain {dom!r} mixes text and input_ids "
                                     "records")
                if not docs and isinstance(part, PretokenizedDocs):
                    docs = PretokenizedDocs()
                docs.extend(part)
        domains[dom] = docs
    return domains


def read_ppl_domains(spec: str | Path, on_error: str = "fail",
                     split: str = "val") -> dict[str, list[str]]:
    """Held-out documents by domain from a directory, file or glob, or a folder in Paloma's
    layout (`split` folder of each domain; see module docstring); pre-tokenised data gives
    PretokenizedDocs per domain."""
    if is_paloma_layout(Path(spec)):
        domains = read_paloma(Path(spec), split, on_error)
    else:
        pretokenized = read_pretokenized_domains(spec)
        if pretokenized is not None:
            return pretokenized
        domains = {}
        for path in resolve_files(spec, PPL_SUFFIXES, "--ppl"):
            for dom, docs in read_ppl_file(path, on_error).items():
                if dom in domains and isinstance(docs, PretokenizedDocs) != isinstance(
                        domains[dom], PretokenizedDocs):
                    raise ValueError(f"--ppl {path}: domain {dom!r} mixes text and "
                                     "input_ids records")
                domains.setdefault(dom, docs.__class__()).extend(docs)
    empty = [d for d, docs in domains.items()
             if not any((len(x) > 1) if isinstance(docs, PretokenizedDocs) else x.strip()
                        for x in docs)]
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


def mean_token_loss(nll: float, tokens: int) -> float:
    """L = total NLL (nats) / total scored tokens (the log of the perplexity)."""
    if tokens <= 0:
        raise ValueError("the mean loss of zero tokens is undefined")
    return nll / tokens


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """bpb = total NLL (nats) / (ln 2 · UTF-8 bytes of the scored text): the code length in
    bits per byte (lm-evaluation-harness's `bits_per_byte`; Gao et al. 2020, The Pile, §4.1);
    NaN when the byte count is unknown (0)."""
    return nll / (math.log(2) * n_bytes) if n_bytes > 0 else math.nan


def utf8_bytes(text: str) -> int:
    """The UTF-8 byte count of a text."""
    return len(text.encode("utf-8"))


def domain_bytes(domains: dict[str, list], tokenizer=None) -> dict[str, int]:
    """UTF-8 bytes of the scored text per domain: of each text document, and of the decoded
    scored ids (all but the first) of each pre-tokenised sequence (0 without a tokenizer able
    to decode: bits per byte is then NaN)."""
    out = {}
    for dom, docs in domains.items():
        if isinstance(docs, PretokenizedDocs):
            decode = getattr(tokenizer, "decode", None)
            out[dom] = (sum(utf8_bytes(decode(ids[1:])) for ids in docs if len(ids) > 1)
                        if decode is not None else 0)
        else:
            out[dom] = sum(utf8_bytes(d) for d in docs)
    return out


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
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for dom, docs in encoded.items():
        pretokenized = isinstance(docs, PretokenizedDocs)
        for ids in docs:
            if pretokenized and vocab is not None and ids and max(ids) >= vocab:
                raise ValueError(f"perplexity domain {dom!r}: token id {max(ids)} is outside "
                                 f"the model's vocabulary ({vocab}); was the data tokenised "
                                 "with this model's tokenizer?")
            first, rest = (ids[0], ids[1:]) if pretokenized and ids else (bos, ids)
            for seq, k in windows(rest, first, context, stride):
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
    """Token ids (no special tokens) of every document, by domain; pre-tokenised domains as
    they are."""
    return {dom: docs if isinstance(docs, PretokenizedDocs) else
            [e.ids for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
            for dom, docs in domains.items()}


def count_windows(encoded: dict[str, list[list[int]]], context: int,
                  stride: int | None = None) -> int:
    """How many windows domain_nll will score (for progress bars)."""
    return sum(len(windows(ids[1:] if isinstance(docs, PretokenizedDocs) else ids, 0, context,
                           stride))
               for docs in encoded.values() for ids in docs)


def perplexity(model: torch.nn.Module, tokenizer, domains: dict[str, list[str]], bos: int,
               context: int, *, stride: int | None = None, batch_size: int = 32,
               progress: Callable[[int], None] | None = None,
               encoded: dict[str, list[list[int]]] | None = None,
               on_error: str = "fail", n_bytes: dict[str, int] | None = None) -> dict | None:
    """{"by_domain": {domain: ppl}, "macro": mean ppl over domains}, ppl = exp(NLL / tokens),
    with the other units (module docstring): "loss_by_domain", "loss_macro", "loss" (pooled
    over every token), "bpb_by_domain", "bpb_macro", "bpb" (pooled), "tokens_by_domain",
    "bytes_by_domain", and the window "max_length" (context) and "stride" scored with.

    A domain with no token to score raises ValueError (on_error="fail") or is left out with
    an EvalDataWarning ("skip"); None when no domain is left. `encoded`: the domains already
    tokenised (encode_domains); `n_bytes`: domain_bytes of the domains (computed if None)."""
    sums = domain_nll(model, tokenizer, domains, bos, context, stride=stride,
                      batch_size=batch_size, progress=progress, encoded=encoded)
    n_bytes = domain_bytes(domains, tokenizer) if n_bytes is None else n_bytes
    by_domain, kept = {}, {}
    for dom, (nll, n) in sums.items():
        if n == 0:
            report_problem(f"perplexity domain {dom!r}: no tokens to score", on_error)
            continue
        by_domain[dom] = perplexity_from_sums(nll, n)
        kept[dom] = (nll, n, int(n_bytes.get(dom, 0)))
    if not by_domain:
        return None
    loss = {d: mean_token_loss(nll, n) for d, (nll, n, _) in kept.items()}
    bpb = {d: bits_per_byte(nll, b) for d, (nll, _, b) in kept.items()}
    total_nll = sum(v[0] for v in kept.values())
    total_bytes = sum(v[2] for v in kept.values())
    return {"by_domain": by_domain, "macro": macro_average(by_domain),
            "loss_by_domain": loss, "loss_macro": macro_average(loss),
            "loss": mean_token_loss(total_nll, sum(v[1] for v in kept.values())),
            "bpb_by_domain": bpb, "bpb_macro": macro_average(bpb),
            "bpb": (bits_per_byte(total_nll, total_bytes)
                    if all(v[2] > 0 for v in kept.values()) else math.nan),
            "tokens_by_domain": {d: v[1] for d, v in kept.items()},
            "bytes_by_domain": {d: v[2] for d, v in kept.items()},
            "max_length": int(context), "stride": int(stride or context)}
