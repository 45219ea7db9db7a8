"""The tokenizer: byte-level BPE trained on the documents (cached by corpus hash), or a
`tokenizers` tokenizer.json / Hugging Face model; `<|endoftext|>` separates documents and is
the BOS token of evaluation.

    stream = [eot] doc_1 [eot] doc_2 ... [eot] doc_n              (encode_documents)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dynlab.atomic import replace_atomically

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
        replace_atomically(path, lambda tmp: tok.save(str(tmp)),
                           path.with_suffix(f".tmp{os.getpid()}").name)
    except OSError:  # a read-only cache is not an error, only a slower next run
        pass
    return tok


def encode_documents(tokenizer, documents: list[str]) -> np.ndarray:
    """[eot] doc_1 [eot] doc_2 ... as one int64 array."""
    eot = bos_id(tokenizer)
    pieces = []
    for enc in tokenizer.encode_batch(documents, add_special_tokens=False):
        pieces.append(np.asarray([eot] + enc.ids, dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
