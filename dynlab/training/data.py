"""Training data: documents -> byte-level BPE tokens -> a token stream -> batches.

Documents come from the embedded grammar corpus (default), local `.txt` / `.jsonl`
files, pre-tokenised `.npy` / `.bin` token arrays, or a Hugging Face dataset name
(streamed, needs the optional `datasets` package). Documents are joined into one
stream, each preceded by `<|endoftext|>`:

    stream = [eot] doc_1 [eot] doc_2 ... [eot] doc_n

The first `ld_batch_size` windows of seq_len + 1 tokens are held out as the fixed
learning-dynamics batch; the rest is cut into non-overlapping training windows, read in a
seeded random order that depends only on (seed, epoch), so a run resumes from one
integer, the number of windows consumed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynlab.data import pretokenized

# the tokenizer lives in dynlab.data.tokenizer; its names are kept importable from here
from dynlab.data.tokenizer import (  # noqa: F401
    EOT,
    bos_id,
    cache_dir,
    corpus_hash,
    encode_documents,
    get_tokenizer,
    load_tokenizer,
    train_tokenizer,
)

# ---------------------------------------------------------------- documents


DEFAULT_DATA = "default"
DEFAULT_N_DOCUMENTS = 20_000


def default_documents(n_documents: int = DEFAULT_N_DOCUMENTS, seed: int = 0) -> list[str]:
    """The embedded grammar corpus (dynlab.data.grammar.generate_corpus)."""
    from dynlab.data.grammar import generate_corpus

    return list(generate_corpus(n_documents, seed))


def read_text_documents(path: Path) -> list[str]:
    """`.txt`: documents separated by blank lines; `.jsonl`: the `text` field of each line."""
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a 'text' string")
                docs.append(record["text"])
        return [d for d in docs if d.strip()]
    text = path.read_text(encoding="utf-8")
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    return [b for b in blocks if b]


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


# ---------------------------------------------------------------- token stream


@dataclass
class TokenData:
    """Held-out learning-dynamics windows and the training token stream."""

    ld_batch: torch.Tensor  # (ld_batch_size, seq_len + 1) int64, fixed for the whole run
    train_tokens: np.ndarray  # 1-D int64
    seq_len: int

    @property
    def n_windows(self) -> int:
        """Number of non-overlapping training windows of seq_len + 1 tokens."""
        return (len(self.train_tokens) - 1) // self.seq_len

    @property
    def n_train_tokens(self) -> int:
        return len(self.train_tokens)


def split_stream(tokens: np.ndarray, seq_len: int, ld_batch_size: int,
                 source: str = "data") -> TokenData:
    """Hold out ld_batch_size windows at the start of the stream; train on the rest."""
    ld_len = ld_batch_size * (seq_len + 1)
    need = ld_len + 2 * (seq_len + 1)
    if len(tokens) < need:
        raise ValueError(
            f"{source}: only {len(tokens)} tokens; need at least {need} for a learning-dynamics "
            f"batch of {ld_batch_size} and two training windows at seq_len {seq_len}"
        )
    ld = torch.from_numpy(tokens[:ld_len].copy()).view(ld_batch_size, seq_len + 1)
    return TokenData(ld_batch=ld, train_tokens=tokens[ld_len:], seq_len=seq_len)


@functools.lru_cache(maxsize=2)
def window_order(n_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of the training windows that depends only on (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_windows, generator=gen)


def sample_indices(position: int, count: int, n_windows: int, seed: int) -> list[int]:
    """Window ids of samples position .. position+count-1 of the endless epoch sequence."""
    out = []
    for g in range(position, position + count):
        epoch, i = divmod(g, n_windows)
        out.append(int(window_order(n_windows, seed, epoch)[i]))
    return out


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """The data sharding point: rank r of W trains on samples r, r + W, r + 2W, ..."""
    return indices[rank::world_size]


def get_windows(data: TokenData, windows: list[int]) -> torch.Tensor:
    """Stack the chosen training windows: (len(windows), seq_len + 1) int64."""
    L = data.seq_len
    rows = [data.train_tokens[w * L: w * L + L + 1] for w in windows]
    return torch.from_numpy(np.stack(rows))


def first_batch(data, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
                ) -> torch.Tensor:
    """This process's share of the first global micro-batch (samples 0 .. batch_size - 1)."""
    if hasattr(data, "batch"):  # pre-tokenised rows (dynlab.data.pretokenized.RowData)
        return data.batch(0, batch_size, rank, world_size)
    return get_windows(data, shard(sample_indices(0, batch_size, data.n_windows, seed),
                                   rank, world_size))


def iter_batches(data: TokenData, position: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless (new position, batch) pairs starting at a data position (in samples).

    batch_size is this process's share: each batch consumes batch_size · world_size samples
    of the global order, of which rank r takes r, r + world_size, ... (`shard`). Pre-tokenised
    rows are read in their stored order (`RowData.iter_batches`), token streams in a seeded
    window order."""
    if hasattr(data, "iter_batches"):
        yield from data.iter_batches(position, batch_size, rank, world_size)
        return
    while True:
        idx = shard(sample_indices(position, batch_size * world_size, data.n_windows, seed),
                    rank, world_size)
        position += batch_size * world_size
        yield position, get_windows(data, idx)


# ---------------------------------------------------------------- the run's data


def is_local_spec(spec: str) -> bool:
    """Whether --data names a local file or directory (else a Hugging Face dataset)."""
    p = Path(spec).expanduser()
    return (p.exists() or p.suffix in TEXT_SUFFIXES + TOKEN_SUFFIXES + pretokenized.ROW_SUFFIXES
            or spec.startswith((".", "/", "~")))


def load_data(cfg, tokenizer_path: Path | None) -> tuple[object, TokenData]:
    """(tokenizer, TokenData) for cfg.data; tokenizer_path (resume / warm start / --tokenizer)
    overrides training a BPE tokenizer on the documents."""
    spec = cfg.data
    tokens = None
    documents: list[str] = []
    rows = pretokenized.open_rows(spec) if spec != DEFAULT_DATA else None
    if rows is not None:  # pre-tokenised rows of seq_len + 1 ids, used as they are
        if tokenizer_path is None:
            raise ValueError(f"--data {spec}: pre-tokenised data needs --tokenizer (the one its "
                             "ids come from: a tokenizer.json, a directory holding one, or a "
                             "Hugging Face model name)")
        tokenizer = load_tokenizer(tokenizer_path)
        return tokenizer, pretokenized.load_rows(rows, cfg.seq_len, cfg.ld_batch_size, tokenizer,
                                      cfg.model_vocab_size, spec)
    if spec == DEFAULT_DATA:
        documents = default_documents(cfg.n_documents)
    elif is_local_spec(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--data {spec}: file not found (expected 'default', a "
                                    ".txt/.jsonl/.npy/.bin/.parquet/.arrow file or directory, "
                                    "or a Hugging Face dataset name)")
        files = ([path] if path.is_file() else
                 sorted(p for p in path.iterdir()
                        if p.suffix in TEXT_SUFFIXES + TOKEN_SUFFIXES))
        if not files:
            raise ValueError(f"--data {spec}: no .txt/.jsonl/.npy/.bin files in the directory")
        kinds = {f.suffix in TOKEN_SUFFIXES for f in files}
        if len(kinds) > 1:
            raise ValueError(f"--data {spec}: mixes text and pre-tokenised files")
        for f in files:
            if f.suffix not in TEXT_SUFFIXES + TOKEN_SUFFIXES:
                raise ValueError(f"--data {f}: unsupported file type {f.suffix!r} (expected "
                                 ".txt, .jsonl, .npy or .bin)")
        if kinds == {True}:
            if tokenizer_path is None:
                raise ValueError(f"--data {spec}: pre-tokenised data needs --tokenizer "
                                 "(the tokenizer.json its ids come from)")
            tokens = torch.cat([torch.from_numpy(read_token_file(f)) for f in files]).numpy()
        else:
            for f in files:
                documents += read_text_documents(f)
    else:
        documents = hf_documents(spec, cfg.n_documents)
    if tokens is None and not documents:
        raise ValueError(f"--data {spec}: no documents (the data is empty)")
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer = get_tokenizer(documents, cfg.vocab_size)
    if tokens is None:
        tokens = encode_documents(tokenizer, documents)
    elif len(tokens) and int(tokens.max()) >= tokenizer.get_vocab_size():
        raise ValueError(f"--data {spec}: token id {int(tokens.max())} is outside the "
                         f"tokenizer's vocabulary ({tokenizer.get_vocab_size()})")
    return tokenizer, split_stream(tokens, cfg.seq_len, cfg.ld_batch_size, f"--data {spec}")
