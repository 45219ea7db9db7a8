"""A small synthetic analysis store with the schema of `dynlab.analysis.store`, for the
visualisation tests.

`make_dataset()` builds it in memory, `write_store(path)` writes it with `ds.to_zarr(path)`.
Two runs ("decoder", "relora"), kinds weights/grads/updates/lora, 6 steps, 2 layers, the 8
matrices, 2 heads, both embeddings. Singular values come from the SVD of seeded random
matrices of the shapes a (d_model=8, n_heads=2, n_kv_heads=1, hidden=16, vocab=16) decoder
has, and the metrics are computed from them (float64):

    stable_rank = sum(sigma^2) / sigma_1^2
    er          = exp(-sum p_i log p_i),  p_i = sigma_i / sum(sigma)
    per         = er / (number of non-NaN singular values)
    cn          = sigma_1 / sigma_min

Realistic holes: `updates` is NaN at the first step, `lora` is NaN for the decoder run (and for
ov_circuit and the embeddings of the relora run), and one point (weights, decoder, step 60,
layer 1, ov_circuit) is NaN in every metric and in `sigma`.

Run as a script to write a store: `python tests/viz_fixtures.py OUT.zarr`.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

RUNS = ["decoder", "relora"]
KINDS = ["weights", "grads", "updates", "lora"]
STEPS = [0, 20, 40, 60, 80, 100]
LAYERS = [0, 1]
MATRICES = [
    "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
    "swiglu.w_0", "swiglu.w_1", "swiglu.w_2", "ov_circuit",
]
HEADS = [0, 1]
EMBEDDINGS = ["embedding_proj", "de_embedding_proj"]
DOMAINS = ["narrative", "dialogue"]
UIDS = ["agreement_simple", "agreement_attractor", "det_noun"]
FIELDS = {"agreement_simple": "morphology", "agreement_attractor": "morphology",
          "det_noun": "syntax"}
METRICS = ["per", "cn", "er", "stable_rank"]
RESET_EVERY = 40
NAN_POINT = {"run": "decoder", "kind": "weights", "step": 60, "layer": 1, "matrix": "ov_circuit"}

D, HD, H, HKV, HIDDEN, VOCAB = 8, 4, 2, 1, 16, 16
SHAPES = {  # (out, in)
    "attention.q_proj": (H * HD, D), "attention.k_proj": (HKV * HD, D),
    "attention.v_proj": (HKV * HD, D), "attention.o_proj": (D, H * HD),
    "swiglu.w_0": (HIDDEN, D), "swiglu.w_1": (HIDDEN, D), "swiglu.w_2": (D, HIDDEN),
    "ov_circuit": (D, D),
}
N_SV, N_HEAD_SV, N_EMB_SV = 8, HD, D


def _metrics(sigma: np.ndarray) -> dict[str, float]:
    """The fixture's metric definitions (module docstring) from one NaN-padded spectrum."""
    s = sigma[np.isfinite(sigma)]
    p = s / s.sum()
    er = float(np.exp(-(p * np.log(p)).sum()))
    return {"per": er / s.size, "cn": float(s[0] / s[-1]), "er": er,
            "stable_rank": float((s**2).sum() / s[0] ** 2)}


def _spectrum(rng: np.random.Generator, shape: tuple[int, int], spike: float, n_sv: int,
              scale: float) -> np.ndarray:
    """Descending singular values of noise plus a rank-one spike, NaN-padded to n_sv."""
    out, inp = shape
    w = rng.standard_normal(shape) / np.sqrt(inp)
    w += spike * np.outer(rng.standard_normal(out), rng.standard_normal(inp)) / np.sqrt(out * inp)
    s = np.linalg.svd(scale * w, compute_uv=False)
    return np.concatenate([s, np.full(n_sv - s.size, np.nan)])


def _present(run: str, kind: str, step: int, matrix: str) -> bool:
    """Whether the store holds a value there (missing combinations are NaN in the store)."""
    if kind == "updates" and step == STEPS[0]:
        return False
    if kind == "lora":
        return run == "relora" and matrix not in ("ov_circuit", "embedding_proj",
                                                  "de_embedding_proj")
    return True


def make_dataset(seed: int = 0) -> xr.Dataset:
    """The synthetic store as an in-memory Dataset (module docstring)."""
    rng = np.random.default_rng(seed)
    nr, nk, ns, nl, nm = len(RUNS), len(KINDS), len(STEPS), len(LAYERS), len(MATRICES)
    sigma = np.full((nr, nk, ns, nl, nm, N_SV), np.nan)
    head_sigma = np.full((nr, nk, ns, nl, len(HEADS), N_HEAD_SV), np.nan)
    emb_sigma = np.full((nr, nk, ns, len(EMBEDDINGS), N_EMB_SV), np.nan)
    scale = {"weights": 1.0, "grads": 0.05, "updates": 0.01, "lora": 0.02}
    for r, run in enumerate(RUNS):
        for k, kind in enumerate(KINDS):
            for s, step in enumerate(STEPS):
                spike = 0.5 + 6.0 * step / STEPS[-1] * (1.3 if run == "relora" else 1.0)
                if kind != "weights":
                    spike = 2.0 + rng.uniform(0, 4)
                for li in range(nl):
                    for m, mat in enumerate(MATRICES):
                        if _present(run, kind, step, mat):
                            sigma[r, k, s, li, m] = _spectrum(
                                rng, SHAPES[mat], spike * (1 + 0.3 * li), N_SV, scale[kind])
                    for h in range(len(HEADS)):
                        if _present(run, kind, step, "ov_circuit"):
                            head_sigma[r, k, s, li, h] = _spectrum(
                                rng, (HD, D), spike, N_HEAD_SV, scale[kind])
                for e, emb in enumerate(EMBEDDINGS):
                    if _present(run, kind, step, emb):
                        shape = (VOCAB, D) if emb == "embedding_proj" else (VOCAB, D)
                        emb_sigma[r, k, s, e] = _spectrum(rng, shape, spike, N_EMB_SV, scale[kind])
    idx = (RUNS.index(NAN_POINT["run"]), KINDS.index(NAN_POINT["kind"]),
           STEPS.index(NAN_POINT["step"]), LAYERS.index(NAN_POINT["layer"]),
           MATRICES.index(NAN_POINT["matrix"]))
    sigma[idx] = np.nan

    def metric_array(spec: np.ndarray) -> dict[str, np.ndarray]:
        out = {name: np.full(spec.shape[:-1], np.nan) for name in METRICS}
        for pos in np.ndindex(spec.shape[:-1]):
            if np.isfinite(spec[pos]).any():
                for name, v in _metrics(spec[pos]).items():
                    out[name][pos] = v
        return out

    coords = {
        "run": RUNS, "kind": KINDS, "step": STEPS, "layer": LAYERS, "matrix": MATRICES,
        "head": HEADS, "embedding": EMBEDDINGS, "sv": np.arange(N_SV),
        "head_sv": np.arange(N_HEAD_SV), "emb_sv": np.arange(N_EMB_SV),
        "domain": DOMAINS, "uid": UIDS, "field": sorted(set(FIELDS.values())),
    }
    dims = ("run", "kind", "step", "layer", "matrix")
    hdims = ("run", "kind", "step", "layer", "head")
    edims = ("run", "kind", "step", "embedding")
    data: dict[str, tuple] = {
        "sigma": (dims + ("sv",), sigma),
        "head_sigma": (hdims + ("head_sv",), head_sigma),
        "emb_sigma": (edims + ("emb_sv",), emb_sigma),
    }
    for prefix, spec, dd in (("", sigma, dims), ("head_", head_sigma, hdims),
                             ("emb_", emb_sigma, edims)):
        for name, arr in metric_array(spec).items():
            data[prefix + name] = (dd, arr)

    steps = np.asarray(STEPS, dtype=float)
    rs = ("run", "step")
    loss = np.stack([4.5 * np.exp(-steps / 60) + 1.8, 4.5 * np.exp(-steps / 75) + 1.9])
    ppl = np.stack([np.stack([np.exp(lo + 0.1 * d) for d in range(len(DOMAINS))], -1)
                    for lo in loss])
    blimp = np.stack([np.stack([0.5 + 0.3 * (1 - np.exp(-steps / (40 + 10 * u + 5 * r)))
                                for u in range(len(UIDS))], -1) for r in range(len(RUNS))])
    fields = coords["field"]
    blimp_field = np.stack([blimp[..., [i for i, u in enumerate(UIDS) if FIELDS[u] == f]]
                            .mean(-1) for f in fields], -1)
    wall = np.stack([steps * 0.9 + 3.0, steps * 1.2 + 4.0])
    cycle = np.stack([np.full_like(steps, np.nan), steps // RESET_EVERY])
    data.update({
        "train_loss": (rs, loss), "lr": (rs, np.full_like(loss, 1e-3)),
        "tokens": (rs, np.stack([steps * 2048] * 2)), "wall_seconds": (rs, wall),
        "relora_cycle": (rs, cycle), "ppl": (rs + ("domain",), ppl),
        "ppl_macro": (rs, ppl.mean(-1)), "blimp": (rs + ("uid",), blimp),
        "blimp_field": (rs + ("field",), blimp_field), "blimp_overall": (rs, blimp.mean(-1)),
        "analyzed": (rs, np.ones((len(RUNS), len(STEPS)), dtype=np.int8)),
    })
    ds = xr.Dataset(data, coords=coords)
    for name in ds.data_vars:
        ds[name].attrs.update(long_name=name.replace("_", " "),
                              definition="synthetic test value (tests/viz_fixtures.py)")
    train = {"steps": STEPS[-1], "warmup_steps": 10, "checkpoint_every": 20}
    model = {"d_model": D, "n_layers": len(LAYERS), "n_heads": H, "n_kv_heads": HKV,
             "activation_hidden_dim": HIDDEN, "vocab_size": VOCAB, "max_seq_len": 32}
    run_configs = {
        "decoder": {"kind": "decoder", "model": model, "train": train},
        "relora": {"kind": "relora", "model": model, "train": train,
                   "relora": {"r": 4, "alpha": 8, "dropout": 0.0, "reset_every": RESET_EVERY,
                              "restart_warmup_steps": 5, "prune_ratio": 0.99,
                              "prune_method": "random", "paper_compat": False}},
    }
    ds.attrs.update(dynlab_version="0.1.0", schema_version=1, metrics=list(METRICS),
                    run_configs=json.dumps(run_configs))
    return ds


def write_dataset(ds: xr.Dataset, path: str | Path) -> Path:
    """`ds.to_zarr(path)`, without zarr's notes that string dtypes and consolidated metadata
    are not in the Zarr v3 spec yet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
        ds.to_zarr(path)
    return Path(path)


def write_store(path: str | Path, seed: int = 0) -> Path:
    """Write the synthetic store to `path` (a new Zarr directory) and return the path."""
    return write_dataset(make_dataset(seed), path)


if __name__ == "__main__":
    print(write_store(sys.argv[1] if len(sys.argv) > 1 else "viz_fixture.zarr"))
