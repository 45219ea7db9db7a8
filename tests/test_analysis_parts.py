"""A checkpoint analysed in parts (`task.site_parts`: runs of layers, then each embedding) and
a region written in one batch (`RegionWriter.write`) give exactly the store of one part and of
one write per variable; the parts cover every site once and keep to their byte budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import dynlab
from dynlab.analysis import task
from dynlab.analysis.components import EMBEDDINGS, Site
from dynlab.analysis.store import RegionWriter
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import make_run

SPEC = ModelSpec(d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, activation_hidden_dim=24,
                 vocab_size=40)


def layer_weights(n_layers: int, sizes: list[int]) -> dict[str, torch.Tensor]:
    """Float32 matrices of `sizes[i]` entries in layer i (bytes = 4·size), an embedding."""
    w = {f"layers.{i}.attention.q_proj.weight": torch.zeros(n) for i, n in enumerate(sizes)}
    w["embedding_proj.weight"] = torch.zeros(1000)
    return w


def test_parts_cover_every_layer_once_within_the_budget():
    sizes = [10, 10, 30, 5, 5, 5, 100]  # bytes: 40 40 120 20 20 20 400
    parts = task.site_parts(layer_weights(7, sizes), 7, part_bytes=80)
    layer_parts = [sorted(p) for t, p in parts if t == "layers"]
    # consecutive runs, greedy: 40+40 | 120 alone (over budget) | 20+20+20 | 400 alone
    assert layer_parts == [[0, 1], [2], [3, 4, 5], [6]]
    assert [(t, sorted(p)) for t, p in parts if t == "emb"] == [
        ("emb", [e]) for e in range(len(EMBEDDINGS))]
    one = task.site_parts(layer_weights(7, sizes), 7, part_bytes=10 ** 9)
    assert [sorted(p) for t, p in one if t == "layers"] == [list(range(7))]


def test_part_select_keeps_a_part_and_the_selection():
    wants = task.part_select(("layers", frozenset({1})), None)
    assert wants(Site("layer", (1, 0))) and wants(Site("head", (1, 3)))
    assert wants(Site("qk", (1,))) and not wants(Site("qk_head", (0, 1)))
    assert not wants(Site("emb", (1,)))
    emb = task.part_select(("emb", frozenset({1})), None)
    assert emb(Site("emb", (1,))) and not emb(Site("emb", (0,)))
    assert not emb(Site("layer", (1, 0)))


def store_values(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(a[...]) for name, a in g.arrays()}


@pytest.mark.parametrize("convention", ["dynlab", "pico"])
def test_one_layer_per_part_gives_the_same_store(tmp_path, monkeypatch, convention):
    """Every layer in a part of its own (and each embedding) against the whole checkpoint
    in one part: identical stores, bit for bit (weights, grads and updates)."""
    run = make_run(tmp_path / "r", SPEC, [0, 5])
    kw = dict(metrics="per,cn,gini", device="cpu", progress=False, convention=convention,
              activations=False)
    monkeypatch.setattr(task, "PART_BYTES", 1 << 40)
    whole = dynlab.analyze([run], tmp_path / "whole.zarr", **kw)
    monkeypatch.setattr(task, "PART_BYTES", 1)
    assert len(task.site_parts(dict(load_weights(run)), SPEC.n_layers)) == SPEC.n_layers + 2
    parts = dynlab.analyze([run], tmp_path / "parts.zarr", **kw)
    a, b = store_values(whole), store_values(parts)
    assert a.keys() == b.keys()
    assert np.isfinite(a["per"]).any()
    for name in a:
        if np.issubdtype(a[name].dtype, np.number):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def load_weights(run):
    from dynlab.sources import load_source_weights, open_sources

    (src,) = open_sources([run])
    return load_source_weights(src, src.checkpoints[0])


def test_batched_region_write_equals_one_write_per_variable(tmp_path):
    """RegionWriter.write (all variables in one batch) against zarr's own per-variable
    writes: the same arrays and the same chunk files, for whole-chunk, partial-chunk,
    scalar and orthogonal (index array) regions."""
    rng = np.random.default_rng(0)
    shapes = {"a": ((3, 4, 5), ("run", "step", "x")), "b": ((3, 4), ("run", "step")),
              "c": ((3, 4, 6, 2), ("run", "step", "y", "z"))}
    stores = []
    for name in ("batched", "plain"):
        g = zarr.open_group(str(tmp_path / name), mode="w")
        for var, (shape, dims) in shapes.items():
            g.create_array(var, shape=shape, dtype="float64", fill_value=np.nan,
                           chunks=(1, 2) + shape[2:], dimension_names=dims)
        stores.append(g)
    writes = [({"run": 1, "step": 2}, {"a": rng.normal(size=5), "b": np.float64(7.0),
                                      "c": rng.normal(size=(6, 2))}),
              ({"run": 0, "step": 3}, {"a": rng.normal(size=5), "c": rng.normal(size=(6, 2))}),
              ({"run": 2, "step": np.array([0, 3])}, {"a": rng.normal(size=(2, 5)),
                                                      "b": rng.normal(size=2)})]
    writer = RegionWriter(tmp_path / "batched")
    plain = stores[1]
    for region, values in writes:
        writer.write(region, values)
        for var, arr in values.items():
            sel = tuple(region.get(d, slice(None)) for d in shapes[var][1])
            if any(isinstance(k, np.ndarray) for k in sel):
                plain[var].set_orthogonal_selection(sel, arr)
            else:
                plain[var][sel] = arr
    got, want = store_values(tmp_path / "batched"), store_values(tmp_path / "plain")
    for var in shapes:
        np.testing.assert_array_equal(got[var], want[var], err_msg=var)
        assert np.isfinite(got[var]).sum() > 0
    chunk_files = sorted(p.relative_to(tmp_path / "plain")
                         for p in (tmp_path / "plain").rglob("*") if p.is_file())
    for rel in chunk_files:
        assert (tmp_path / "batched" / rel).read_bytes() == (tmp_path / "plain" / rel).read_bytes()
    assert writer.read("b", {"run": 1, "step": 2}) == 7.0


def test_whole_chunks_written_directly_are_zarrs_own_bytes(tmp_path):
    """A region that is one whole chunk of an array with the template's codecs (bytes, zstd)
    is encoded and written by RegionWriter itself (`put_chunk`): the chunk file holds the
    bytes zarr's own write gives (float64 with NaN, int8, int64, float32), and zarr and xarray
    read it back; arrays with other codecs, partial chunks, all-fill values and values of
    another shape go through zarr."""
    import xarray as xr

    rng = np.random.default_rng(3)
    dtypes = {"f": "float64", "i": "int8", "j": "int64", "s": "float32", "raw": "float64"}
    stores = []
    for name in ("direct", "zarr"):
        g = zarr.open_group(str(tmp_path / name), mode="w")
        for var, dtype in dtypes.items():
            fill = np.nan if dtype.startswith("float") else -1
            extra = {"compressors": None} if var == "raw" else {}
            g.create_array(var, shape=(2, 3, 4, 5), chunks=(1, 1, 4, 5), dtype=dtype,
                           fill_value=fill, dimension_names=("run", "step", "x", "y"), **extra)
        stores.append(g)
    writer = RegionWriter(tmp_path / "direct")
    values = {var: (rng.normal(size=(4, 5)) * 50).astype(dtype) for var, dtype in dtypes.items()}
    values["f"][1, 2] = np.nan
    sel = (1, 2, slice(None), slice(None))
    assert [writer.put_chunk(v, sel, values[v]) for v in dtypes] == [True] * 4 + [False]
    assert not writer.put_chunk("f", (1, slice(0, 2), slice(None), slice(None)),
                                values["f"][None].repeat(2, 0))
    assert not writer.put_chunk("f", (0, 0, slice(None), slice(None)), np.full((4, 5), np.nan))
    assert not writer.put_chunk("f", (0, 1, slice(None), slice(None)), values["f"].T.copy())
    writer.write({"run": 1, "step": 2}, {"raw": values["raw"]})
    for var in dtypes:
        stores[1][var][sel] = values[var]
        rel = Path(var, "c", "1", "2", "0", "0")
        assert (tmp_path / "direct" / rel).read_bytes() == (tmp_path / "zarr" / rel).read_bytes()
        got = np.asarray(zarr.open_group(str(tmp_path / "direct"), mode="r")[var][sel])
        np.testing.assert_array_equal(got, values[var], err_msg=var)
    ds = xr.open_zarr(str(tmp_path / "direct"), consolidated=False)
    np.testing.assert_array_equal(ds["j"].isel(run=1, step=2).values, values["j"])
    assert int(ds["j"].isel(run=0, step=0, x=0, y=0)) == -1


def test_a_failing_batch_starts_no_write(tmp_path):
    g = zarr.open_group(str(tmp_path / "s"), mode="w")
    g.create_array("a", shape=(2, 2), dtype="float64", fill_value=np.nan,
                   dimension_names=("run", "step"))
    writer = RegionWriter(tmp_path / "s")
    with pytest.raises(ValueError, match="no dim"):
        writer.write({"run": 0, "step": 1, "other": 0}, {"a": np.float64(1.0)})
    assert np.isnan(writer.read("a")).all()


def test_entry_metrics_see_the_whole_matrix_when_rows_were_dropped():
    """An embedding gradient's zero rows and an update's unchanged rows are left out of the
    spectral work (components.drop_zero_rows, components.difference), but the entry-wise
    metrics are of the whole matrix: hoyer and gini over all m·n entries, against numpy
    (Hurley & Rickard's Gini, hand-written), the same stacked or one at a time."""
    from dynlab.analysis import components as C
    from dynlab.analysis.task import entry_metrics

    g = torch.Generator().manual_seed(3)
    grad = torch.randn(40, 6, generator=g)
    grad[::3] = 0.0  # tokens absent from the batch
    cur = torch.randn(40, 6, generator=g)
    prev = cur.clone()
    prev[5:9] += torch.randn(4, 6, generator=g)  # only four rows changed
    comps = {C.Site("emb", (0,)): C.drop_zero_rows(grad),
             C.Site("emb", (1,)): C.difference(cur, prev)}
    assert comps[C.Site("emb", (0,))].x.shape[0] < 40  # rows were dropped
    got = entry_metrics(comps, ["hoyer", "gini"])

    def gini(w):
        c = np.sort(np.abs(w).ravel())
        n = c.size
        return 1 - 2 * np.sum(c / c.sum() * (n - np.arange(1, n + 1) + 0.5) / n)

    def hoyer(w):
        w = np.abs(w).ravel()
        return (np.sqrt(w.size) - w.sum() / np.sqrt((w * w).sum())) / (np.sqrt(w.size) - 1)

    for site, full in ((C.Site("emb", (0,)), grad.double().numpy()),
                       (C.Site("emb", (1,)), (cur.double() - prev.double()).numpy())):
        np.testing.assert_array_equal(comps[site].entries().numpy(), full)
        assert got[site]["gini"] == pytest.approx(gini(full), rel=1e-12)
        assert got[site]["hoyer"] == pytest.approx(hoyer(full), rel=1e-12)
        alone = entry_metrics({site: comps[site]}, ["gini"])[site]["gini"]
        assert alone == got[site]["gini"]


def test_remembered_by_content_and_spectral_norms_reused():
    """memo.remembered computes fn once per content of its input (equal bytes in another
    tensor hit; one changed entry, another dtype or shape miss), and the spectral norms it
    remembers equal numpy's 2-norm (σ_1) to 1e-12."""
    from dynlab.analysis import components as C
    from dynlab.analysis.memo import remembered

    calls = []

    def twice(x):
        calls.append(1)
        return x.sum() * 2

    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 150, generator=g, dtype=torch.float64)
    assert remembered(twice, x) == remembered(twice, x.clone()) == x.sum() * 2
    assert len(calls) == 1
    y = x.clone()
    y[7, 3] += 1e-12
    remembered(twice, y)
    remembered(twice, x.float())
    remembered(twice, x.reshape(150, 200))
    assert len(calls) == 4
    half = x.bfloat16()  # hashed through its bits
    remembered(twice, half)
    remembered(twice, half.clone())
    assert len(calls) == 5
    other = half.clone()
    other[0, 0] = -other[0, 0]
    remembered(twice, other)
    remembered(twice, half.view(torch.int16))  # the same bits, another dtype
    assert len(calls) == 7
    # results are kept up to MEMO_BYTES together: the oldest leave first
    from dynlab.analysis import memo

    before = memo.MEMO_BYTES
    try:
        memo.MEMO_BYTES = 2 * x.numel() * 8
        big = [remembered(lambda a: a * 2, x + i) for i in range(3)]
        assert memo.result_bytes(big[0]) == x.numel() * 8
        assert 0 < memo.held_bytes() <= memo.MEMO_BYTES
        # many small results (offered scalars) are bounded too: each counts ENTRY_BYTES more
        memo.MEMO_BYTES = 10 * (8 + memo.ENTRY_BYTES)
        for i in range(100):
            memo.offer(twice, torch.tensor([float(i)]), torch.tensor(2.0 * i, dtype=torch.float64))
        assert memo.held_bytes() == memo.MEMO_BYTES
        assert remembered(twice, torch.tensor([99.0])) == 198.0  # the most recent: kept
        remembered(twice, torch.tensor([0.0]))  # the oldest: dropped, so computed
        assert len(calls) == 8
    finally:
        memo.MEMO_BYTES = before
    batch = torch.randn(3, 200, 150, generator=g, dtype=torch.float64)
    first = C.spectral_norms(batch)
    np.testing.assert_allclose(first.numpy(), np.linalg.norm(batch.numpy(), 2, axis=(-2, -1)),
                               rtol=1e-12)
    assert torch.equal(C.spectral_norms(batch.clone()), first)


def test_reads_chunk_by_chunk_equal_zarrs_own(tmp_path):
    """RegionWriter reads a region whose cells are each one whole chunk (the template's
    (run, step) chunks) file by file (`read_chunks`): an unwritten chunk reads as the fill
    value, a written one decoded, a label dim shorter than its chunk cut to its length — the
    values zarr's own reads give, for every dtype of the template, a single cell, index
    arrays and whole arrays, through `read` and `read_many`; an array with other codecs is
    read by zarr."""
    rng = np.random.default_rng(5)
    g = zarr.open_group(str(tmp_path / "s"), mode="w")
    specs = {"f": ("float64", np.nan, (4,), (4,)), "i": ("int8", 0, (), ()),
             "j": ("int64", -1, (), ()), "s": ("float32", np.nan, (3, 2), (3, 2)),
             "label": ("float64", np.nan, (5,), (128,)),
             "raw": ("float64", np.nan, (4,), (4,))}
    for var, (dtype, fill, shape, chunks) in specs.items():
        extra = {"compressors": None} if var == "raw" else {}
        g.create_array(var, shape=(2, 3, *shape), chunks=(1, 1, *chunks), dtype=dtype,
                       fill_value=fill, dimension_names=("run", "step", *"xy"[:len(shape)]),
                       **extra)
        for run, step in ((0, 1), (1, 0), (1, 2)):  # the other cells stay unwritten
            g[var][run, step] = (rng.normal(size=shape) * 50).astype(dtype)
    g["f"][1, 2, 1] = np.nan
    writer = RegionWriter(tmp_path / "s")
    regions = [{}, {"run": 1}, {"run": 0, "step": 1}, {"run": 0, "step": 2},
               {"run": 1, "step": np.array([2, 0])}, {"step": np.array([1])}]
    for region in regions:
        for var in specs:
            sel = writer.selection(var, region)
            want = np.asarray(g[var].get_orthogonal_selection(sel))
            direct = writer.read_chunks(var, sel)
            assert (direct is None) == (var == "raw"), (var, region)
            got = writer.read(var, region)
            assert got.dtype == want.dtype and got.shape == want.shape, (var, region)
            np.testing.assert_array_equal(got, want, err_msg=f"{var} {region}")
        many = writer.read_many(list(specs), region)
        for var in specs:
            np.testing.assert_array_equal(many[var], writer.read(var, region))
    with pytest.raises(KeyError, match="nope"):
        writer.read_many(["f", "nope"])


def _zarrs_own_template(dest, layout):
    """The store of `layout` created by zarr-python itself (its create_array for every array
    with the template's arguments, then zarr.consolidate_metadata): the reference for
    `build_store`, which writes these files itself."""
    from dynlab.analysis import store as S

    coords = S.growing_coordinates(layout)
    sizes = {**layout.dims(), **{d: len(v) for d, v in coords.items()}}
    with S.quiet_zarr():
        group = zarr.open_group(str(dest), mode="w", zarr_format=3,
                                attributes=S._attrs(layout))
        for dim, values in S.fixed_coordinates(layout).items():
            S._create_coordinate(group, dim, values, growing=False)
        for dim, values in coords.items():
            S._create_coordinate(group, dim, S._coordinate_array(dim, values), growing=True)
        for name, spec in S.template(layout.metrics, layout.labels).items():
            S._create_array(group, name, spec, sizes)
        zarr.consolidate_metadata(str(dest))


@pytest.mark.parametrize("n_layers", [1, 3])
def test_a_store_template_is_zarrs_own_files(tmp_path, n_layers):
    """build_store writes the template's metadata and coordinates itself, without zarr: every
    file (each array's zarr.json, the coordinates' chunks, the root zarr.json with the
    consolidated metadata) is byte for byte the one zarr-python writes for the same arrays —
    with evaluation labels (string coordinates, label dims shorter than their chunk), a
    coordinate whose only chunk is all fill (one layer: [0]) and so left unwritten; zarr and
    xarray open it; and the RegionWriter's metadata read from those files (`read_array_info`)
    is zarr's own."""
    import xarray as xr

    from dynlab.analysis import store as S

    layout = S.Layout(["run-b", "a"], [0, 10, 250], ["weights", "grads"], ["per", "cn"],
                      n_layers, 4, 6, 2, 5, {"a": {"kind": "decoder"}},
                      {"domain": ["c4", "wiki"], "uid": ["u1", "u2", "u3"],
                       "field": ["syntax"]}, "pico")
    S.build_store(tmp_path / "direct", layout)
    _zarrs_own_template(tmp_path / "zarr", layout)
    files = sorted(p.relative_to(tmp_path / "zarr") for p in (tmp_path / "zarr").rglob("*")
                   if p.is_file())
    direct = sorted(p.relative_to(tmp_path / "direct") for p in (tmp_path / "direct").rglob("*")
                    if p.is_file() and not p.name.startswith(".dynlab"))
    assert direct == files and len(files) > 60
    assert (Path("layer", "c", "0") in files) == (n_layers > 1)
    for rel in files:
        ours, theirs = (tmp_path / "direct" / rel).read_bytes(), (tmp_path / "zarr" / rel)
        assert ours == theirs.read_bytes(), rel
    ds = xr.open_zarr(tmp_path / "direct")
    assert ds["run"].values.tolist() == ["run-b", "a"] and ds["uid"].values.tolist() == \
        ["u1", "u2", "u3"]
    group = zarr.open_group(str(tmp_path / "direct"), mode="r")
    for name in S.template(layout.metrics, layout.labels):
        info = S.read_array_info(tmp_path / "direct" / name)
        array = group[name]
        assert info is not None, name
        assert (info.dims, info.shape, info.chunks, info.dtype) == (
            tuple(array.metadata.dimension_names), array.shape, array.chunks,
            np.dtype(array.dtype)), name
        fill = array.metadata.fill_value
        assert info.fill == fill or (np.isnan(info.fill) and np.isnan(fill)), name
        assert info.codec is not None, name


def test_array_info_refuses_what_it_does_not_read(tmp_path):
    """read_array_info reads only what it knows; anything else (no file, a group, another
    chunk grid, an unknown dtype or fill encoding) is None, and the RegionWriter then asks
    zarr: the values it reads and writes are zarr's."""
    from dynlab.analysis import store as S

    g = zarr.open_group(str(tmp_path / "s"), mode="w")
    g.create_array("a", shape=(2, 3), chunks=(1, 1), dtype="float64", fill_value=np.nan,
                   dimension_names=("run", "step"))
    g.create_array("b", shape=(2, 3), chunks=(1, 1), dtype="bool", fill_value=False,
                   dimension_names=("run", "step"))
    g.create_group("sub")
    assert S.read_array_info(tmp_path / "s" / "a") is not None
    assert S.read_array_info(tmp_path / "s" / "b") is None  # bool: not named here
    assert S.read_array_info(tmp_path / "s" / "sub") is None
    assert S.read_array_info(tmp_path / "s" / "nope") is None
    meta = tmp_path / "s" / "a" / "zarr.json"
    doc = json.loads(meta.read_text())
    for key, value in (("fill_value", "0x7ff8000000000000"), ("data_type", "complex64"),
                       ("chunk_grid", {"name": "rectilinear"})):
        meta.write_text(json.dumps({**doc, key: value}))
        assert S.read_array_info(tmp_path / "s" / "a") is None, key
    meta.write_text(json.dumps(doc))
    writer = RegionWriter(tmp_path / "s")
    assert writer.has("a") and writer.has("b") and not writer.has("sub") \
        and not writer.has("nope")
    writer.write({"run": 1, "step": np.array([0, 2])}, {"b": np.array([True, True])})
    assert writer.read("b").tolist() == [[False] * 3, [True, False, True]]
    assert np.asarray(g["b"][...]).tolist() == [[False] * 3, [True, False, True]]


def test_a_write_of_fill_values_into_an_unwritten_chunk_is_skipped(tmp_path):
    """RegionWriter.write leaves out a variable whose values are all fill (NaN) for a whole
    chunk that holds nothing yet — the store reads the same — and writes it where the chunk
    holds data (which the fill values then replace)."""
    g = zarr.open_group(str(tmp_path / "s"), mode="w")
    g.create_array("a", shape=(2, 3, 4), chunks=(1, 1, 4), dtype="float64", fill_value=np.nan,
                   dimension_names=("run", "step", "x"))
    writer = RegionWriter(tmp_path / "s")
    chunk = tmp_path / "s" / "a" / "c" / "1" / "2" / "0"
    assert writer.leaves_as_is("a", (1, 2, slice(None)), np.full(4, np.nan))
    writer.write({"run": 1, "step": 2}, {"a": np.full(4, np.nan)})
    assert not chunk.exists() and np.isnan(writer.read("a")).all()
    writer.write({"run": 1, "step": 2}, {"a": np.arange(4.0)})
    assert not writer.leaves_as_is("a", (1, 2, slice(None)), np.full(4, np.nan))
    assert chunk.exists() and writer.read("a", {"run": 1, "step": 2}).tolist() == [0, 1, 2, 3]
    writer.write({"run": 1, "step": 2}, {"a": np.full(4, np.nan)})
    assert np.isnan(writer.read("a")).all()
    writer.write({"run": 0, "step": 1}, {"a": np.array([np.nan, 5.0, np.nan, np.nan])})
    assert writer.read("a", {"run": 0, "step": 1})[1] == 5.0


def test_stack_as_views_consecutive_slices_and_copies_the_rest():
    """task.stack_as: consecutive equally spaced slices of one tensor (a stacked factor's
    heads) come back as a view of it, anything else as a copy; both equal torch.stack."""
    base = torch.randn(4, 6, 5, 3, dtype=torch.float64)
    heads = [base[1, h] for h in range(6)]
    got = task.stack_as(heads, torch.float64, "cpu")
    assert torch.equal(got, torch.stack(heads)) and got.data_ptr() == base[1, 0].data_ptr()
    for mats in ([base[1, h] for h in (0, 2, 1)],  # not in order
                 [base[0, 0], base[1, 0]] + [torch.randn(5, 3, dtype=torch.float64)],
                 [base[1, h].float() for h in range(3)]):  # another dtype: converted
        got = task.stack_as(mats, torch.float64, "cpu")
        assert torch.equal(got, torch.stack([m.double() for m in mats]))
        assert got.data_ptr() not in {m.data_ptr() for m in mats}
    transposed = [base[2, h].mT for h in range(6)]  # strided views are viewed as they are
    got = task.stack_as(transposed, torch.float64, "cpu")
    assert torch.equal(got, torch.stack(transposed))


MHA = ModelSpec(d_model=144, n_layers=2, n_heads=4, n_kv_heads=4, activation_hidden_dim=32,
                vocab_size=40)


def test_circuit_norms_from_the_projections_spectra(tmp_path, monkeypatch):
    """Multi-head attention with projections above MEMO_MIN_SIDE: the whole-layer circuits' S
    takes σ_1 of the factors from the projections' own spectra (`record_spectral_norms`). S by
    hand (numpy float64) for the weights' OV and QK; a σ_1 offered is the one used; and the
    store (weights, grads, updates) equals, to 1e-12, the store whose S computes every
    factor's spectral norm apart."""
    from dynlab.analysis import components as C
    from dynlab.analysis.metrics import product_noise_norm

    run = make_run(tmp_path / "r", MHA, [0, 5])
    w = {k: v.clone() for k, v in load_weights(run).items()}
    comps = C.weight_components(w, MHA)
    for site, (first, second) in ((Site("layer", (1, C.MATRICES.index("ov_circuit"))),
                                   ("o_proj", "v_proj")), (Site("qk", (1,)), ("q_proj", "k_proj"))):
        norm = comps[site].norm
        assert isinstance(norm, C.StoredProductNorm)
        a = w[f"layers.1.attention.{first}.weight"].double().numpy()
        b = w[f"layers.1.attention.{second}.weight"].double().numpy()
        a = a.T if first == "q_proj" else a
        hand = product_noise_norm(np.linalg.norm(a), np.linalg.norm(b), 144, 144, 144,
                                  np.linalg.norm(a, 2), np.linalg.norm(b, 2))
        assert norm.value() == pytest.approx(hand, rel=1e-12)
    # grouped-query attention keeps the factors' own norms (O_sum is no stored matrix)
    assert not C.whole_factors_stored(SPEC)
    # an offered σ_1 is the one a later spectral norm returns
    x = torch.randn(144, 160, generator=torch.Generator().manual_seed(9))
    site = Site("layer", (0, C.MATRICES.index("attention.v_proj")))
    C.record_spectral_norms({site: C.dense(x)}, {site: torch.tensor([7.0, 1.0])})
    assert float(C.spectral_norms(x)) == 7.0

    kw = dict(metrics="per,cn,numerical_rank", device="cpu", progress=False, activations=False)
    shared = store_values(dynlab.analyze([run], tmp_path / "shared.zarr", **kw))
    monkeypatch.setattr(C, "whole_factors_stored", lambda spec: False)
    apart = store_values(dynlab.analyze([run], tmp_path / "apart.zarr", **kw))
    assert shared.keys() == apart.keys()
    assert np.isfinite(shared["tol"]).sum() > 0
    for name in shared:
        if np.issubdtype(shared[name].dtype, np.floating):
            np.testing.assert_allclose(shared[name], apart[name], rtol=1e-12, err_msg=name)
        elif np.issubdtype(shared[name].dtype, np.number):
            np.testing.assert_array_equal(shared[name], apart[name], err_msg=name)
