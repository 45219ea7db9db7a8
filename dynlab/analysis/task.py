"""One checkpoint of an analysis: load -> components -> batched spectra -> metrics -> its
region of the store. Both executors (`analysis.serial`, `analysis.dask`) run these functions;
this is the one copy of the per-checkpoint code.

Per checkpoint, every matrix of every kind is grouped by shape and each group goes through one
batched singular-value call (`dynlab.analysis.spectra`); metrics are then computed at once on
the padded spectra.
"""

from __future__ import annotations

import bisect
import ctypes
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from dynlab.analysis import components as C
from dynlab.analysis import metrics as metrics_mod
from dynlab.analysis import spectra
from dynlab.analysis.conventions import apply as apply_convention
from dynlab.analysis.conventions import replaces as replaces_component
from dynlab.analysis.plan import Options, Task
from dynlab.analysis.recompute import spectrum_metric
from dynlab.analysis.selection import Cells, tensor_keep
from dynlab.analysis.store import Layout, RegionWriter, spectral_variables
from dynlab.faults import fault_point
from dynlab.runs.checkpoints import MADV_DONTNEED, PAGE, LoadedCheckpoint, Run, madvise
from dynlab.sources import load_source_checkpoint, load_source_weights

Tensors = Mapping[str, torch.Tensor]

# ----------------------------------------------------------------------------------------
# Spectra of many components, batched by shape


def component_spectra(
    comps: Mapping[C.Site, C.Component], *, device: str = "cpu", dtype: torch.dtype = torch.float64
) -> dict[C.Site, torch.Tensor]:
    """Singular values (length = rank bound) of every component, one batched call per shape."""
    groups: dict[tuple, list[tuple[C.Site, C.Component]]] = defaultdict(list)
    for site, comp in comps.items():
        if isinstance(comp, C.Columns):
            key = ("columns", tuple(comp.left.shape), tuple(comp.right.shape))
        elif isinstance(comp, C.LowRank) and comp.left.shape[1] < min(comp.shape):
            key = ("lowrank", tuple(comp.left.shape), tuple(comp.right.shape))
        else:
            x = comp.entries() if isinstance(comp, C.LowRank) else comp.x
            comp = C.Dense(x, comp.shape) if isinstance(comp, C.LowRank) else comp
            key = ("dense", tuple(x.shape))  # as stored: no transposed copies
        groups[key].append((site, comp))
    out: dict[C.Site, torch.Tensor] = {}
    for key, items in groups.items():
        if key[0] == "lowrank":
            left = stack_as([c.left for _, c in items], dtype, device)
            right = stack_as([c.right for _, c in items], dtype, device)
            sig = spectra.lowrank_svdvals(left, right, dtype=dtype)
        elif key[0] == "columns":
            sig = columns_spectra([c for _, c in items], dtype, device)
        else:
            sig = spectra.svdvals_of([c.x for _, c in items], [c.minus for _, c in items],
                                     dtype=dtype)
        sig = sig.cpu()
        bounds = [comp.rank_bound for _, comp in items]
        if min(bounds) == max(bounds):  # the whole group padded (or cut) at once
            k = bounds[0]
            if sig.shape[1] < k:  # rows dropped because they were zero, or a product
                # judged as the full matrix: σ = 0 there
                sig = torch.cat([sig, sig.new_zeros(sig.shape[0], k - sig.shape[1])], dim=1)
            out.update(zip((site for site, _ in items), sig[:, :k].unbind(0), strict=True))
            continue
        for (site, _), s, k in zip(items, sig, bounds, strict=True):
            if s.shape[0] < k:
                s = torch.cat([s, s.new_zeros(k - s.shape[0])])
            out[site] = s[:k]
    return out


def columns_spectra(cols: Sequence[C.Columns], dtype: torch.dtype, device: str
                    ) -> torch.Tensor:
    """Singular values (B, k) of equal-shaped `components.Columns`: from Gram matrices formed
    from their factors, the SVD of the formed matrix for those the Gram route cannot resolve
    (`spectra.gram_svdvals`)."""
    gram = spectra.columns_grams(stack_as([c.left for c in cols], dtype, device),
                                 stack_as([c.right for c in cols], dtype, device))

    def finite(i: int) -> bool:
        return bool(torch.isfinite(cols[i].left).all() and torch.isfinite(cols[i].right).all())

    return spectra.gram_svdvals(gram, cols[0].shape, lambda i: cols[i].entries().to(dtype),
                                finite, dtype=dtype)


#: entries stacked at once for the entry-wise metrics (64 MiB in float64)
ENTRY_BLOCK = 1 << 23


def entry_metrics(comps: Mapping[C.Site, C.Component], names: Sequence[str]
                  ) -> dict[C.Site, dict[str, float]]:
    """The entry-wise metrics `names` (metrics.METRICS[...].from_entries) of every component:
    each component's entries formed once, in float64, and equal-shaped ones stacked (at most
    `ENTRY_BLOCK` entries at a time) into one call per metric."""
    out: dict[C.Site, dict[str, float]] = {}
    if not names:
        return out
    groups: dict[tuple[int, int], list[C.Site]] = defaultdict(list)
    for site, comp in comps.items():
        groups[tuple(comp.shape)].append(site)
    for (m, n), sites in groups.items():
        per_stack = max(1, ENTRY_BLOCK // max(1, m * n))
        for start in range(0, len(sites), per_stack):
            part = sites[start:start + per_stack]
            mats = [comps[site].entries().to(torch.float64) for site in part]
            x = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)  # no 2nd copy
            del mats
            values = {name: metrics_mod.METRICS[name].from_entries(x).cpu().tolist()
                      for name in names}
            del x
            for i, site in enumerate(part):
                out[site] = {name: v[i] for name, v in values.items()}
    return out


def stack_as(mats: Sequence[torch.Tensor], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Stack equal-shaped matrices into one batch of `dtype` on `device`, in a single copy
    (conversion and transposition included) — or none, when they already are consecutive
    equally spaced slices of one tensor (the heads or layers of a stacked factor): a view of
    it then (not to be written to)."""
    first = mats[0]
    if first.dtype == dtype and first.device.type == torch.device(device).type:
        step = mats[1].data_ptr() - first.data_ptr() if len(mats) > 1 else 0
        size = first.element_size()
        if step > 0 and step % size == 0 and all(
                m.data_ptr() == first.data_ptr() + i * step and m.stride() == first.stride()
                and m.shape == first.shape and m.untyped_storage().data_ptr()
                == first.untyped_storage().data_ptr() for i, m in enumerate(mats)):
            return first.as_strided((len(mats), *first.shape), (step // size, *first.stride()))
    out = torch.empty((len(mats), *mats[0].shape), dtype=dtype, device=device)
    if all(m.device == out.device for m in mats):
        return torch.stack(list(mats), out=out)  # converted as it is copied
    for i, m in enumerate(mats):
        out[i].copy_(m)
    return out


# ----------------------------------------------------------------------------------------
# One checkpoint -> the arrays of its (run, step) region


def kind_components(
    kind: str,
    run: Run,
    ckpt: LoadedCheckpoint,
    prev_weights: Tensors | None,
    select: C.Select = None,
) -> dict[C.Site, C.Component]:
    """The components of one kind, or {} where that kind does not exist for this checkpoint
    (only the sites `select` keeps, when given). Each carries its storage precision
    (`stored`, which sets its zero tolerance)."""
    spec = run.spec
    if kind == "weights":
        return C.weight_components(ckpt.weights, spec, select)
    if kind == "grads":
        return C.grad_components(ckpt.grads, ckpt.weights, spec, select) if ckpt.grads else {}
    if kind == "train_grads":
        g = ckpt.train_grads
        return C.grad_components(g, ckpt.weights, spec, select) if g else {}
    if kind == "updates":  # relora: within-cycle updates from the factors (rank ≤ 2r)
        if not prev_weights:
            return {}
        return C.update_components(ckpt.weights, prev_weights, spec, run.lora_scale, select)
    if kind == "lora":
        scale = run.lora_scale
        return (C.lora_components(ckpt.weights, spec, scale, select) if scale is not None
                else {})
    raise ValueError(f"unknown kind {kind!r}")


def region_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Each spectral variable's shape without its run and step dims."""
    dims = layout.dims()
    return {
        name: tuple(dims[d] for d in var_dims if d not in ("run", "step"))
        for name, var_dims in spectral_variables(layout.metrics).items()
    }


def on_device(tensors: Tensors | None, device: str) -> dict[str, torch.Tensor] | None:
    """The tensors on `device` (asynchronous copies from pinned memory)."""
    if tensors is None:
        return None
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


def checkpoint_region(
    run: Run,
    ckpt: LoadedCheckpoint,
    prev_weights: Tensors | None,
    layout: Layout,
    options: Options,
    selected: Cells | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """All spectral variables of one checkpoint (without run/step dims), and the names of the
    matrices that held NaN/Inf. Only the components of `selected` (dynlab.analysis.selection;
    None: every one) are computed; the others are NaN.

    Every matrix's numerical-zero tolerance (`metrics_mod.zero_tolerance`) is the larger of the
    rounding noise of its storage precision, c·eps·S·(1/√m + 1/√n) with the component's `eps`
    and `storage_norm` S, and the SVD's error max(m, n)·eps_c·σ_1 in the computation's
    precision (`options.precision`); it is written as `tol` (and `head_tol`, `emb_tol`)
    beside `max_rank`, the rank bound by construction."""
    if options.device != "cpu":  # one transfer; components are then built on the device
        ckpt = LoadedCheckpoint(ckpt.checkpoint, on_device(ckpt.weights, options.device),
                                on_device(ckpt.grads, options.device), ckpt.meta,
                                on_device(ckpt.train_grads, options.device))
        prev_weights = on_device(prev_weights, options.device)
    shapes = region_shapes(layout)
    tables = {t: sig for t, (sig, _, _, _) in C.TABLES.items()}

    def cells(fill: float) -> dict[str, torch.Tensor]:
        return {t: torch.full(shapes[v][:-1], fill, dtype=torch.float64)
                for t, v in tables.items()}

    sigma = {t: torch.full(shapes[v], math.nan, dtype=torch.float64) for t, v in tables.items()}
    max_dim, min_dim = cells(1.0), cells(1.0)
    norm, eps, max_rank = cells(math.nan), cells(math.nan), cells(math.nan)
    compute_eps = torch.finfo(options.dtype).eps
    entrywise = [m for m in options.metrics if metrics_mod.METRICS[m].entrywise]
    entry_values = {(t, m): cells(math.nan)[t] for t in tables for m in entrywise}
    bad: list[str] = []
    # the previous weights were resident as the last checkpoint's: out until `updates` needs
    # them, so that at most two checkpoint files (weights and grads, or weights and previous
    # weights) are resident at once
    views = [{t: x.numpy() for t, x in table.items()}
             for table in (sigma, max_dim, min_dim, norm, eps, max_rank)]
    sigma_id, max_id, min_id, norm_id, eps_id, rank_id = range(len(views))
    held = (ckpt.weights, ckpt.grads, ckpt.train_grads, prev_weights)
    # below RELEASE_MIN_BYTES the pages are not worth a system call per part
    release = sum(tensor_bytes(t) for t in held) > RELEASE_MIN_BYTES
    maps = file_mappings() if release else []  # the files are mapped at load: read once
    if release:
        release_pages(prev_weights, maps)
    parts = site_parts(ckpt.weights, run.spec.n_layers)
    for k_index, kind, part in ((k, kind, part) for k, kind in enumerate(layout.kinds)
                                for part in parts):
        select = part_select(part, selected)
        # the convention's own entries (the OV circuits) are in the layers' parts only
        convention = options.convention if part[0] == "layers" else "dynlab"
        built = select if convention == "dynlab" else (
            lambda site, kind=kind, select=select, convention=convention: select(site)
            and not replaces_component(convention, kind, site))  # built by apply_convention
        comps = kind_components(kind, run, ckpt, prev_weights, built)
        comps = apply_convention(convention, kind, comps, run.spec, ckpt.weights,
                                 ckpt.train_grads if kind == "train_grads" else ckpt.grads,
                                 prev_weights, select)
        # the pico convention adds OV entries of its own
        comps = {site: c for site, c in comps.items() if select(site)}
        if not comps:
            continue
        sigmas = component_spectra(comps, device=options.device, dtype=options.dtype)
        if options.dtype == torch.float64:  # σ_1 of the projections for their circuits' S
            C.record_spectral_norms(comps, sigmas)
        # into numpy views of the tables (same memory), one assignment per table and length
        groups: dict[tuple[str, int], list[C.Site]] = defaultdict(list)
        for site, s in sigmas.items():
            groups[(site.table, s.shape[0])].append(site)
        for (t, k), sites in groups.items():
            cells_at = tuple(np.asarray(ix) for ix in zip(*((k_index, *site.index)
                                                           for site in sites), strict=True))
            s64 = torch.stack([sigmas[site] for site in sites]).to(torch.float64).numpy()
            views[sigma_id][t][cells_at + (slice(0, k),)] = s64
            attrs = np.asarray([(c.max_dim, c.min_dim, stated_norm(c), c.eps, c.max_rank)
                                for c in (comps[site] for site in sites)], dtype=np.float64)
            for j, table_id in enumerate((max_id, min_id, norm_id, eps_id, rank_id)):
                views[table_id][t][cells_at] = attrs[:, j]  # norm NaN: ‖x‖_F, from σ below
            if t not in ("qk", "qk_head"):  # q/k report it
                bad.extend(f"{kind}:{site_name(site)}"
                           for site, nan in zip(sites, np.isnan(s64).all(axis=1), strict=True)
                           if nan)
        for site, values in entry_metrics(comps, entrywise).items():
            for m, value in values.items():
                entry_values[(site.table, m)][(k_index, *site.index)] = value
        del comps, sigmas
        # this part's pages out of the resident set (a later part or kind that reads a tensor
        # again faults it back in from the page cache, unchanged)
        if release:
            for tensors in held:
                release_pages(tensors, maps)
            trim_heap()
    out: dict[str, np.ndarray] = {}
    for table, var in tables.items():
        prefix = C.TABLES[table][1]
        s = sigma[table]
        from_sigma = norm[table].isnan() & ~s.isnan().all(-1)
        norm[table][from_sigma] = metrics_mod.frobenius_norm(s[from_sigma])
        out[var] = s.numpy()
        tol_args = dict(min_dim=min_dim[table], norm=norm[table], compute_eps=compute_eps)
        out[prefix + "tol"] = metrics_mod.zero_tolerance(s, max_dim[table], eps[table],
                                                         **tol_args).numpy()
        out[prefix + "max_rank"] = max_rank[table].numpy()
        for m in options.metrics:
            metric = metrics_mod.METRICS[m]
            if metric.entrywise:
                values = entry_values[(table, m)]
            else:
                values = spectrum_metric(m, s, max_dim[table], options.convention,
                                         eps[table], **tol_args)
            out[prefix + m] = values.numpy()
    return out, bad


#: bytes of stored matrices per part of a checkpoint (`site_parts`)
PART_BYTES = 16 << 20
#: bytes of a checkpoint's tensors (weights, gradients, previous weights) above which its
#: mapped pages are released after each part and the heap trimmed (`release_pages`)
RELEASE_MIN_BYTES = 4 * PART_BYTES


def tensor_bytes(tensors: Tensors | None) -> int:
    """Bytes of a dict of tensors (0 for None)."""
    return sum(t.numel() * t.element_size() for t in (tensors or {}).values())


def site_parts(weights: Tensors, n_layers: int, part_bytes: int | None = None
               ) -> list[tuple[str, frozenset[int]]]:
    """The parts a checkpoint is analysed in, one after the other, so that only one part's
    components (their float64 factors) and stored pages are resident at once: runs of
    consecutive layers whose stored matrices hold at most `part_bytes` (default `PART_BYTES`)
    together (at least one layer each), as ("layers", {layer, ...}), then each embedding
    alone, as ("emb", {e}).
    Every component depends only on its own matrices, so the values do not depend on the
    parts (the same property that lets a selection equal the full analysis)."""
    part_bytes = PART_BYTES if part_bytes is None else part_bytes
    size = [0] * n_layers
    for name, t in weights.items():
        head, _, rest = name.partition(".")
        if head == "layers":
            layer = rest.partition(".")[0]
            if layer.isdigit() and int(layer) < n_layers:
                size[int(layer)] += t.numel() * t.element_size()
    parts: list[tuple[str, frozenset[int]]] = []
    chunk: list[int] = []
    for layer in range(n_layers):
        if chunk and sum(size[i] for i in chunk) + size[layer] > part_bytes:
            parts.append(("layers", frozenset(chunk)))
            chunk = []
        chunk.append(layer)
    if chunk:
        parts.append(("layers", frozenset(chunk)))
    return parts + [("emb", frozenset({e})) for e in range(len(C.EMBEDDINGS))]


def part_select(part: tuple[str, frozenset[int]], selected: Cells | None
                ) -> Callable[[C.Site], bool]:
    """The sites of one part (`site_parts`) that `selected` keeps (all of the part's when
    None)."""
    table, index = part

    def wants(site: C.Site) -> bool:
        if (site.table == "emb") != (table == "emb") or site.index[0] not in index:
            return False
        return selected is None or selected.wants(site)

    return wants


def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_trim()


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim), so that the
    temporaries of one kind do not stay in the resident set while the next is computed."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)




def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's memory mappings of regular files (/proc/self/maps),
    sorted."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/") and "(deleted)" not in fields[5]:
                    start, end = (int(v, 16) for v in fields[0].split("-"))
                    out.append((start, end))
    except OSError:
        return []
    return sorted(out)


def release_pages(tensors: Tensors | None, maps: list[tuple[int, int]] | None = None) -> int:
    """Take the pages of tensors that are mapped from checkpoint files (safetensors maps the
    file) out of this process's resident set: madvise(MADV_DONTNEED) on the whole pages
    inside each such tensor. The pages stay in the page cache and a later read faults them
    back in unchanged (the tensors are never written: a private file mapping then reads as
    the file). Tensors in anonymous memory are left alone. `maps`: `file_mappings()` (read
    here when not given). Returns the bytes released."""
    if not tensors:
        return 0
    maps = file_mappings() if maps is None else maps
    starts = [start for start, _ in maps]
    released = 0
    for t in tensors.values():
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        a = t.data_ptr()
        b = a + t.numel() * t.element_size()
        i = bisect.bisect_right(starts, a) - 1  # the last mapping that starts at or before a
        if i < 0 or b > maps[i][1]:
            continue
        lo, hi = -(-a // PAGE) * PAGE, b // PAGE * PAGE
        if madvise(lo, hi, MADV_DONTNEED):  # glibc/Linux only
            released += hi - lo
    return released


def stated_norm(comp: C.Component) -> float:
    """S of a component's zero tolerance, or NaN where S is ‖x‖_F of the stored matrix itself,
    which `checkpoint_region` takes from the spectra of a whole table at once (‖x‖_F =
    √Σσ_i², no pass over the entries)."""
    if isinstance(comp, C.Columns) and comp.norm is None:
        return math.nan
    if isinstance(comp, C.Dense) and comp.norm is None and comp.minus is None:
        return math.nan
    return comp.storage_norm


def site_name(site: C.Site) -> str:
    """The matrix a site stands for, as a warning names it."""
    if site.table == "layer":
        return f"layers.{site.index[0]}.{C.MATRICES[site.index[1]]}"
    if site.table == "head":
        return f"layers.{site.index[0]}.ov_circuit.head{site.index[1]}"
    if site.table == "qk":
        return f"layers.{site.index[0]}.qk_circuit"
    if site.table == "qk_head":
        return f"layers.{site.index[0]}.qk_circuit.head{site.index[1]}"
    return C.EMBEDDINGS[site.index[0]]


# ----------------------------------------------------------------------------------------
# Load and write


def load_task(
    task: Task, options: Options, previous_weights: Tensors | None = None
) -> tuple[LoadedCheckpoint, Tensors | None]:
    """Read a task's checkpoint, and its predecessor's weights when updates are wanted
    (`previous_weights` where the caller still holds them, read with the same selection,
    else read): only the tensors its cells are built from (`selection.tensor_keep`), where
    the source can read its files in part."""
    keep = tensor_keep(task.cells)
    ckpt = load_source_checkpoint(task.run, task.checkpoint, grads=options.wants_grads,
                                  kinds=options.kinds, keep=keep)
    prev = None
    if options.wants_updates and task.previous is not None:
        prev = previous_weights
        if prev is None:
            prev = load_source_weights(task.run, task.previous, keep)
    return ckpt, prev


def write_task(writer: RegionWriter, task: Task, values: Mapping[str, np.ndarray]) -> None:
    """Write one checkpoint's region, its predecessor, its cells' flags (`done`, `qk_done`,
    `emb_done`) and, last, its `analyzed` flag: 1 when every cell is then in the store, 2 when
    a selection is (a recomputed checkpoint is unflagged first, so a kill in between
    recomputes it again). A task that fills in cells (`task.keep`) merges its values into
    the stored region: the cells it keeps are written back unchanged."""
    if task.recompute:
        writer.write(task.region, {"analyzed": np.int8(0)})
    if task.keep is not None and task.keep.any() and task.cells is not None:
        values = merged(writer, task.region, values, task.cells)
    prev_step = task.previous.step if task.previous else -1
    writer.write(task.region, {**values, "prev_step": np.int64(prev_step)})
    fault_point("analyze.write")
    if task.cells is not None:
        held = task.cells if task.keep is None else task.cells | task.keep
        writer.write(task.region, held.flags())
    writer.write(task.region, {"analyzed": np.int8(1 if task.completes else 2)})


def merged(writer: RegionWriter, region: Mapping[str, int], values: Mapping[str, np.ndarray],
           cells: Cells) -> dict[str, np.ndarray]:
    """`values` where `cells` were computed, the store's region elsewhere. Every spectral
    variable's dims after (run, step) are (kind, <table dims>[, sv]) (store.spectral_variables),
    so a table's cell mask broadcasts over kind and the singular values."""
    out = {}
    for name, new in values.items():
        mask = cells.mask(owner_table(name))
        m = mask[None, ...] if new.ndim == 1 + mask.ndim else mask[None, ..., None]
        out[name] = np.where(m, new, writer.read(name, region))
    return out


def owner_table(name: str) -> str:
    """The result table (components.TABLES) a spectral variable belongs to: by its sigma
    name, else by the longest prefix it starts with (qk_head_ before qk_ before '')."""
    for table, (sigma, _, _, _) in C.TABLES.items():
        if name == sigma:
            return table
    return max(C.TABLES, key=lambda t: len(C.TABLES[t][1]) if name.startswith(C.TABLES[t][1])
               else -1)


def compute_task(
    task: Task,
    loaded: LoadedCheckpoint,
    prev_weights: Tensors | None,
    layout: Layout,
    options: Options,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """One checkpoint's region (`checkpoint_region`, the heavy calls on the pool's threads)
    and the matrices that held NaN/Inf."""
    with spectra.pooled_threads():
        return checkpoint_region(task.run, loaded, prev_weights, layout, options, task.cells)


def run_task(
    task: Task,
    loaded: LoadedCheckpoint,
    prev_weights: Tensors | None,
    writer: RegionWriter,
    layout: Layout,
    options: Options,
) -> list[str]:
    """Compute and write one checkpoint; returns the matrices that held NaN/Inf."""
    values, bad = compute_task(task, loaded, prev_weights, layout, options)
    write_task(writer, task, values)
    return bad
