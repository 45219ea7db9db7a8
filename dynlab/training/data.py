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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynlab.data import pretokenized
from dynlab.data.documents import (
    DEFAULT_DATA,
    TEXT_SUFFIXES,
    TOKEN_SUFFIXES,
    default_documents,
    hf_documents,
    read_text_documents,
    read_token_file,
)
from dynlab.data.tokenizer import encode_documents, get_tokenizer, load_tokenizer

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
