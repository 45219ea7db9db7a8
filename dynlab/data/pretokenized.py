"""Pre-tokenised datasets: rows of `seq_len + 1` token ids, used as they are.

The study's data, `pico-lm/pretokenized-dolma`, is Dolma tokenised with the OLMo tokenizer
and cut into rows of 2049 ids (an `input_ids` column) in 10 000 parquet shards of 20 480 rows,
already shuffled. dynlab reads such data from

- local files: `.parquet` (pyarrow) or `.arrow` (the Arrow IPC files that
  `datasets.Dataset.save_to_disk` writes), a single file or a directory of them (searched
  recursively, sorted by path; a `save_to_disk` directory's `state.json` order is used);
- a Hugging Face dataset name, streamed with the optional `datasets` package.

Each row is one training sequence: no re-tokenisation, no joining, no shuffling. Sample g of
the run (a global count: `data_position` in the trainer) is row `start + g` (wrapping to
`start` again when a local dataset runs out), where `start` = the number of rows held out as
the fixed learning-dynamics batch (rows 0 .. ld_batch_size - 1). A micro-batch of B global
samples is rows start + p .. start + p + B - 1; process r of W takes every W-th of them from
the r-th (`dynlab.training.data.shard`), so the rows a step trains on do not depend on W, and a
run resumes at the exact row from the one integer p. Local and streamed data share this code;
only `read(first_row, count)` differs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dynlab.errors import DynlabFailure, InputError

ROW_SUFFIXES = (".parquet", ".arrow")
COLUMN = "input_ids"
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow is in the `data` extra
        raise ImportError("reading .parquet/.arrow data needs pyarrow "
                          "(pip install 'dynlab[data]')") from err
    return pa, pq


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("streaming a Hugging Face dataset needs the optional `datasets` "
                          "package (pip install 'dynlab[data]' or pip install datasets)") from err
    return datasets


# ---------------------------------------------------------------- files


def row_files(spec: str | Path) -> list[Path] | None:
    """The local row files a --data spec names, in reading order; None when the spec is not
    a local .parquet/.arrow file or a directory holding some."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path] if path.suffix in ROW_SUFFIXES else None
    if not path.is_dir():
        return None
    state = path / "state.json"
    if state.is_file():  # datasets.Dataset.save_to_disk: the shard order is in state.json
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
            return [path / n for n in names]
        except (ValueError, KeyError, TypeError):
            pass
    for suffix in ROW_SUFFIXES:
        found = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if found:
            return found
    return None


def to_matrix(column, width: int, where: str) -> np.ndarray:
    """An Arrow list column (or a list of lists) of token ids -> (rows, width) int64, checking
    that every row has `width` ids, integer and non-null."""
    pa, _ = _pyarrow()
    if isinstance(column, list):
        lengths = {len(r) for r in column}
        if lengths and lengths != {width}:
            bad = next(i for i, r in enumerate(column) if len(r) != width)
            raise InputError(f"{where}, row {bad}: {len(column[bad])} ids; expected seq_len + 1 "
                             f"= {width} (rows are used as they are: set --seq-len to the "
                             "data's row length - 1)")
        arr = np.asarray(column)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{where}: `{COLUMN}` holds {arr.dtype}, expected integer ids")
        return arr.astype(np.int64).reshape(len(column), width)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    typ = column.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)
            or pa.types.is_fixed_size_list(typ)):
        raise InputError(f"{where}: column `{COLUMN}` is {typ}, expected a list of token ids")
    if not pa.types.is_integer(typ.value_type):
        raise InputError(f"{where}: `{COLUMN}` holds {typ.value_type}, expected integer ids")
    if column.null_count:
        raise InputError(f"{where}: `{COLUMN}` has {column.null_count} null rows")
    if pa.types.is_fixed_size_list(typ):
        lengths = np.full(len(column), typ.list_size)
    else:
        lengths = np.diff(np.asarray(column.offsets))
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        raise InputError(f"{where}, row {int(bad[0])}: {int(lengths[bad[0]])} ids; expected "
                         f"seq_len + 1 = {width} (rows are used as they are: set --seq-len to "
                         "the data's row length - 1)")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.int64).reshape(len(column), width)


class LocalRows:
    """Random access to the rows of local .parquet/.arrow files (row groups read on demand,
    Arrow files memory-mapped)."""

    def __init__(self, files: list[Path], name: str) -> None:
        pa, pq = _pyarrow()
        self.name = name
        self._parts: list[tuple[Path, object, int]] = []  # (file, reader or table, first row)
        self._cache: dict[tuple[int, int], object] = {}
        row = 0
        for f in files:
            if not f.is_file():
                raise InputError(f"--data {name}: {f} is missing")
            try:
                if f.suffix == ".parquet":
                    reader = pq.ParquetFile(f)
                    if COLUMN not in reader.schema_arrow.names:
                        raise InputError(f"--data {f}: no `{COLUMN}` column (columns: "
                                         f"{', '.join(reader.schema_arrow.names)})")
                    groups = [reader.metadata.row_group(i).num_rows
                              for i in range(reader.num_row_groups)]
                    part: object = (reader, np.cumsum([0, *groups]))
                    n = int(sum(groups))
                else:
                    part = _read_arrow(pa, f)
                    if COLUMN not in part.column_names:
                        raise InputError(f"--data {f}: no `{COLUMN}` column (columns: "
                                         f"{', '.join(part.column_names)})")
                    n = part.num_rows
            except InputError:
                raise
            except Exception as err:  # pyarrow's errors for a file that is not what it says
                raise InputError(f"--data {f}: not a readable {f.suffix} file ({err})") from err
            self._parts.append((f, part, row))
            row += n
        self.n_rows: int | None = row

    def _part_rows(self, k: int, lo: int, hi: int):
        """Rows lo..hi-1 (within part k) as an Arrow array of lists."""
        f, part, _ = self._parts[k]
        if not isinstance(part, tuple):
            return part.column(COLUMN).slice(lo, hi - lo)
        reader, bounds = part
        pieces = []
        g = int(np.searchsorted(bounds, lo, side="right")) - 1
        while lo < hi:
            key = (k, g)
            if key not in self._cache:
                if len(self._cache) >= 4:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = reader.read_row_group(g, columns=[COLUMN]).column(COLUMN)
            a, b = int(bounds[g]), int(bounds[g + 1])
            take = min(hi, b) - lo
            pieces.append(self._cache[key].slice(lo - a, take))
            lo += take
            g += 1
        pa, _ = _pyarrow()
        return pa.chunked_array(pieces)

    def read(self, first: int, count: int, width: int) -> np.ndarray:
        """Rows first .. first + count - 1 as a (count, width) int64 array."""
        if first < 0 or first + count > self.n_rows:
            raise InputError(f"--data {self.name}: rows {first}..{first + count - 1} requested, "
                             f"the data has {self.n_rows}")
        out = []
        for k, (f, _, start) in enumerate(self._parts):
            end = self._parts[k + 1][2] if k + 1 < len(self._parts) else self.n_rows
            lo, hi = max(first, start), min(first + count, end)
            if lo < hi:
                out.append(to_matrix(self._part_rows(k, lo - start, hi - start), width,
                                     f"--data {f} (rows from {lo - start})"))
        return np.concatenate(out) if len(out) > 1 else out[0]


def _read_arrow(pa, path: Path):
    """A memory-mapped Arrow IPC file (file or stream format) as a Table."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


class HubRows:
    """Rows of a Hugging Face dataset, streamed in order (`datasets`, streaming=True); reading
    from row n opens the stream with `.skip(n)`."""

    def __init__(self, name: str, split: str = "train") -> None:
        datasets = _datasets()
        self.name, self.split = name, split
        try:
            self._ds = datasets.load_dataset(name, split=split, streaming=True)
        except Exception as err:  # network, unknown name, no such split
            raise InputError(f"--data {name}: cannot stream this Hugging Face dataset "
                             f"(split {split!r}): {err}") from err
        info = getattr(self._ds, "info", None)
        splits = getattr(info, "splits", None) or {}
        sp = splits.get(split) if hasattr(splits, "get") else None
        self.n_rows = int(sp.num_examples) if sp is not None and sp.num_examples else None
        self._it: Iterator | None = None
        self._next = -1

    def read(self, first: int, count: int, width: int) -> np.ndarray:
        if self._it is None or first != self._next:
            self._it = iter(self._ds.skip(first) if first else self._ds)
        rows = []
        for _ in range(count):
            try:
                record = next(self._it)
            except StopIteration:
                raise DynlabFailure(f"--data {self.name}: the stream ended at row "
                                    f"{first + len(rows)}") from None
            if COLUMN not in record:
                raise InputError(f"--data {self.name}: rows have no `{COLUMN}` field "
                                 f"(fields: {', '.join(record)})")
            rows.append(list(record[COLUMN]))
        self._next = first + count
        return to_matrix(rows, width, f"--data {self.name} (rows from {first})")


def hub_has_rows(name: str) -> bool:
    """Whether a Hugging Face dataset's rows carry an `input_ids` column (streamed peek)."""
    datasets = _datasets()
    try:
        first = next(iter(datasets.load_dataset(name, split="train", streaming=True)))
    except Exception:
        return False  # left to the text reader, which reports the error
    return COLUMN in first


# ---------------------------------------------------------------- the training data


@dataclass
class RowData:
    """Pre-tokenised rows: the held-out learning-dynamics batch and the training rows."""

    source: LocalRows | HubRows
    seq_len: int
    ld_batch: torch.Tensor  # (ld_batch_size, seq_len + 1) int64: rows 0 .. ld_batch_size - 1
    start: int  # first training row
    name: str
    vocab_limit: int | None = None
    warned: set = field(default_factory=set)

    @property
    def n_windows(self) -> int | None:
        """Training rows available (None for a stream of unknown length)."""
        n = self.source.n_rows
        return None if n is None else n - self.start

    @property
    def n_train_tokens(self) -> int | None:
        n = self.n_windows
        return None if n is None else n * (self.seq_len + 1)

    def row_of(self, sample: int) -> int:
        """Row of global sample g: start + g, wrapping within the training rows of local data."""
        n = self.n_windows
        return self.start + (sample if n is None else sample % n)

    def samples(self, position: int, count: int) -> np.ndarray:
        """Rows of global samples position .. position + count - 1, (count, seq_len + 1)."""
        width = self.seq_len + 1
        out, g = [], position
        while g < position + count:
            first = self.row_of(g)
            run = position + count - g
            if self.n_windows is not None:
                run = min(run, self.start + self.n_windows - first)
            out.append(self.source.read(first, run, width))
            g += run
        rows = np.concatenate(out) if len(out) > 1 else out[0]
        if self.vocab_limit is not None and rows.size:
            hi, lo = int(rows.max()), int(rows.min())
            if hi >= self.vocab_limit or lo < 0:
                bad = hi if hi >= self.vocab_limit else lo
                raise InputError(f"--data {self.name}: token id {bad} "
                                 f"near row {self.row_of(position)} is outside the model's "
                                 f"vocabulary (0..{self.vocab_limit - 1})")
        return rows

    def batch(self, position: int, count: int, rank: int = 0, world_size: int = 1
              ) -> torch.Tensor:
        """This process's share of the global micro-batch of `count` samples at `position`:
        samples position + rank, position + rank + W, ... (dynlab.training.data.shard)."""
        return torch.from_numpy(self.samples(position, count)[rank::world_size].copy())

    def iter_batches(self, position: int, batch_size: int, rank: int = 0, world_size: int = 1
                     ) -> Iterator[tuple[int, torch.Tensor]]:
        """Endless (new position, batch) pairs; batch_size is this process's share."""
        while True:
            count = batch_size * world_size
            yield position + count, self.batch(position, count, rank, world_size)
            position += count


def open_rows(spec: str) -> LocalRows | HubRows | None:
    """The row source a --data spec names, or None when it is not pre-tokenised rows (a text or
    .npy/.bin source, or a Hub dataset without `input_ids`)."""
    files = row_files(spec)
    if files is not None:
        return LocalRows(files, spec)
    local_like = Path(spec).suffix in (*ROW_SUFFIXES, ".txt", ".jsonl", ".npy", ".bin")
    if Path(spec).expanduser().exists() or local_like or not HUB_NAME.match(spec):
        return None  # a local path (missing files are reported by the caller) or not a name
    try:
        _datasets()
    except ImportError:
        return None  # the text reader gives the "needs datasets" message
    return HubRows(spec) if hub_has_rows(spec) else None


def model_vocab(tokenizer, model_vocab_size: int | None) -> int:
    """Embedding rows: the tokenizer's size, or model_vocab_size when larger (pico-train pads the
    OLMo tokenizer's ids to 50 304 rows); smaller than the tokenizer is an error."""
    n = tokenizer.get_vocab_size()
    if model_vocab_size is None:
        return n
    if model_vocab_size < n:
        raise InputError(f"--model-vocab-size {model_vocab_size}: smaller than the tokenizer's "
                         f"{n} ids")
    return model_vocab_size


def load_rows(source: LocalRows | HubRows, seq_len: int, ld_batch_size: int, tokenizer,
              model_vocab_size: int | None, name: str) -> RowData:
    """RowData with rows 0 .. ld_batch_size - 1 held out as the learning-dynamics batch."""
    n = source.n_rows
    if n is not None and n < ld_batch_size + 2:
        raise InputError(f"--data {name}: only {n} rows; need at least {ld_batch_size + 2} for a "
                         f"learning-dynamics batch of {ld_batch_size} and two training rows")
    data = RowData(source=source, seq_len=seq_len, ld_batch=torch.zeros(0), start=ld_batch_size,
                   name=name, vocab_limit=model_vocab(tokenizer, model_vocab_size))
    ld = source.read(0, ld_batch_size, seq_len + 1)
    if int(ld.max(initial=0)) >= data.vocab_limit:
        raise InputError(f"--data {name}: token id {int(ld.max())} in the first rows is outside "
                         f"the model's vocabulary (0..{data.vocab_limit - 1}); is --tokenizer "
                         "the one the data was tokenised with?")
    data.ld_batch = torch.from_numpy(ld)
    return data


def required_rows(position: int, steps: int, global_batch: int) -> int:
    """Training rows a run reads from `position` to the end: steps · global_batch - position."""
    return max(0, steps * global_batch - position)
