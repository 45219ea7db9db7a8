"""Documents: the embedded grammar corpus, local `.txt` / `.jsonl` files, pre-tokenised
`.npy` / `.bin` token arrays, or a Hugging Face dataset (streamed, needs the optional
`datasets` package). Training, evaluation and analysis-time activations read their text here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

DEFAULT_DATA = "default"
DEFAULT_N_DOCUMENTS = 20_000


def default_documents(n_documents: int = DEFAULT_N_DOCUMENTS, seed: int = 0) -> list[str]:
    """The embedded grammar corpus (dynlab.data.grammar.generate_corpus)."""
    from dynlab.data.grammar import generate_corpus

    return list(generate_corpus(n_documents, seed))


def blank_line_documents(text: str) -> list[str]:
    """The documents of a `.txt`: blocks separated by blank lines, stripped, empty ones left
    out (CRLF line ends read as LF)."""
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    return [b for b in blocks if b]


def jsonl_lines(lines: Iterable[str], path: Path | str) -> Iterator[tuple[int, object, str]]:
    """(line number, the parsed value, '') for each non-blank line of a JSON-lines file, or
    (line number, None, 'PATH:N: not valid JSON (why)') for a line that does not parse."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line), ""
        except json.JSONDecodeError as err:
            yield lineno, None, f"{path}:{lineno}: not valid JSON ({err.msg})"


def read_text_documents(path: Path) -> list[str]:
    """`.txt`: documents separated by blank lines; `.jsonl`: the `text` field of each line."""
    if path.suffix != ".jsonl":
        return blank_line_documents(path.read_text(encoding="utf-8"))
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, record, problem in jsonl_lines(fh, path):
            if problem:
                raise ValueError(problem)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a 'text' string")
            docs.append(record["text"])
    return [d for d in docs if d.strip()]


def read_token_file(path: Path) -> np.ndarray:
    """Pre-tokenised ids: `.npy` (any integer dtype) or `.bin` (raw uint16, nanoGPT style)."""
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: expected a 1-D integer token array, got "
                             f"{arr.ndim}-D {arr.dtype}")
    else:
        arr = np.fromfile(path, dtype=np.uint16)
    return arr.astype(np.int64)


TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".npy", ".bin")


def hf_documents(name: str, max_documents: int, split: str = "train",
                 text_field: str = "text") -> list[str]:
    """Stream the first max_documents texts of a Hugging Face dataset (needs `datasets`)."""
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError as err:
        raise ImportError(
            f"--data {name!r} is neither a local file nor 'default'; reading it as a Hugging Face "
            "dataset needs the optional `datasets` package (pip install datasets)"
        ) from err
    from datasets import load_dataset

    stream = load_dataset(name, split=split, streaming=True)
    docs = []
    for record in stream:
        text = record.get(text_field)
        if isinstance(text, str) and text.strip():
            docs.append(text)
        if len(docs) >= max_documents:
            break
    return docs
