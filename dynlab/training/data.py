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
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EOT = "<|endoftext|>"


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path):  # -> tokenizers.Tokenizer
    """A `tokenizers` tokenizer: a tokenizer.json file, a directory holding one (a Hugging Face
    model directory), or a Hugging Face model name (`allenai/OLMo-7B-0724-hf`, fetched by
    `Tokenizer.from_pretrained`, which needs the network or the Hub cache). It must contain
    `<|endoftext|>` (the document separator and evaluation BOS)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer {path}: directory has no tokenizer.json")
        path = path / "tokenizer.json"
    if not path.is_file():
        import re

        name = str(path)
        if (not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", name)
                or name.endswith(".json")):
            raise FileNotFoundError(f"tokenizer {path}: file not found (expected a "
                                    "tokenizer.json, a directory holding one, or a Hugging "
                                    "Face model name)")
        try:
            tok = Tokenizer.from_pretrained(name)
        except Exception as err:
            raise FileNotFoundError(
                f"tokenizer {name}: no such local file or directory, and fetching it from the "
                f"Hugging Face Hub failed ({err}); offline, pass a directory holding its "
                "tokenizer.json") from err
    else:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise ValueError(f"tokenizer {path}: not a `tokenizers` tokenizer.json ({err})"
                             ) from err
    if tok.token_to_id(EOT) is None:
        raise ValueError(f"tokenizer {path}: has no {EOT} token (needed as document separator)")
    return tok


def bos_id(tokenizer) -> int:
    """Id of `<|endoftext|>`: the document separator and the BOS token used in evaluation."""
    idx = tokenizer.token_to_id(EOT)
    if idx is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    return int(idx)


def cache_dir() -> Path:
    """Where trained tokenizers are cached: $DYNLAB_CACHE or ~/.cache/dynlab."""
    root = os.environ.get("DYNLAB_CACHE") or Path.home() / ".cache" / "dynlab"
    return Path(root)


def corpus_hash(documents: Iterable[str], vocab_size: int) -> str:
    """sha256 over (vocab_size, each document's length and text): the tokenizer cache key."""
    h = hashlib.sha256(f"bpe-v1 vocab={vocab_size}\n".encode())
    for doc in documents:
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:24]


def train_tokenizer(documents: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained on the documents, with `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tok


def get_tokenizer(documents: list[str], vocab_size: int, cache: Path | None = None):
    """The BPE tokenizer for these documents, trained once and cached by corpus hash."""
    from tokenizers import Tokenizer

    cache = cache_dir() / "tokenizers" if cache is None else Path(cache)
    path = cache / f"bpe-{corpus_hash(documents, vocab_size)}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a corrupt cache entry is retrained below
            pass
    tok = train_tokenizer(documents, vocab_size)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)
    except OSError:  # a read-only cache is not an error, only a slower next run
        pass
    return tok


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


def encode_documents(tokenizer, documents: list[str]) -> np.ndarray:
    """[eot] doc_1 [eot] doc_2 ... as one int64 array."""
    eot = bos_id(tokenizer)
    pieces = []
    for enc in tokenizer.encode_batch(documents, add_special_tokens=False):
        pieces.append(np.asarray([eot] + enc.ids, dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


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
    if hasattr(data, "batch"):  # pre-tokenised rows (dynlab.training.pretokenized.RowData)
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
