"""The analysis store: a Zarr (format 3) store that `xr.open_zarr` opens as one Dataset.

Layout (see README "Store schema"):
    <metric>        (run, kind, step, layer, matrix)        scalar metrics of layer matrices
    head_<metric>   (run, kind, step, layer, head)          per-head OV circuit
    emb_<metric>    (run, kind, step, embedding)            embeddings
    qk_<metric>     (run, kind, step, layer)                whole-layer QK circuit
    qk_head_<metric> (run, kind, step, layer, head)         per-head QK circuit
    sigma / head_sigma / emb_sigma / qk_sigma / qk_head_sigma   the same with a last dim
                    sv / head_sv / emb_sv / sv / head_sv
    analyzed        (run, step) int8, 1 once a checkpoint is fully written, 2 once the
                    selection flagged in done (run, step, layer, matrix), qk_done (run, step,
                    layer) and emb_done (run, step, embedding) is (dynlab.analysis.selection)
    prev_step       (run, step) int64, the step its `updates` were taken against (-1: none)
    train_loss, lr, tokens, wall_seconds, gpu_hours, relora_cycle, ppl_macro, blimp_overall
                    (run, step)
    ppl (run, step, domain), blimp (run, step, uid), blimp_field (run, step, field)

Every variable has chunks of one (run, step) cell, so a checkpoint's results are written by
one writer and parallel writers never share a chunk; data chunks are filled by region writes
(unwritten chunks read as NaN / 0 / -1) and `analyzed` is set last.

Who writes what: a new store's template (every array's zarr.json, the coordinates' chunks,
the root zarr.json with the consolidated metadata) is written by `build_store` itself, and
the cells of a checkpoint are read and written by `RegionWriter` chunk by chunk from each
array's zarr.json — the files zarr-python 3.1 writes, byte for byte (tested against it), so
a plain analysis never imports zarr; zarr reads and writes everything else (growth, partial
chunks, other codecs, stores it made itself).

How the store survives interruption and concurrency (every file write of zarr-python's
LocalStore is itself atomic: a temporary file renamed over the target; so is every file
dynlab writes itself):

* One writer at a time: `dynlab.analysis.storelock.StoreAccess` (the `<store>.lock` file beside it).
* The store's structure changes only in two ways, both recoverable from any point:
  - growth at the end of dims (new runs, new steps after the last, new labels after the last,
    new variables): a journal `.dynlab-journal.json` with the target coordinates is written
    atomically first, then every array is resized, the coordinates written and the
    consolidated metadata written last. `recover` replays an unfinished journal (each step is
    idempotent). Readers see the consolidated metadata, so the store reads as before until
    the growth is complete.
  - anything else (creation, a step or label inserted before existing ones, so that
    coordinates stay sorted): a complete new store is built in `<store>.rebuild/` (data chunk
    files hard-linked to their new index) and swapped in with two renames
    (store -> `<store>.old`, rebuild -> store); `recover` finishes or discards a swap from any
    point.
* Training/evaluation values are written as (run, step) regions of the runs being analysed;
  cells of other runs are never touched, and an unchanged cell is never rewritten (so a
  complete store on a read-only file system analyses to a no-op).

Fault points (`dynlab.faults`): store.create (building a new store), store.rebuild (moving
an array into a rebuilt copy), store.swap (between the two steps of swapping it in),
store.grow (after an array's resize), store.meta (after a training variable's write); and in
`dynlab.analysis`: analyze.write (a checkpoint's data written, its flag not yet),
analyze.checkpoint (after each checkpoint).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynlab.analysis.components import EMBEDDINGS, MATRICES, TABLES
from dynlab.analysis.selection import CELL_VARIABLES
from dynlab.analysis.storelock import StoreAccess
from dynlab.atomic import write_bytes_atomically, write_text_atomically
from dynlab.errors import InputError
from dynlab.faults import fault_point
from dynlab.version import __version__

SCHEMA_VERSION = 2

#: (run, step) variables read from each checkpoint's meta.json
META_VARIABLES: dict[str, str] = {
    "train_loss": "training loss (mean cross-entropy of the logged step)",
    "lr": "learning rate",
    "tokens": "tokens seen",
    "wall_seconds": "wall-clock seconds since the start of training",
    "gpu_hours": "device-hours since the start of training (wall-clock x processes)",
    "relora_cycle": "ReLoRA cycle (number of merge-and-resets so far)",
    "ppl_macro": "perplexity, macro average over domains",
    "blimp_overall": "BLiMP accuracy, mean over UIDs",
    "eval_loss": "mean token loss (nats) over every scored token of every domain",
    "eval_loss_macro": "mean token loss (nats), macro average over domains",
    "bpb_pooled": "bits per byte over every scored byte: total NLL / (ln 2 · total UTF-8 bytes)",
    "bpb_macro": "bits per byte, macro average over domains",
}
EVAL_VARIABLES: dict[str, tuple[str, str]] = {
    "ppl": ("domain", "perplexity per domain: exp(total NLL / total tokens)"),
    "blimp": ("uid", "BLiMP accuracy per UID"),
    "blimp_field": ("field", "BLiMP accuracy per field (mean over its UIDs)"),
    "eval_loss_domain": ("domain", "mean token loss per domain (nats): total NLL / tokens"),
    "bpb": ("domain", "bits per byte per domain: total NLL / (ln 2 · UTF-8 bytes)"),
    "eval_tokens": ("domain", "tokens scored per domain (in the model's tokenizer)"),
    "eval_bytes": ("domain", "UTF-8 bytes of the scored text per domain"),
}
#: the evaluation part each evaluation variable comes from: a checkpoint's meta whose "eval"
#: lacks that part leaves the stored values as they are (`write_meta_regions`)
EVAL_PARTS: dict[str, str] = {
    **{v: "perplexity" for v in ("ppl_macro", "eval_loss", "eval_loss_macro", "bpb_pooled",
                                 "bpb_macro", "ppl", "eval_loss_domain", "bpb", "eval_tokens",
                                 "eval_bytes")},
    **{v: "blimp" for v in ("blimp_overall", "blimp", "blimp_field")},
}
LABEL_DIMS = ("domain", "uid", "field")
#: dims whose coordinate grows as runs, checkpoints and evaluation labels are added
GROWING_DIMS = ("run", "step", *LABEL_DIMS)
#: chunk length of the growing coordinates and of the label dims of the eval variables
COORD_CHUNK = 1024
LABEL_CHUNK = 128

JOURNAL = ".dynlab-journal.json"
BUILDING_MARK = ".dynlab-building"  # in <store>.rebuild while it is being written
BUILT_MARK = ".dynlab-built"  # in <store>.rebuild once it is complete (then swapped in)


@contextlib.contextmanager
def quiet_zarr():
    """Silence zarr's notes that string dtypes and consolidated metadata are not yet in the
    Zarr v3 spec (xarray and zarr-python read both; see README)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*Consolidated metadata is currently not.*")
        warnings.filterwarnings("ignore", message=".*is not recognized as a component of a Zarr")
        yield


class StoreError(InputError):
    """The store on disk does not match what this analysis would write, or is not a
    readable dynlab store (exit 2; the message names the path and what to do)."""


@dataclass
class Layout:
    """Everything that fixes the shape of a store."""

    runs: list[str]
    steps: list[int]
    kinds: list[str]
    metrics: list[str]
    n_layers: int
    n_heads: int
    n_sv: int
    n_head_sv: int
    n_emb_sv: int
    run_configs: dict[str, dict] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)  # domain / uid / field
    convention: str = "dynlab"  # analysis.conventions: which OV matrices and CN the store holds

    def dims(self) -> dict[str, int]:
        return {
            "run": len(self.runs), "kind": len(self.kinds), "step": len(self.steps),
            "layer": self.n_layers, "matrix": len(MATRICES), "head": self.n_heads,
            "embedding": len(EMBEDDINGS), "sv": self.n_sv, "head_sv": self.n_head_sv,
            "emb_sv": self.n_emb_sv,
        }


def spectral_variables(metrics: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Variable name -> dims, for every spectral variable of a store with these metrics (one
    group per result table of dynlab.analysis.components.TABLES)."""
    base = ("run", "kind", "step")
    out: dict[str, tuple[str, ...]] = {}
    for m in metrics:
        for _, prefix, dims, _ in TABLES.values():
            out[prefix + m] = base + dims
    for sigma, prefix, dims, sv in TABLES.values():
        out[sigma] = base + dims + (sv,)
        out[f"{prefix}tol"] = base + dims
        out[f"{prefix}max_rank"] = base + dims
    return out


#: fixed widths of string coordinates (zarr's fixed-length UTF-32; a longer name is an error)
NAME_WIDTH = 256


def _names(values: Sequence[str], what: str) -> np.ndarray:
    too_long = [v for v in values if len(v) > NAME_WIDTH]
    if too_long:
        raise StoreError(f"{what} name {too_long[0][:40]!r}... is longer than {NAME_WIDTH}")
    return np.asarray(list(values), dtype=f"<U{NAME_WIDTH}")


def _variable_attrs(name: str) -> dict:
    from dynlab.analysis.metrics import METRICS, TOL_FACTOR

    base = name
    for prefix in sorted((p for _, p, _, _ in TABLES.values() if p), key=len, reverse=True):
        if name.startswith(prefix):
            base = name.removeprefix(prefix)
            break
    if base in METRICS:
        return {"long_name": METRICS[base].long_name, "definition": METRICS[base].definition}
    if base == "tol":
        return {"long_name": "numerical-zero tolerance of the spectrum",
                "definition": "tol = max(c*eps*S*(1/sqrt(m)+1/sqrt(n)), max(m,n)*eps_c*sigma_1)"
                              "; sigma_i <= tol counts as zero in numerical_rank, cn, cn_nz "
                              "and rank_deficit. The first term is the rounding noise of the "
                              "storage precision (eps: machine epsilon of the coarsest "
                              "precision the matrix or the tensors it was formed from were "
                              "stored in; S: Frobenius norm of those stored inputs, "
                              "sqrt(|W_t|_F^2+|W_prev|_F^2) for a difference, a bound from "
                              "the factors' norms for a product), the second the SVD's error "
                              "in the analysis precision (eps_c)",
                "c": TOL_FACTOR}
    if base == "max_rank":
        return {"long_name": "rank bound by construction",
                "definition": "min(m,n) for a dense matrix; the inner dimension for a product "
                              "of factors (OV circuit n_kv*hd, head OV hd, LoRA s*B*A r, a "
                              "relora update within a cycle [s*B_t, -s*B_t-1]*[A_t; A_t-1] "
                              "2r); numerical_rank <= max_rank"}
    return {"long_name": "singular values, descending, NaN past the rank bound"}


# ----------------------------------------------------------------------------------------
# The template: which arrays a store of a layout holds


@dataclass(frozen=True)
class ArraySpec:
    """One array of the template: its dims, dtype, fill value and attributes."""

    dims: tuple[str, ...]
    dtype: str = "float64"
    fill: object = math.nan
    attrs: Mapping = field(default_factory=dict)


def template(metrics: Sequence[str], labels: Mapping[str, Sequence[str]]) -> dict[str, ArraySpec]:
    """Every data variable of a store with these metrics and evaluation labels."""
    out = {name: ArraySpec(dims, attrs=_variable_attrs(name))
           for name, dims in spectral_variables(metrics).items()}
    out["analyzed"] = ArraySpec(("run", "step"), "int8", 0,
                                {"long_name": "1 once every kind of this checkpoint is written; "
                                              "2 once a selection of its matrices is (those "
                                              "flagged in done, qk_done, emb_done)"})
    for name, (dims, long_name) in CELL_VARIABLES.items():
        out[name] = ArraySpec(("run", "step", *dims), "int8", 0, {"long_name": long_name})
    out["prev_step"] = ArraySpec(
        ("run", "step"), "int64", -1,
        {"long_name": "step of the checkpoint this checkpoint's updates are taken from "
                      "(-1: none)"})
    for name, long_name in META_VARIABLES.items():
        out[name] = ArraySpec(("run", "step"), attrs={"long_name": long_name})
    for name, (dim, long_name) in EVAL_VARIABLES.items():
        if labels.get(dim):
            out[name] = ArraySpec(("run", "step", dim), attrs={"long_name": long_name})
    return out


def _chunk(dim: str, size: int) -> int:
    if dim in ("run", "step"):
        return 1
    if dim in LABEL_DIMS:
        return LABEL_CHUNK
    return max(size, 1)


def fixed_coordinates(layout: Layout) -> dict[str, np.ndarray]:
    """The coordinates that never grow (fixed by the models and the analysis options)."""
    return {
        "kind": _names(layout.kinds, "kind"), "layer": np.arange(layout.n_layers),
        "matrix": _names(MATRICES, "matrix"), "head": np.arange(layout.n_heads),
        "embedding": _names(EMBEDDINGS, "embedding"), "sv": np.arange(layout.n_sv),
        "head_sv": np.arange(layout.n_head_sv), "emb_sv": np.arange(layout.n_emb_sv),
    }


def growing_coordinates(layout: Layout) -> dict[str, list]:
    out: dict[str, list] = {"run": list(layout.runs), "step": [int(s) for s in layout.steps]}
    for dim in LABEL_DIMS:
        if layout.labels.get(dim):
            out[dim] = list(layout.labels[dim])
    return out


def _coordinate_array(dim: str, values: Sequence) -> np.ndarray:
    if dim == "step":
        return np.asarray(values, dtype="int64")
    return _names([str(v) for v in values], dim)


def _attrs(layout: Layout) -> dict:
    return {
        "dynlab_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "metrics": list(layout.metrics),
        "kinds": list(layout.kinds),
        "run_configs": json.dumps(layout.run_configs, sort_keys=True),
        "convention": layout.convention,
        "rand_seed": _rand_seed(),  # seed of the randomised ESDs (analysis.heavytail)
        "description": "dynlab spectral analysis of checkpoints; see the README's store schema",
    }


def _rand_seed() -> int:
    from dynlab.analysis.heavytail import RAND_SEED

    return RAND_SEED


def _open_group(path: Path, mode: str = "r+"):
    import zarr

    with quiet_zarr():
        return zarr.open_group(str(path), mode=mode, use_consolidated=False)


def _consolidate(path: Path) -> None:
    import zarr

    with quiet_zarr():
        zarr.consolidate_metadata(str(path))


def _array_args(spec: ArraySpec, sizes: Mapping[str, int]) -> dict:
    """zarr's `create_array` arguments of a template array (chunks of one (run, step) cell)."""
    return dict(shape=tuple(sizes[d] for d in spec.dims),
                chunks=tuple(_chunk(d, sizes[d]) for d in spec.dims), dtype=spec.dtype,
                fill_value=spec.fill, dimension_names=spec.dims, attributes=dict(spec.attrs),
                overwrite=True)


def _coordinate_args(dim: str, values: np.ndarray, growing: bool) -> dict:
    """zarr's `create_array` arguments of a coordinate (a growing one in chunks of
    COORD_CHUNK)."""
    return dict(shape=values.shape, chunks=(COORD_CHUNK if growing else max(len(values), 1),),
                dtype=values.dtype, fill_value="" if values.dtype.kind == "U" else 0,
                dimension_names=(dim,), overwrite=True)


def _create_array(group, name: str, spec: ArraySpec, sizes: Mapping[str, int]):
    with quiet_zarr():
        return group.create_array(name, **_array_args(spec, sizes))


def _create_coordinate(group, dim: str, values: np.ndarray, growing: bool):
    with quiet_zarr():
        arr = group.create_array(dim, **_coordinate_args(dim, values, growing))
        if values.size:
            arr[...] = values
    return arr


# ----------------------------------------------------------------------------------------
# Reading a store's structure


def read_attrs(path: Path) -> dict:
    try:
        group = _open_group(path, "r")
    except Exception as e:  # zarr raises several types for a non-store
        raise StoreError(f"{path}: exists but is not a Zarr store ({e})") from None
    return dict(group.attrs)


@dataclass
class StoreState:
    """What an existing store holds: attributes, growing coordinates, fixed dim sizes and
    every array's dims and shape (read without the consolidated metadata)."""

    attrs: dict
    coords: dict[str, list]
    sizes: dict[str, int]
    arrays: dict[str, tuple[tuple[str, ...], tuple[int, ...]]]

    def mismatches(self) -> list[str]:
        """Arrays whose length along a dim differs from that dim's coordinate."""
        bad = []
        for name, (dims, shape) in self.arrays.items():
            for d, n in zip(dims, shape, strict=True):
                want = self.sizes.get(d)
                if want is not None and n != want:
                    bad.append(f"{name} has {n} along {d}, its coordinate {want}")
        return bad


def read_state(path: Path) -> StoreState:
    group = _open_group(path, "r")
    arrays = {}
    with quiet_zarr():
        for name, arr in group.arrays():
            arrays[name] = (tuple(arr.metadata.dimension_names or ()), tuple(arr.shape))
    coords: dict[str, list] = {}
    sizes: dict[str, int] = {}
    for name, (dims, shape) in arrays.items():
        if dims == (name,):
            sizes[name] = shape[0]
            if name in GROWING_DIMS:
                values = group[name][...]
                coords[name] = ([int(v) for v in values] if name == "step"
                                else [str(v) for v in values])
    return StoreState(dict(group.attrs), coords, sizes, arrays)


def has_results(path: Path) -> bool:
    """Whether any checkpoint result was ever written (any chunk of `analyzed` on disk; not
    the temporary file of a write that was interrupted)."""
    chunks = path / "analyzed" / "c"
    return chunks.is_dir() and any(p.is_file() and p.name.isdigit() for p in chunks.rglob("*"))


# ----------------------------------------------------------------------------------------
# Recovery of interrupted structural changes


def rebuild_paths(path: Path) -> tuple[Path, Path]:
    """(<store>.rebuild, <store>.old): the new copy being built, the old one being replaced."""
    return path.with_name(path.name + ".rebuild"), path.with_name(path.name + ".old")


def pending_work(path: Path) -> str | None:
    """A sentence naming an interrupted structural change of the store, or None."""
    new, old = rebuild_paths(path)
    if new.exists() or old.exists():
        return f"an analysis was interrupted while rebuilding {path} ({new.name} / {old.name})"
    if (path / JOURNAL).exists():
        return f"an analysis was interrupted while growing {path}"
    return None


def recover(path: Path, access: StoreAccess) -> None:
    """Finish or undo whatever structural change an interrupted writer left behind."""
    _recover_swap(path, access)
    if (path / JOURNAL).is_file():
        access.need("finish growing the store that an interrupted analysis began")
        replay_journal(path)


def _recover_swap(path: Path, access: StoreAccess) -> None:
    new, old = rebuild_paths(path)
    swapped = (path / BUILT_MARK).is_file()  # the rebuilt store is in place already
    if new.exists():
        if not (swapped or (new / BUILT_MARK).is_file() or (new / BUILDING_MARK).is_file()):
            raise StoreError(f"{new}: exists but was not written by dynlab; move it away "
                             f"(dynlab rebuilds {path.name} there)")
        access.need("finish the store rebuild that an interrupted analysis began")
        if not swapped and (new / BUILT_MARK).is_file():
            _swap_in(path, new, old)
            return
        shutil.rmtree(new)  # an unfinished copy, or the old store after an exchange
    if old.exists():
        access.need("finish the store rebuild that an interrupted analysis began")
        if path.exists():
            shutil.rmtree(old)
        else:  # cannot happen with _swap_in's order; restore rather than lose it
            os.rename(old, path)
    if (path / BUILT_MARK).is_file():
        access.need("finish the store rebuild that an interrupted analysis began")
        (path / BUILT_MARK).unlink()


def exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(path: Path, new: Path, old: Path) -> None:
    """Replace `path` by the complete copy `new` (marked built). With an atomic exchange the
    path is a complete store at every moment; otherwise two renames (path -> old, new ->
    path). A kill at any point is finished by `_recover_swap`."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if path.exists():
        if exchange(new, path):
            fault_point("store.swap")
            shutil.rmtree(new)  # now the old store
            (path / BUILT_MARK).unlink()
            return
        os.rename(path, old)
    fault_point("store.swap")
    os.rename(new, path)
    (path / BUILT_MARK).unlink()
    if old.exists():
        shutil.rmtree(old)


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, sort_keys=True),
                          path.name + f".{os.getpid()}.partial")


def _spec_json(spec: ArraySpec) -> dict:
    fill = spec.fill
    if isinstance(fill, float) and math.isnan(fill):
        fill = "NaN"
    return {"dims": list(spec.dims), "dtype": spec.dtype, "fill": fill, "attrs": dict(spec.attrs)}


def _spec_from_json(data: Mapping) -> ArraySpec:
    fill = math.nan if data["fill"] == "NaN" else data["fill"]
    return ArraySpec(tuple(data["dims"]), data["dtype"], fill, data["attrs"])


def replay_journal(path: Path) -> None:
    """Apply the growth recorded in the store's journal (idempotent): create the arrays it
    lists, resize every array to the target coordinates, write the coordinates, the
    attributes and, last, the consolidated metadata; then remove the journal."""
    journal = json.loads((path / JOURNAL).read_text())
    coords: dict[str, list] = journal["coords"]
    group = _open_group(path)
    sizes = {dim: len(values) for dim, values in coords.items()}
    with quiet_zarr():
        existing = dict(group.arrays())
        for dim, values in coords.items():
            if dim not in existing:
                _create_coordinate(group, dim, _coordinate_array(dim, values), growing=True)
        for name, data in journal["create"].items():
            if name not in existing:
                spec = _spec_from_json(data)
                full = {d: sizes.get(d, journal["sizes"].get(d)) for d in spec.dims}
                _create_array(group, name, spec, full)
        for _, arr in sorted(group.arrays()):
            dims = tuple(arr.metadata.dimension_names or ())
            shape = tuple(sizes.get(d, s) for d, s in zip(dims, arr.shape, strict=True))
            if shape != tuple(arr.shape):
                arr.resize(shape)
                fault_point("store.grow")  # acts on its first (or N-th) resize
        for dim, values in coords.items():
            group[dim][...] = _coordinate_array(dim, values)
        group.attrs.update(journal["attrs"])
    _consolidate(path)
    (path / JOURNAL).unlink()


# ----------------------------------------------------------------------------------------
# Creating and growing


def build_store(dest: Path, layout: Layout, source: Path | None = None,
                source_state: StoreState | None = None) -> None:
    """Write the complete store of `layout` at `dest` (which must not exist), marked built.
    With `source`, every array and attribute of the source store is carried over (arrays to
    their new indices: data chunk files hard-linked; arrays with a reordered label dim
    re-encoded).

    The template's arrays are written here (`array_document`, `write_coordinate`: the files
    zarr-python writes for them), with the consolidated metadata last; an array of a dtype
    not written here, and the carry-over, go through zarr."""
    dest.mkdir(parents=True)
    (dest / BUILDING_MARK).write_text("dynlab is writing this store; it is removed when done\n")
    coords = growing_coordinates(layout)
    sizes = {**layout.dims(), **{d: len(v) for d, v in coords.items()}}
    attrs = {**(source_state.attrs if source_state is not None else {}), **_attrs(layout)}
    columns = [(dim, values, False) for dim, values in fixed_coordinates(layout).items()] + \
        [(dim, _coordinate_array(dim, values), True) for dim, values in coords.items()]
    documents: dict[str, dict] = {}
    group = None  # zarr's, for what is not written here

    def zarr_group():
        nonlocal group
        if group is None:
            import zarr

            with quiet_zarr():
                group = zarr.open_group(str(dest), mode="a", zarr_format=3, attributes=attrs)
        return group

    for dim, values, growing in columns:
        args = _coordinate_args(dim, values, growing)
        doc = array_document(args["shape"], args["chunks"], np.dtype(values.dtype),
                             args["fill_value"], (dim,), {})
        if doc is None:
            _create_coordinate(zarr_group(), dim, values, growing)
            continue
        _write_array(dest / dim, doc)
        write_coordinate(dest / dim, values, args["chunks"][0], args["fill_value"])
        documents[dim] = doc
    for n, (name, spec) in enumerate(template(layout.metrics, layout.labels).items()):
        args = _array_args(spec, sizes)
        doc = array_document(args["shape"], args["chunks"], np.dtype(spec.dtype), spec.fill,
                             spec.dims, spec.attrs)
        if doc is None:
            _create_array(zarr_group(), name, spec, sizes)
        else:
            _write_array(dest / name, doc)
            documents[name] = doc
        if n == 1:
            fault_point("store.create")
    if source is not None and source_state is not None:
        with quiet_zarr():
            _carry_over(source, source_state, dest, zarr_group(), coords, sizes)
    if group is None:  # every array written here: their metadata is known, none is read
        write_zarr_json(dest / "zarr.json", group_document(attrs, documents))
    else:
        _consolidate(dest)
    (dest / BUILT_MARK).write_text("complete; swapped in by dynlab\n")
    (dest / BUILDING_MARK).unlink()


def _default_codecs(dtype: np.dtype) -> list[dict]:
    """The codecs zarr-python 3 gives an array of `dtype` by default (their zarr.json): its
    values' little-endian bytes (no configuration for one-byte types), then zstd at level 0
    without checksum."""
    first = {"name": "bytes"} if dtype.itemsize == 1 and dtype.kind != "U" else \
        {"name": "bytes", "configuration": {"endian": "little"}}
    return [first, {"name": "zstd", "configuration": {"level": 0, "checksum": False}}]


def _data_type_json(dtype: np.dtype) -> str | dict | None:
    """A dtype as zarr-python 3.1 names it in zarr.json (None for a dtype not named here)."""
    if dtype.kind in "fiu" and dtype.byteorder in "=<|" and dtype.name in (
            "float32", "float64", "int8", "int16", "int32", "int64", "uint8"):
        return dtype.name
    if dtype.kind == "U" and dtype.byteorder in "=<|":
        return {"name": "fixed_length_utf32", "configuration": {"length_bytes": dtype.itemsize}}
    return None


def _fill_json(value, dtype: np.dtype):
    """A fill value as zarr.json holds it (NaN and the infinities as strings)."""
    if dtype.kind == "f":
        v = float(value)
        if math.isnan(v):
            return "NaN"
        return ("Infinity" if v > 0 else "-Infinity") if math.isinf(v) else v
    return str(value) if dtype.kind == "U" else int(value)


def array_document(shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype, fill,
                   dims: Sequence[str], attrs: Mapping) -> dict | None:
    """The zarr.json of an array as zarr-python 3 writes it for `create_array` with these
    arguments and its default codecs (regular chunks, "/"-separated chunk keys); None for a
    dtype whose name is not known here (zarr then creates the array)."""
    name = _data_type_json(dtype)
    if name is None:
        return None
    return {"shape": list(shape), "data_type": name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": _fill_json(fill, dtype), "codecs": _default_codecs(dtype),
            "attributes": dict(attrs), "dimension_names": list(dims), "zarr_format": 3,
            "node_type": "array", "storage_transformers": []}


def group_document(attrs: Mapping, arrays: Mapping[str, dict]) -> dict:
    """The root zarr.json of a group holding `arrays` (name -> its zarr.json), with their
    metadata consolidated into it as `zarr.consolidate_metadata` writes it."""
    return {"attributes": dict(attrs), "zarr_format": 3,
            "consolidated_metadata": {"kind": "inline", "must_understand": False,
                                      "metadata": {n: arrays[n] for n in sorted(arrays)}},
            "node_type": "group"}


def _write_array(folder: Path, document: dict) -> None:
    folder.mkdir()
    write_zarr_json(folder / "zarr.json", document)


def write_zarr_json(path: Path, document: dict) -> None:
    """A zarr.json written as zarr-python writes it (indented by 2, NaN allowed), replaced
    atomically."""
    write_text_atomically(path, json.dumps(document, indent=2, allow_nan=True),
                          path.name + f".{os.getpid()}.partial")


def write_coordinate(folder: Path, values: np.ndarray, chunk: int, fill) -> None:
    """The chunk files of a 1-D coordinate `values` in chunks of `chunk` (the last padded
    with `fill`, as zarr stores an edge chunk whole; a chunk of fill values only is not
    written), encoded with the default codecs (`_default_codecs`)."""
    codec = bytes_zstd_codec(_default_codecs(values.dtype), values.dtype)
    for i, start in enumerate(range(0, len(values), chunk)):
        part = np.full(chunk, fill, dtype=values.dtype)
        part[:min(chunk, len(values) - start)] = values[start:start + chunk]
        if (part == np.asarray(fill, dtype=values.dtype)).all():
            continue
        (folder / "c").mkdir(exist_ok=True)
        write_bytes_atomically(folder / "c" / str(i), codec.encode(part))


def _index_maps(old: Mapping[str, list], new: Mapping[str, list]) -> dict[str, np.ndarray]:
    maps = {}
    for dim, values in old.items():
        where = {v: k for k, v in enumerate(new[dim])}
        maps[dim] = np.asarray([where[v] for v in values], dtype=np.int64)
    return maps


def _carry_over(source: Path, state: StoreState, dest: Path, group, coords, sizes) -> None:
    """Move every data array of `source` into the new store `group` at `dest`."""
    maps = _index_maps(state.coords, coords)
    src_group = _open_group(source, "r")
    with quiet_zarr():
        for name, (dims, _) in sorted(state.arrays.items()):
            if dims == (name,) and (name in GROWING_DIMS or name in sizes):
                continue  # coordinates are written fresh
            src = src_group[name]
            if name not in group:  # an array this version would not create: keep it
                meta = json.loads((source / name / "zarr.json").read_text())
                meta["shape"] = [sizes.get(d, s) for d, s in zip(dims, src.shape, strict=True)]
                (dest / name).mkdir()
                _write_json_atomic(dest / name / "zarr.json", meta)
            dst = group[name] if name in group else _open_group(dest)[name]
            chunks = src.chunks
            moved = [d for d in dims if d in maps and
                     not np.array_equal(maps[d], np.arange(len(maps[d])))]
            if all(chunks[dims.index(d)] == 1 for d in moved):
                _link_chunks(source / name, dest / name, dims, maps)
            else:  # a label dim reordered inside chunks: re-encode (these arrays are small)
                data = np.asarray(src[...])
                out = np.full(dst.shape, dst.metadata.fill_value, dtype=data.dtype)
                index = tuple(maps[d] if d in maps else np.arange(n)
                              for d, n in zip(dims, data.shape, strict=True))
                out[np.ix_(*index)] = data
                dst[...] = out
            fault_point("store.rebuild")


def _link_chunks(src: Path, dst: Path, dims: Sequence[str], maps: Mapping[str, np.ndarray]):
    """Hard-link (or copy) every chunk file of array `src` to its new chunk index in `dst`
    (valid where every moved dim has chunks of length 1; default '/' chunk keys)."""
    root = src / "c"
    if not root.is_dir():
        return
    for f in root.rglob("*"):
        parts = f.relative_to(root).parts
        if not f.is_file() or len(parts) != len(dims) or not all(p.isdigit() for p in parts):
            continue  # directories, and temporary files of an interrupted write
        index = [int(p) for p in parts]
        for k, d in enumerate(dims):
            if d in maps:
                index[k] = int(maps[d][index[k]])
        target = dst.joinpath("c", *map(str, index))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def rebuild(path: Path, layout: Layout, state: StoreState | None) -> None:
    """Build the store of `layout` beside `path` (from the existing one, if any) and swap it
    in."""
    new, old = rebuild_paths(path)
    build_store(new, layout, path if state is not None else None, state)
    _swap_in(path, new, old)


def grow(path: Path, layout: Layout, state: StoreState, create: Mapping[str, ArraySpec],
         attrs: Mapping) -> None:
    """Append coordinates (each stored one a prefix of the layout's) and create arrays,
    through the journal."""
    journal = {
        "coords": growing_coordinates(layout),
        "sizes": {**layout.dims(), **state.sizes},
        "create": {name: _spec_json(spec) for name, spec in create.items()},
        "attrs": dict(attrs),
    }
    _write_json_atomic(path / JOURNAL, journal)
    replay_journal(path)


# ----------------------------------------------------------------------------------------
# Making a store ready for an analysis


def ensure_store(
    path: Path, layout: Layout, *, metrics_given: bool = True, kinds_given: bool = True,
    access: StoreAccess | None = None,
    validate: Callable[[Sequence[str]], None] | None = None,
) -> Layout:
    """Create the store, or bring an existing one to hold this analysis' runs, steps, labels
    and variables, after finishing any change an interrupted writer left. Returns the store's
    layout (its run, step and label order). Raises StoreError, before changing anything, when
    the store was made by another analysis; StoreReadOnly when a needed write is impossible.
    `validate(run_names)` runs before a store is created or runs are added to it, so that a
    refused analysis leaves nothing behind."""
    if access is None:
        with StoreAccess(path) as own:
            return ensure_store(path, layout, metrics_given=metrics_given,
                                kinds_given=kinds_given, access=own, validate=validate)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: exists and is not a directory (expected a Zarr store)")
    recover(path, access)
    state = None
    if path.exists() and any(path.iterdir()):
        state = _usable_state(path, access)
    if state is None:
        if validate is not None:
            validate(layout.runs)
        access.need("create the store")
        rebuild(path, layout, None)
        return layout
    return reconcile(path, layout, state, access, metrics_given=metrics_given,
                     kinds_given=kinds_given, validate=validate)


def _usable_state(path: Path, access: StoreAccess) -> StoreState | None:
    """The state of the existing store; None for a dynlab store whose creation was
    interrupted before any result (it is recreated). Repairs an array length that an older
    dynlab left different from its coordinate's."""
    attrs = read_attrs(path)
    schema = attrs.get("schema_version")
    if schema != SCHEMA_VERSION:
        # an older dynlab's store whose creation was interrupted holds nothing: recreate it
        if isinstance(schema, int) and 0 < schema < SCHEMA_VERSION and not has_results(path):
            return None
        raise StoreError(
            f"{path}: not a dynlab store of schema {SCHEMA_VERSION} (found "
            f"{schema!r}); use another -o path"
        )
    try:
        state = read_state(path)
        missing = [n for n in ("run", "step", "kind", "analyzed") if n not in state.arrays]
    except Exception as e:  # a half-written array
        state, missing = None, [f"readable arrays ({e})"]
    if missing:
        if has_results(path):
            raise StoreError(f"{path}: damaged store (missing {', '.join(missing)}); use "
                             "another -o path")
        return None  # creation was interrupted: nothing to lose, recreate
    assert state is not None
    if state.mismatches():  # an older dynlab was killed while growing: undo the growth
        access.need("repair array lengths left by an interrupted analysis")
        group = _open_group(path)
        with quiet_zarr():
            for name, (dims, shape) in state.arrays.items():
                want = tuple(state.sizes.get(d, n) for d, n in zip(dims, shape, strict=True))
                if want != shape:
                    group[name].resize(want)
        _consolidate(path)
        state = read_state(path)
    return state


def reconcile(
    path: Path, layout: Layout, state: StoreState, access: StoreAccess, *,
    metrics_given: bool = True, kinds_given: bool = True,
    validate: Callable[[Sequence[str]], None] | None = None,
) -> Layout:
    """Check that the store was made with the same schema, metrics and kinds (adopting the
    store's when not given explicitly) and large enough dimensions, then add the runs, steps,
    labels and variables it lacks. Returns the store's layout."""
    attrs = state.attrs
    stored_metrics, stored_kinds = list(attrs["metrics"]), list(attrs["kinds"])
    problems = []
    if metrics_given and stored_metrics != list(layout.metrics):
        problems.append(f"metrics {stored_metrics} (this analysis: {list(layout.metrics)})")
    if kinds_given and stored_kinds != list(layout.kinds):
        problems.append(f"kinds {stored_kinds} (this analysis: {list(layout.kinds)})")
    if attrs.get("convention", "dynlab") != layout.convention:
        problems.append(f"convention {attrs.get('convention', 'dynlab')!r} (this analysis: "
                        f"{layout.convention!r})")
    if not set(layout.kinds) <= set(stored_kinds):
        problems.append(f"kinds {stored_kinds} (these runs need {list(layout.kinds)})")
    sizes = {}
    for dim, size in layout.dims().items():
        if dim in ("run", "step", "kind"):
            continue
        sizes[dim] = state.sizes.get(dim, 0)
        if sizes[dim] < size or (dim == "matrix" and sizes[dim] != size):
            problems.append(f"dimension {dim} of size {sizes[dim]} (these runs need {size})")
    if problems:
        raise StoreError(
            f"{path}: this store was made by another analysis: " + "; ".join(problems)
            + ". Use another -o path, or delete the store to start over."
        )
    configs = json.loads(attrs.get("run_configs", "{}"))
    for run in layout.runs:
        old, new = configs.get(run), layout.run_configs.get(run)
        if old is not None and new is not None and old.get("model") != new.get("model"):
            raise StoreError(
                f"{path}: run {run!r} is in the store with another model config; "
                "use another -o path"
            )
    configs.update(layout.run_configs)
    runs = state.coords["run"] + [r for r in layout.runs if r not in set(state.coords["run"])]
    labels = {dim: sorted(set(state.coords.get(dim, [])) | set(layout.labels.get(dim, [])))
              for dim in LABEL_DIMS}
    stored = Layout(runs, sorted(set(state.coords["step"]) | set(layout.steps)), stored_kinds,
                    stored_metrics, sizes["layer"], sizes["head"], sizes["sv"],
                    sizes["head_sv"], sizes["emb_sv"], configs,
                    {d: v for d, v in labels.items() if v},
                    attrs.get("convention", "dynlab"))
    target = growing_coordinates(stored)
    create = {n: s for n, s in template(stored_metrics, stored.labels).items()
              if n not in state.arrays}
    new_attrs = {"run_configs": json.dumps(configs, sort_keys=True)}
    changed_attrs = any(attrs.get(k) != v for k, v in new_attrs.items())
    if target == state.coords and not create and not changed_attrs:
        return stored  # nothing to change: nothing is written
    new_runs = [r for r in runs if r not in set(state.coords["run"])]
    if new_runs and validate is not None:
        validate(new_runs)
    access.need("add " + _describe(state.coords, target, create) + " to the store")
    prefix = all(target[d][:len(state.coords.get(d, []))] == state.coords.get(d, [])
                 for d in target)
    if prefix:
        grow(path, stored, state, create, {**new_attrs, "dynlab_version": __version__})
    else:
        rebuild(path, stored, state)
    return stored


def _describe(old: Mapping[str, list], new: Mapping[str, list], create: Mapping) -> str:
    parts = []
    for dim, values in new.items():
        extra = [v for v in values if v not in set(old.get(dim, []))]
        if extra:
            parts.append(f"{len(extra)} {dim}{'s' if len(extra) > 1 else ''}")
    if create:
        parts.append(f"variables {', '.join(create)}")
    return ", ".join(parts) or "run configs"


# ----------------------------------------------------------------------------------------
# Region writes


def create_variable(group, name: str, dims: Sequence[str], data: np.ndarray | None = None, *,
                    shape: tuple[int, ...] | None = None, chunks: tuple[int, ...] | None = None,
                    dtype: str = "float64", fill_value=np.nan, attrs: Mapping | None = None):
    """An array `name` over `dims` in an open group (`dimension_names` make it an xarray
    variable), for variables outside the template (the activation tables)."""
    if data is not None:
        shape, dtype = data.shape, data.dtype
        fill_value = "" if data.dtype.kind == "U" else (np.nan if data.dtype.kind == "f" else 0)
    arr = group.create_array(name, shape=shape, chunks=chunks or shape, dtype=dtype,
                             fill_value=fill_value, dimension_names=tuple(dims),
                             attributes=dict(attrs or {}))
    if data is not None and data.size:
        arr[...] = data
    return arr


def string_coordinate(values: Sequence[str], what: str) -> np.ndarray:
    """Fixed-width strings for a coordinate (a name longer than NAME_WIDTH is an error)."""
    return _names(values, what)


def grow_dimension(path: Path, dim: str, new_values: np.ndarray) -> None:
    """Append values to coordinate `dim` (a dimension outside the template, such as the
    activation tables' `target`), growing every array along it (new cells empty)."""
    group = _open_group(path)
    with quiet_zarr():
        for name, arr in list(group.arrays()):
            dims = arr.metadata.dimension_names or ()
            if dim in dims and name != dim:
                shape = list(arr.shape)
                shape[dims.index(dim)] += len(new_values)
                arr.resize(tuple(shape))
        coord = group[dim]
        old = coord.shape[0]
        coord.resize((old + len(new_values),))
        coord[old:] = new_values
    _consolidate(path)


def open_group_for_update(path: Path):
    """The store's root Zarr group, writable."""
    return _open_group(path)


def consolidate(path: Path) -> None:
    """Rewrite the consolidated metadata after variables or attributes changed."""
    _consolidate(path)


#: cells of a store by dimension name: an index, a slice or an array of indices per dim
Region = Mapping[str, "int | slice | np.ndarray"]


@dataclass(frozen=True)
class ArrayInfo:
    """What a RegionWriter needs of an array: its dims, shape, chunk shape, dtype, fill value,
    its chunks' codec (`bytes_zstd_codec`, None: only zarr can encode them) and the folder of
    its chunk files (None where the chunk keys are not zarr's default "c/i/j")."""

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill: object
    codec: ChunkCodec | None
    chunk_root: str | None


def _dtype_from_json(data_type) -> np.dtype | None:
    """The numpy dtype of a zarr.json `data_type` this module names (`_data_type_json`)."""
    if isinstance(data_type, str):
        try:
            dtype = np.dtype(data_type)
        except TypeError:
            return None
        return dtype if _data_type_json(dtype) == data_type else None
    if isinstance(data_type, Mapping) and data_type.get("name") == "fixed_length_utf32":
        length = (data_type.get("configuration") or {}).get("length_bytes")
        return np.dtype(f"<U{length // 4}") if isinstance(length, int) and length % 4 == 0 \
            else None
    return None


def _fill_from_json(value, dtype: np.dtype):
    """A zarr.json fill value (`_fill_json`) as a value of `dtype`; None where it is written
    otherwise (zarr reads it then)."""
    if dtype.kind == "f":
        named = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
        if isinstance(value, str):
            return dtype.type(named[value]) if value in named else None
        return dtype.type(value) if isinstance(value, (int, float)) else None
    if dtype.kind == "U":
        return value if isinstance(value, str) else None
    return dtype.type(value) if isinstance(value, int) and not isinstance(value, bool) else None


def read_array_info(folder: Path) -> ArrayInfo | None:
    """The ArrayInfo of the array in `folder` from its zarr.json alone (without zarr); None
    where the file is missing or holds what is not read here (another chunk grid, dtype or
    fill value encoding: zarr reads the array then)."""
    try:
        doc = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        if doc.get("node_type") != "array" or doc.get("zarr_format") != 3:
            return None
        grid, keys = doc["chunk_grid"], doc["chunk_key_encoding"]
        dtype = _dtype_from_json(doc["data_type"])
        if grid.get("name") != "regular" or dtype is None:
            return None
        fill = _fill_from_json(doc["fill_value"], dtype)
        shape = tuple(int(n) for n in doc["shape"])
        chunks = tuple(int(n) for n in grid["configuration"]["chunk_shape"])
        dims = tuple(doc.get("dimension_names") or ())
        if fill is None or len(chunks) != len(shape) or (dims and len(dims) != len(shape)):
            return None
        default = keys.get("name") == "default" and \
            (keys.get("configuration") or {}).get("separator") == "/"
        codec = bytes_zstd_codec(doc.get("codecs") or [], dtype,
                                 doc.get("storage_transformers") or ())
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return ArrayInfo(dims, shape, chunks, dtype, fill, codec,
                     os.path.join(folder, "c") if default else None)


class RegionWriter:
    """Region writes into an existing store, by dimension name (xarray's
    `to_zarr(region=...)` pattern for parallel writers): `write({"run": i, "step": j},
    {name: array})` writes each array into the cells of its variable where run = i and
    step = j, the array holding the variable's other dims in order. The store's template
    (every array and its metadata) exists already; only data chunks are written.

    Each array's metadata is read from its zarr.json (`read_array_info`); zarr is imported
    and its arrays opened only for what is not done here (partial chunks, other codecs)."""

    def __init__(self, path: Path):
        self.path = path
        self._group = None
        self._arrays: dict = {}
        self._infos: dict[str, ArrayInfo | None] = {}
        self._folders: set[str] = set()  # chunk folders known to exist

    @property
    def group(self):
        """The store's zarr group (opened when first asked for)."""
        if self._group is None:
            self._group = _open_group(self.path)
        return self._group

    def array(self, name: str):
        """Variable `name` as a zarr array."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def arrays(self, names: Sequence[str]) -> dict:
        """The arrays of `names` that the store has (name -> zarr array), those not yet open
        opened together: one round of reads on zarr's event loop, not one per array."""
        import asyncio

        import zarr
        import zarr.api.asynchronous as zarr_async
        from zarr.core.sync import sync

        wanted = [n for n in dict.fromkeys(names) if n not in self._arrays]

        async def open_all() -> list:
            group = await zarr_async.open_group(str(self.path), mode="r+",
                                                use_consolidated=False)

            async def get(name: str):
                try:
                    node = await group.getitem(name)
                except KeyError:
                    return None
                return node if isinstance(node, zarr.AsyncArray) else None

            return await asyncio.gather(*(get(n) for n in wanted))

        if wanted:
            with quiet_zarr():
                for name, node in zip(wanted, sync(open_all()), strict=True):
                    if node is not None:
                        self._arrays[name] = zarr.Array(node)
        return {n: self._arrays[n] for n in names if n in self._arrays}

    def info(self, name: str) -> ArrayInfo:
        """The ArrayInfo of variable `name` (from its zarr.json, else from zarr's array);
        KeyError for a name the store lacks."""
        if name not in self._infos:
            self._infos[name] = read_array_info(self.path / name)
        found = self._infos[name]
        if found is not None:
            return found
        array = self.array(name)
        meta = array.metadata
        keys = getattr(meta, "chunk_key_encoding", None)
        default = getattr(keys, "name", None) == "default" and \
            getattr(keys, "separator", None) == "/"
        dtype = np.dtype(array.dtype)
        codec = bytes_zstd_codec([c.to_dict() for c in getattr(meta, "codecs", ())], dtype,
                                 getattr(meta, "storage_transformers", ()))
        found = ArrayInfo(tuple(meta.dimension_names or ()), tuple(array.shape),
                          tuple(array.chunks), dtype, meta.fill_value, codec,
                          os.path.join(self.path, name, "c") if default else None)
        self._infos[name] = found
        return found

    def has(self, name: str) -> bool:
        """Whether the store has variable `name` (an array)."""
        if name in self._arrays or self._infos.get(name) is not None:
            return True
        if not (self.path / name / "zarr.json").is_file():
            return False
        self._infos[name] = read_array_info(self.path / name)
        if self._infos[name] is not None:
            return True
        import zarr

        with quiet_zarr():
            return name in self.group and isinstance(self.group[name], zarr.Array)

    def selection(self, name: str, region: Region) -> tuple:
        """The index of `region` in variable `name` (its other dims whole)."""
        dims = self.info(name).dims
        unknown = set(region) - set(dims)
        if unknown:
            raise ValueError(f"{self.path}: {name} has no dim {', '.join(sorted(unknown))}")
        return tuple(region.get(d, slice(None)) for d in dims)

    def write(self, region: Region, values: Mapping[str, np.ndarray]) -> None:
        """values: variable -> array of the variable's shape without the region's integer
        dims (a dim given as an index array keeps its place: orthogonal indexing).

        A region that is one whole chunk, or whose cells are each one (`cells`), is written
        here chunk by chunk (`put_chunk`); the rest of the variables' region writes (each a
        whole-chunk or read-modify-write of its own arrays' chunks) are issued together, in
        one batch on zarr's event loop, and the call returns when every one is on disk: one
        round of I/O per call rather than one per variable. What a call writes is thus
        complete, or (killed midway) partial in any order; callers that need an order (the
        `analyzed` flag after the values) make separate calls."""
        basic, orthogonal = [], []
        try:
            for name, arr in values.items():
                sel = self.selection(name, region)
                if self.leaves_as_is(name, sel, arr) or self.put_chunk(name, sel, arr):
                    continue
                a = np.asarray(arr)
                cells = self.cells(name, sel)
                if cells is not None and a.shape == self.value_shape(name, sel):
                    for cell, at in cells:  # each cell one whole chunk
                        part = a[at]
                        if not (self.leaves_as_is(name, cell, part)
                                or self.put_chunk(name, cell, part)):
                            basic.append(self.array(name).async_array.setitem(cell, part))
                    continue
                array = self.array(name)
                if (any(isinstance(k, np.ndarray) for k in sel)
                        or not hasattr(array, "async_array")):
                    orthogonal.append((array, sel, arr))
                else:
                    basic.append(array.async_array.setitem(sel, arr))
        except BaseException:
            for write in basic:  # never started: nothing was written
                write.close()
            raise
        if basic:
            _write_together(basic)
        for array, sel, arr in orthogonal:
            if any(isinstance(k, np.ndarray) for k in sel):
                array.set_orthogonal_selection(sel, arr)
            else:
                array[sel] = arr

    def value_shape(self, name: str, sel: tuple) -> tuple[int, ...]:
        """The shape of variable `name`'s values at `sel` (orthogonal indexing: an index drops
        its dim, an index array keeps it with its length; only indices, index arrays and
        whole dims)."""
        shape = self.info(name).shape
        return tuple(len(k) if isinstance(k, np.ndarray) else shape[d]
                     for d, k in enumerate(sel) if not isinstance(k, (int, np.integer)))

    def cells(self, name: str, sel: tuple) -> list[tuple[tuple, tuple]] | None:
        """`sel` split into cells that are each one whole chunk of variable `name`: (the
        cell's selection, its place in the values of `sel`) each, where `sel` holds only
        indices, index arrays (each index once) and whole dims, the dims indexed by several
        values have chunks of length 1 and the other whole dims one chunk. None for any other
        selection, or one that is a single chunk itself."""
        array = self.info(name)
        split = []
        for d, k in enumerate(sel):
            if isinstance(k, (int, np.integer)):
                continue
            if isinstance(k, np.ndarray):
                if (array.chunks[d] != 1 or k.ndim != 1 or k.dtype.kind not in "iu"
                        or len(np.unique(k)) != len(k)):
                    return None
                split.append((d, k))
            elif not (isinstance(k, slice) and k == slice(None)):
                return None
            elif array.chunks[d] == 1 and array.shape[d] > 1:
                split.append((d, np.arange(array.shape[d])))
            elif array.chunks[d] < array.shape[d]:
                return None
        if not split:
            return None
        axes = [d for d, k in enumerate(sel) if not isinstance(k, (int, np.integer))]
        out = []
        for positions in np.ndindex(*(len(k) for _, k in split)):
            at = dict(zip((d for d, _ in split), positions, strict=True))
            values = dict(zip((d for d, _ in split), (int(k[p]) for (_, k), p
                                                       in zip(split, positions, strict=True)),
                              strict=True))
            cell = tuple(values.get(d, k) for d, k in enumerate(sel))
            out.append((cell, tuple(at.get(d, slice(None)) for d in axes)))
        return out

    def chunk_file(self, name: str, sel: tuple) -> Path | None:
        """The file of the one whole chunk of variable `name` that `sel` covers, or None where
        `sel` is not one whole chunk or the chunk's file name is not known (only the default
        "c/i/j" chunk keys)."""
        key = self.chunk_path(name, sel)
        return None if key is None else Path(key)

    def chunk_path(self, name: str, sel: tuple) -> str | None:
        """`chunk_file` as a string (built without Path objects: it is asked for every
        variable of every checkpoint)."""
        info = self.info(name)
        root, chunks, shape = info.chunk_root, info.chunks, info.shape
        if root is None or not sel:
            return None
        index = []
        for k, chunk, size in zip(sel, chunks, shape, strict=True):
            if isinstance(k, (int, np.integer)) and chunk == 1:
                index.append(str(int(k)))
            elif isinstance(k, slice) and k == slice(None) and chunk >= size:
                index.append("0")
            else:
                return None
        return root + "/" + "/".join(index)

    def chunk_shape(self, name: str, sel: tuple) -> tuple[int, ...]:
        """The shape of the values of the whole chunk `sel` (the chunk without its cell
        dims)."""
        return tuple(c for k, c in zip(sel, self.info(name).chunks, strict=True)
                     if not isinstance(k, (int, np.integer)))

    def is_fill(self, name: str, a: np.ndarray) -> bool:
        """Whether every value of `a` is variable `name`'s fill value (NaN counting as NaN)."""
        fill = self.info(name).fill
        if a.dtype.kind == "f" and np.isnan(fill):
            return bool(np.isnan(a).all())
        return bool((a == fill).all())

    def leaves_as_is(self, name: str, sel: tuple, arr) -> bool:
        """Whether writing `arr` at `sel` would leave variable `name` as it is, so the write
        can be skipped: `sel` is one whole chunk, that chunk holds nothing yet (it reads as
        the fill value) and `arr` is all fill (e.g. the NaN cells of the tables a selection
        leaves out)."""
        file = self.chunk_path(name, sel)
        a = np.asarray(arr)
        if file is None or a.dtype.kind not in "fiub":
            return False
        return self.is_fill(name, a) and not os.path.exists(file)

    def put_chunk(self, name: str, sel: tuple, arr) -> bool:
        """Write `arr` as the one whole chunk `sel` of variable `name` here, without zarr's
        event loop: encoded as zarr encodes it (the `bytes` codec, then `zstd`, the codecs
        every array of the template has: `chunk_codec`) and written as zarr's LocalStore
        writes a chunk (a temporary file renamed over the chunk's file). False, and nothing
        written, where `sel` is not one whole chunk, the array has other codecs or `arr` is
        all fill (zarr then deletes the chunk's file rather than writing it)."""
        file = self.chunk_path(name, sel)
        codec = self.chunk_codec(name) if file is not None else None
        a = np.asarray(arr)
        if (codec is None or a.shape != self.chunk_shape(name, sel) or a.dtype.kind not in "fiub"
                or self.is_fill(name, a)):
            return False
        payload = codec.encode(np.ascontiguousarray(a, dtype=self.info(name).dtype).reshape(-1))
        folder = os.path.dirname(file)
        if folder not in self._folders:  # made once per writer (zarr makes them as it writes)
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        try:
            write_bytes_atomically(file, payload)
        except FileNotFoundError:  # the folder went (the store was rebuilt since): again
            os.makedirs(folder, exist_ok=True)
            write_bytes_atomically(file, payload)
        return True

    def get_chunk(self, name: str, sel: tuple) -> np.ndarray | None:
        """The values of the one whole chunk `sel` of variable `name`, read here without
        zarr's event loop: the fill value where the chunk has no file (as zarr reads it),
        else the file decoded (`chunk_codec`). None where `sel` is not one whole chunk or
        the array has other codecs."""
        file = self.chunk_path(name, sel)
        codec = self.chunk_codec(name) if file is not None else None
        if codec is None:
            return None
        info = self.info(name)
        try:
            with open(file, "rb") as f:
                payload = f.read()
        except FileNotFoundError:
            return np.full(self.value_shape(name, sel), info.fill, dtype=info.dtype)
        values = codec.decode(payload).reshape(self.chunk_shape(name, sel))
        # a chunk past the array's end (a label dim shorter than its chunk) holds fill there
        return values[tuple(slice(0, n) for n in self.value_shape(name, sel))]

    def chunk_codec(self, name: str) -> ChunkCodec | None:
        """The encoding of a chunk of variable `name` (its values in C order <-> the chunk
        file's bytes) where its codecs are exactly `bytes` (little-endian or, for one-byte
        types, none) then `zstd`, as zarr-python writes them; None for any other codecs."""
        return self.info(name).codec

    def read(self, name: str, region: Region | None = None) -> np.ndarray:
        """The values of variable `name` in `region` (all of it by default)."""
        sel = self.selection(name, region or {})
        direct = self.read_chunks(name, sel)
        if direct is not None:
            return direct
        if any(isinstance(k, np.ndarray) for k in sel):
            return np.asarray(self.array(name).get_orthogonal_selection(sel))
        return np.asarray(self.array(name)[sel])

    def read_chunks(self, name: str, sel: tuple) -> np.ndarray | None:
        """The values of `sel` read here chunk by chunk (`get_chunk`) where `sel` is one whole
        chunk or its cells are (`cells`); None otherwise (zarr reads it)."""
        whole = self.get_chunk(name, sel)
        if whole is not None or self.chunk_codec(name) is None:
            return whole
        cells = self.cells(name, sel)
        if cells is None:
            return None
        out = np.empty(self.value_shape(name, sel), dtype=self.info(name).dtype)
        for cell, at in cells:
            values = self.get_chunk(name, cell)
            if values is None:
                return None
            out[at] = values
        return out

    def read_many(self, names: Sequence[str], region: Region | None = None
                  ) -> dict[str, np.ndarray]:
        """`read(name, region)` of every variable of `names`; those zarr reads are read
        together (one round of reads on zarr's event loop). A name the store lacks raises
        KeyError."""
        missing = [n for n in names if not self.has(n)]
        if missing:
            raise KeyError(f"{self.path}: no variable {', '.join(missing)}")
        out = {}
        for name in names:
            direct = self.read_chunks(name, self.selection(name, region or {}))
            if direct is not None:
                out[name] = direct
        rest = [n for n in names if n not in out]
        if not rest:
            return out
        import asyncio

        from zarr.core.sync import sync

        arrays = self.arrays(rest)

        async def read(name: str):
            sel = self.selection(name, region or {})
            array = arrays[name].async_array
            if any(isinstance(k, np.ndarray) for k in sel):
                return await array.get_orthogonal_selection(sel)
            return await array.getitem(sel)

        async def read_all() -> list:
            return await asyncio.gather(*(read(n) for n in rest))

        if rest:
            with quiet_zarr():
                out.update((n, np.asarray(v)) for n, v in zip(rest, sync(read_all()),
                                                               strict=True))
        return {n: out[n] for n in names}

    def analyzed(self) -> np.ndarray:
        return self.read("analyzed")

    def prev_steps(self) -> np.ndarray:
        return self.read("prev_step")


@dataclass(frozen=True)
class ChunkCodec:
    """A chunk's values (C order, flat) <-> its file's bytes."""

    encode: Callable[[np.ndarray], bytes]
    decode: Callable[[bytes], np.ndarray]


def bytes_zstd_codec(codecs: Sequence[Mapping], dtype: np.dtype,
                     storage_transformers: Sequence = ()) -> ChunkCodec | None:
    """The codec of a chunk of an array of `dtype` whose zarr codecs (their JSON, `codecs`)
    are `bytes` (little-endian) then `zstd`: the values' little-endian bytes compressed by
    numcodecs' Zstd with the array's level and checksum setting (what zarr's ZstdCodec calls),
    and back. None for any other codec chain, sharding or storage transformers."""
    if len(codecs) != 2 or storage_transformers or dtype.kind not in "fiubU":
        return None
    (b, z) = codecs
    endian = (b.get("configuration") or {}).get("endian")
    if (b.get("name") != "bytes" or z.get("name") != "zstd"
            or not (endian == "little" or (endian is None and dtype.itemsize == 1))):
        return None
    from numcodecs.zstd import Zstd

    config = z.get("configuration") or {}
    zstd = Zstd(level=config.get("level", 0), checksum=config.get("checksum", False))
    little = dtype.newbyteorder("<")

    def encode(values: np.ndarray) -> bytes:
        return bytes(zstd.encode(values.astype(little, copy=False).view(np.uint8)))

    def decode(payload: bytes) -> np.ndarray:
        return np.frombuffer(zstd.decode(payload), dtype=little).astype(dtype)

    return ChunkCodec(encode, decode)


def _write_together(writes: list) -> None:
    """Await zarr's asynchronous region writes `writes` at once on zarr's own event loop
    (`zarr.core.sync.sync`, as every synchronous zarr call does)."""
    import asyncio

    from zarr.core.sync import sync

    async def gather() -> None:
        await asyncio.gather(*writes)

    sync(gather())


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def meta_values(meta: Mapping) -> tuple[dict[str, float], dict[str, Mapping]]:
    """(scalar variable -> value, label dim -> {label: value}) of one checkpoint's meta.json
    (with eval.json merged)."""
    scalars = {name: _number(meta.get(name))
               for name in ("train_loss", "lr", "tokens", "wall_seconds", "gpu_hours",
                            "relora_cycle")}
    ev = meta.get("eval") or {}
    ppl = ev.get("perplexity") or {} if isinstance(ev, Mapping) else {}
    blimp = ev.get("blimp") or {} if isinstance(ev, Mapping) else {}
    ppl = ppl if isinstance(ppl, Mapping) else {}
    blimp = blimp if isinstance(blimp, Mapping) else {}
    scalars["ppl_macro"] = _number(ppl.get("macro"))
    scalars["blimp_overall"] = _number(blimp.get("overall"))
    for name, key in (("eval_loss", "loss"), ("eval_loss_macro", "loss_macro"),
                      ("bpb_pooled", "bpb"), ("bpb_macro", "bpb_macro")):
        scalars[name] = _number(ppl.get(key))
    tables = {}
    for dim, table in (("domain", ppl.get("by_domain")), ("uid", blimp.get("by_uid")),
                       ("field", blimp.get("by_field"))):
        if isinstance(table, Mapping):
            tables[dim] = table
    for var, key in (("eval_loss_domain", "loss_by_domain"), ("bpb", "bpb_by_domain"),
                     ("eval_tokens", "tokens_by_domain"), ("eval_bytes", "bytes_by_domain")):
        if isinstance(ppl.get(key), Mapping):
            tables[var] = ppl[key]
    return scalars, tables


def eval_parts(meta: Mapping) -> set[str]:
    """The evaluation parts ("perplexity", "blimp") a checkpoint's meta holds."""
    ev = meta.get("eval")
    return {p for p in ("perplexity", "blimp")
            if isinstance(ev, Mapping) and isinstance(ev.get(p), Mapping)}


def meta_labels(metas: Mapping[tuple[str, int], Mapping]) -> dict[str, list[str]]:
    """Sorted labels of every label dim that these checkpoints' evaluations use."""
    labels: dict[str, set[str]] = {dim: set() for dim in LABEL_DIMS}
    for meta in metas.values():
        for dim, table in meta_values(meta)[1].items():
            if dim in labels:  # the per-domain unit tables share the domain labels
                labels[dim].update(str(k) for k in table)
    return {dim: sorted(v) for dim, v in labels.items() if v}


def write_meta_regions(path: Path, layout: Layout, metas: Mapping[tuple[str, int], Mapping],
                       access: StoreAccess, writer: RegionWriter | None = None) -> int:
    """Write the training/evaluation variables of the checkpoints in `metas` as region writes
    (run i, the steps of its checkpoints); other runs' cells are never touched. A region is
    read first (every variable's together) and only the checkpoints whose values differ from
    the stored ones are written (an eval.json added since the last analysis updates its
    checkpoint; an unchanged store is not written at all). `writer`: a RegionWriter of the
    store to use (default a new one). Returns the number of cells written."""
    r_index = {r: i for i, r in enumerate(layout.runs)}
    s_index = {s: j for j, s in enumerate(layout.steps)}
    by_run: dict[int, list[tuple[int, Mapping]]] = {}
    for (run, step), meta in metas.items():
        by_run.setdefault(r_index[run], []).append((s_index[step], meta))
    writer = RegionWriter(path) if writer is None else writer
    present = [n for n in (*META_VARIABLES, *EVAL_VARIABLES) if writer.has(n)] if by_run else []
    written = 0
    with quiet_zarr():
        for i, cells in sorted(by_run.items()):
            cols = np.asarray([j for j, _ in cells], dtype=np.int64)
            values = [meta_values(meta) for _, meta in cells]
            parts = [eval_parts(meta) for _, meta in cells]
            stored = writer.read_many(list(present), {"run": i, "step": cols})

            def kept(name: str, parts: list[set[str]] = parts) -> np.ndarray | None:
                part = EVAL_PARTS.get(name)
                return None if part is None else np.asarray([part not in p for p in parts])

            for name in META_VARIABLES:
                if name not in present:
                    continue
                new = np.asarray([v[0][name] for v in values])
                written += _write_changed(writer, name, i, cols, stored[name], new, access,
                                          kept(name))
                fault_point("store.meta")  # acts after the first (or N-th) variable
            for var, (dim, _) in EVAL_VARIABLES.items():
                if var not in present:
                    continue
                col = {k: c for c, k in enumerate(layout.labels.get(dim, []))}
                new = np.full((len(cells), len(col)), np.nan)
                table_key = var if var not in ("ppl", "blimp", "blimp_field") else dim
                for row, (_, tables) in enumerate(values):
                    for k, v in (tables.get(table_key) or {}).items():
                        new[row, col[str(k)]] = _number(v)
                written += _write_changed(writer, var, i, cols, stored[var], new, access,
                                          kept(var))
    return written


def _write_changed(writer: RegionWriter, name: str, i: int, cols: np.ndarray, old: np.ndarray,
                   new: np.ndarray, access: StoreAccess, keep: np.ndarray | None = None) -> int:
    """Write the rows of `new` that differ from `old` (the stored ones); rows where `keep` is
    True keep their stored values."""
    if keep is not None and keep.any():
        new = np.where(keep.reshape((-1,) + (1,) * (new.ndim - 1)), old, new)
    differ = ~((old == new) | (np.isnan(old) & np.isnan(new)))
    if differ.ndim > 1:
        differ = differ.any(axis=tuple(range(1, differ.ndim)))
    if not differ.any():
        return 0
    access.need(f"write {name} of {int(differ.sum())} checkpoints")
    writer.write({"run": i, "step": cols[differ]}, {name: new[differ]})
    return int(differ.sum())


# ----------------------------------------------------------------------------------------
# Reading


def open_store(path: str | Path):
    """Open an analysis store as an xarray Dataset (lazy), sorted by step. Raises StoreError
    with a message saying what is wrong (and what to do) for a missing, interrupted or
    damaged store."""
    import xarray as xr

    path = Path(path)
    pending = pending_work(path)
    if not path.exists():
        hint = f"; {pending}: rerun `dynlab analyze` to finish it" if pending else ""
        raise StoreError(f"{path}: no such store{hint}")
    if not path.is_dir():
        raise StoreError(f"{path}: not a directory (expected a Zarr store written by "
                         "`dynlab analyze`)")
    try:
        with quiet_zarr(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no consolidated metadata
            ds = xr.open_zarr(path)
    except Exception as e:  # zarr/xarray raise many types for a damaged store
        hint = (f"{pending}: rerun the same `dynlab analyze` to finish it" if pending else
                "if an analysis was interrupted while creating it, rerun the same "
                "`dynlab analyze`")
        raise StoreError(f"{path}: not a readable analysis store ({type(e).__name__}: {e}); "
                         f"{hint}") from None
    if "step" not in ds.dims or "run" not in ds.dims:
        hint = ("its creation was interrupted: rerun the same `dynlab analyze` to create it"
                if "schema_version" in ds.attrs else "not written by `dynlab analyze`")
        raise StoreError(f"{path}: not an analysis store (no run and step dimensions); {hint}")
    if ds.sizes["step"] > 1 and not bool((np.diff(ds["step"].values) > 0).all()):
        ds = ds.sortby("step")  # stores of older dynlab versions
    return ds
