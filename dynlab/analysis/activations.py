"""Activations of the learning-dynamics batch: which token positions are kept, and their
analysis (spectral metrics, anisotropy, IsoScore, CKA / SVCCA / PWCCA against a target).

Saved by the trainer (`--save-activations`, `--activation-positions`) in each checkpoint's
`activations.safetensors`:

    layers.<i>                 the residual stream after block i (its output), (samples, d)
    <module>                   each linear module's output, e.g. layers.<i>.attention.q_proj,
                               (samples, out_features); de_embedding_proj: (samples, vocab)
    token_positions            int64 (samples, 2): the (sequence, position) of every row

Rows are samples (token positions of the fixed learning-dynamics batch), the same rows in every
checkpoint of a run and in every run with the same data, batch size and seed: `last` keeps the
last position of each sequence (batch rows), `all` every position (batch·seq_len rows), and
`sample:N` N distinct positions per sequence drawn once with a generator seeded by the run's
seed (batch·N rows).

Other sources give the same layout: a pico-train run's saved learning-dynamics activations
(its reader's `saved_activations`: the `layer_suffixes` modules at `sequence_idx`, no residual
stream), and for Hugging Face checkpoints activations computed at analysis time
(`--activations-data`) with transformers' own class, hooked at each decoder block (the residual
stream) and at the linear modules that are dynlab's matrices (dynlab.sources.arch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from dynlab.analysis import metrics as metrics_mod
from dynlab.analysis import representations as R
from dynlab.analysis import spectra
from dynlab.analysis.components import LAYER_MATRICES
from dynlab.errors import InputError
from dynlab.runs.checkpoints import Checkpoint, Run, load_tensors
from dynlab.sources.models import hf_context, hf_model, hf_tokenizer

POSITION_MODES = ("last", "all", "sample:N")
ACT_EPS = metrics_mod.ACT_EPS  # float32 eps (dynlab.analysis.metrics)


def parse_positions(spec: str) -> tuple[str, int]:
    """'last' -> ('last', 1); 'all' -> ('all', 0); 'sample:N' -> ('sample', N), N ≥ 1."""
    text = str(spec).strip()
    if text in ("last", "all"):
        return text, 1 if text == "last" else 0
    if text.startswith("sample:"):
        try:
            n = int(text.removeprefix("sample:"))
        except ValueError:
            n = 0
        if n >= 1:
            return "sample", n
    raise InputError(
        f"--activation-positions: expected last, all or sample:N (N ≥ 1), got {spec!r}")


def select_positions(spec: str, n_seq: int, seq_len: int, seed: int) -> torch.Tensor:
    """(n_seq, P) int64 positions kept per sequence of length seq_len, ascending per row.
    sample:N draws N distinct positions per sequence (torch.randperm with a generator seeded
    by `seed`, independent of the training RNG); N > seq_len is an InputError."""
    mode, n = parse_positions(spec)
    if mode == "last":
        return torch.full((n_seq, 1), seq_len - 1, dtype=torch.long)
    if mode == "all":
        return torch.arange(seq_len, dtype=torch.long).expand(n_seq, seq_len).clone()
    if n > seq_len:
        raise InputError(f"--activation-positions sample:{n}: more positions than the "
                         f"sequence length {seq_len}")
    gen = torch.Generator().manual_seed(int(seed))
    rows = [torch.randperm(seq_len, generator=gen)[:n].sort().values for _ in range(n_seq)]
    return torch.stack(rows)


def token_positions(positions: torch.Tensor) -> torch.Tensor:
    """(samples, 2) rows (sequence, position) in the order activations are stored."""
    n_seq, per = positions.shape
    seq = torch.arange(n_seq, dtype=torch.long).repeat_interleave(per)
    return torch.stack([seq, positions.reshape(-1)], dim=1)


def gather_rows(out: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """out (c, T, F) of sequences whose kept positions are positions (c, P) -> (c·P, F)."""
    idx = torch.arange(out.shape[0], device=out.device)[:, None]
    return out[idx, positions.to(out.device)].reshape(-1, out.shape[-1])


class Recorder:
    """Forward hooks keeping, for the sequences of the current chunk, the outputs of `modules`
    at the kept positions (the model is run on chunks of the batch: set `start`/`stop` to the
    chunk's sequence range before each forward pass). `outputs` maps a module's key to a
    function giving the sites its output holds ({site: tensor}, e.g. Q, K and V of a fused
    projection); by default a module gives one site, its key. A module returning a tuple (a
    transformers decoder block) gives its first element."""

    def __init__(self, modules: Mapping[str, torch.nn.Module], kept: torch.Tensor,
                 outputs: Mapping[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]]
                 | None = None):
        self.kept = kept
        self.start = self.stop = 0
        self.outputs = dict(outputs or {})
        self.acts: dict[str, list[torch.Tensor]] = {}
        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_m, _inp, out):
            if isinstance(out, tuple):
                out = out[0]
            rows = self.kept[self.start:self.stop]
            split = self.outputs.get(name)
            for site, t in (split(out) if split else {name: out}).items():
                self.acts.setdefault(site, []).append(gather_rows(t.detach(), rows).float().cpu())
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def result(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The saved layout (module docstring), plus `batch_tokens`: the batch itself, so that
        two checkpoints' rows can be checked to be the same tokens."""
        out = {n: torch.cat(v) for n, v in self.acts.items()}
        out["token_positions"] = token_positions(self.kept)
        out["batch_tokens"] = batch.detach().cpu().to(torch.int64)
        return out


def recorded_modules(model: torch.nn.Module, linear_types: tuple[type, ...] = (torch.nn.Linear,)
                     ) -> dict[str, torch.nn.Module]:
    """The modules whose outputs are kept: every linear module (`linear_types`) by name and
    each block as `layers.<i>` (its output is the residual stream)."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, linear_types)}
    mods.update({f"layers.{i}": b for i, b in enumerate(getattr(model, "layers", []))})
    return mods


@torch.no_grad()
def forward_activations(model: torch.nn.Module, batch: torch.Tensor, positions: str = "last",
                        seed: int = 0, chunk: int = 8, *,
                        sites: tuple[Mapping[str, torch.nn.Module], Mapping] | None = None,
                        call: Callable[[torch.Tensor], object] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Activations of `model` (eval mode) on a fixed token batch (n_seq, T + 1), in the saved
    layout, computed at analysis time for checkpoints that carry none. `sites`: (modules,
    outputs) for `Recorder` (default: `recorded_modules`); `call`: how the model is run on
    token ids (default model(ids))."""
    kept = select_positions(positions, batch.shape[0], batch.shape[1] - 1, seed)
    model.eval()
    modules, outputs = sites if sites is not None else (recorded_modules(model), None)
    rec = Recorder(modules, kept, outputs)
    run_model = call or model
    try:
        device = next(model.parameters()).device
        for start in range(0, batch.shape[0], chunk):
            rec.start, rec.stop = start, min(start + chunk, batch.shape[0])
            run_model(batch[rec.start:rec.stop, :-1].to(device))
    finally:
        rec.remove()
    return rec.result(batch)


# ----------------------------------------------------------------------------------------
# Hugging Face checkpoints: transformers' own model class, the checkpoint's own tokenizer


def hf_sites(model: torch.nn.Module, family: str, n_heads: int
             ) -> tuple[dict[str, torch.nn.Module], dict[str, Callable]]:
    """(modules, outputs) for `Recorder` on a transformers causal LM of an architecture family
    (dynlab.sources.arch.HF_ACTIVATION_SITES): each decoder block as `layers.<i>` (its output,
    the residual stream before any final norm) and each block module under dynlab's site
    names (`layers.<i>.attention.q_proj`, …; a fused Q/K/V projection gives three sites)."""
    from dynlab.sources.arch import HF_ACTIVATION_SITES, split_output

    where = HF_ACTIVATION_SITES.get(family)
    if where is None:
        raise InputError(f"--activations-data: no activation sites known for the {family} "
                         f"architecture (known: {', '.join(HF_ACTIVATION_SITES)})")
    blocks = getattr(model.base_model, where.blocks)
    modules: dict[str, torch.nn.Module] = {}
    outputs: dict[str, Callable] = {}
    for i, block in enumerate(blocks):
        modules[f"layers.{i}"] = block
        for native, ours in where.modules.items():
            key = f"layers.{i}.{native}"
            modules[key] = block.get_submodule(native)
            names = tuple(f"layers.{i}.{site}" for site in ours)
            kind = where.split.get(native)
            outputs[key] = (lambda out, names=names, kind=kind:
                            dict(zip(names, split_output(kind, out, n_heads), strict=True)))
    return modules, outputs


def hf_data_batch(tokenizer, context: int, data: str, n_seq: int,
                  seq_len: int | None = None) -> torch.Tensor:
    """A fixed batch (n_seq, seq_len + 1) of `data` (.txt, .jsonl or `default`) in a
    transformers tokenizer: the first n_seq windows of [sep] doc_1 [sep] doc_2 …, sep the
    tokenizer's end-of-sequence token (else its beginning-of-sequence token); seq_len
    defaults to min(128, the model's context)."""
    seq_len = int(seq_len or min(128, context))
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else \
        tokenizer.bos_token_id
    if sep is None:
        raise InputError(f"--activations-data {data}: the checkpoint's tokenizer has neither an "
                         "end- nor a beginning-of-sequence token to separate documents")
    ids: list[int] = []
    need = n_seq * (seq_len + 1)
    for doc in read_documents(data):
        ids += [sep] + list(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise InputError(f"--activations-data {data}: {len(ids)} tokens in the checkpoint's "
                         f"tokenizer, fewer than {n_seq} windows of {seq_len + 1}")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seq, seq_len + 1)


def read_documents(data: str) -> list[str]:
    """The documents of --activations-data: a .txt / .jsonl file, or `default` (the embedded
    grammar corpus)."""
    from dynlab.data.documents import default_documents, read_text_documents

    if data == "default":
        return default_documents(2000, seed=0)
    path = Path(data)
    if not path.is_file() or path.suffix not in (".txt", ".jsonl"):
        raise InputError(f"--activations-data {data}: expected a .txt or .jsonl file, or "
                         "'default'")
    return read_text_documents(path)


def data_batch(run: Run, data: str, n_seq: int, seq_len: int | None = None) -> torch.Tensor:
    """A fixed batch (n_seq, seq_len + 1) of `data` (a .txt / .jsonl file, or `default`: the
    embedded grammar corpus) in the run's tokenizer: the first n_seq windows of the stream
    [eot] doc_1 [eot] doc_2 …; seq_len defaults to the run's training seq_len, capped at the
    model's context."""
    from dynlab.data.tokenizer import encode_documents, load_tokenizer

    train = run.config.get("train", {}) if isinstance(run.config, Mapping) else {}
    model = run.config.get("model", {}) if isinstance(run.config, Mapping) else {}
    context = int(model.get("max_seq_len", 128))
    seq_len = int(seq_len or min(int(train.get("seq_len") or 128), context))
    if seq_len > context:
        raise InputError(f"--activations-seq-len {seq_len} exceeds the model's context "
                         f"{context} ({run.path})")
    docs = read_documents(data)
    tokens = encode_documents(load_tokenizer(run.path / "tokenizer.json"), docs)
    need = n_seq * (seq_len + 1)
    if tokens.size < need:
        raise InputError(f"--activations-data {data}: {tokens.size} tokens in {run.name}'s "
                         f"tokenizer, fewer than {n_seq} windows of {seq_len + 1}")
    return torch.from_numpy(tokens[:need].copy()).view(n_seq, seq_len + 1)


# ----------------------------------------------------------------------------------------
# Analysis: per checkpoint, each layer's residual stream and linear-module outputs

#: the act_site coordinate: the residual stream after the block, then the block's modules
SITES: tuple[str, ...] = ("residual",) + LAYER_MATRICES
#: comparative indices, each f(X, Y) of two activation matrices with the same rows
COMPARATIVE: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], str]] = {
    "cka": (R.linear_cka, "linear CKA, biased HSIC estimator (Kornblith et al. 2019)"),
    "cka_debiased": (R.debiased_cka, "linear CKA, unbiased HSIC estimator (Song et al. 2012)"),
    "svcca": (R.svcca, "SVCCA: mean canonical correlation of the 99%-variance SVD "
              "reductions (Raghu et al. 2017)"),
    "pwcca": (R.pwcca, "projection-weighted CCA (Morcos et al. 2018)"),
}
#: under the `pico` convention `cka` and `pwcca` are pico-analyze's (float32, its reference
#: CCA code); `cka_debiased` and `svcca`, which pico-analyze lacks, stay dynlab's
PICO_COMPARATIVE: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], str]] = {
    "cka": (R.pico_linear_cka, "linear CKA, biased HSIC estimator, float32 (pico-analyze's)"),
    "pwcca": (R.pico_pwcca, "projection-weighted CCA as pico-analyze computes it"),
}


def comparative(convention: str = "dynlab"
                ) -> dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], str]]:
    """The comparative indices of a store's convention (dynlab.analysis.conventions): the same
    variables, with pico-analyze's CKA and PWCCA under `pico`."""
    return {**COMPARATIVE, **PICO_COMPARATIVE} if convention == "pico" else dict(COMPARATIVE)

#: geometry of one activation matrix
GEOMETRY: dict[str, tuple[Callable[[np.ndarray], float], str]] = {
    "anisotropy": (R.anisotropy, "mean cosine similarity between samples' representations "
                   "(Ethayarajh 2019)"),
    "isoscore": (R.isoscore, "IsoScore of the representations, independent of the mean "
                 "(Rudman et al. 2022)"),
}
TARGET_HELP = "final (or latest), first, previous, STEP or RUN@STEP (comma list for several)"


def site_key(layer: int, site: str) -> str:
    return f"layers.{layer}" if site == "residual" else f"layers.{layer}.{site}"


def activation_matrix(acts: Mapping[str, torch.Tensor], layer: int, site: str
                      ) -> np.ndarray | None:
    """(samples, features) float64 of one site, or None when the checkpoint lacks it."""
    t = acts.get(site_key(layer, site))
    return None if t is None else t.detach().to(torch.float64).numpy()


def centred_spectrum(x: np.ndarray) -> np.ndarray:
    """Singular values of the column-centred activations (float64), k = min(n − 1, p): the
    centred rows span at most n − 1 dimensions, so the last of min(n, p) is structurally 0
    when n ≤ p and is left out (the rank bound of PER is k)."""
    n, p = x.shape
    k = max(0, min(n - 1, p))
    if k == 0:
        return np.empty(0)
    s = spectra.svdvals(torch.from_numpy(R.centre(x))[None], dtype=torch.float64)[0]
    return s[:k].numpy()


def geometry_region(acts: Mapping[str, torch.Tensor], n_layers: int, metrics: Sequence[str],
                    n_sv: int) -> dict[str, np.ndarray]:
    """act_sigma, act_<metric> (spectral, from σ of the centred matrix), anisotropy and
    isoscore of every (layer, site) of one checkpoint; NaN where a site is absent."""
    from dynlab.analysis.recompute import spectrum_metric

    shape = (n_layers, len(SITES))
    sigma = np.full(shape + (n_sv,), np.nan)
    max_dim = np.ones(shape)
    out = {name: np.full(shape, np.nan) for name in GEOMETRY}
    for layer in range(n_layers):
        for j, site in enumerate(SITES):
            x = activation_matrix(acts, layer, site)
            if x is None:
                continue
            s = centred_spectrum(x)
            sigma[layer, j, : s.size] = s[:n_sv]
            max_dim[layer, j] = max(x.shape)
            for name, (fn, _) in GEOMETRY.items():
                out[name][layer, j] = fn(x)
    sig_t, dim_t = torch.from_numpy(sigma), torch.from_numpy(max_dim)
    for m in metrics:
        out[f"act_{m}"] = spectrum_metric(m, sig_t, dim_t, eps=ACT_EPS).numpy()
    out["act_sigma"] = sigma
    out["act_max_dim"] = np.where(np.isnan(sigma[..., 0]), np.nan, max_dim)
    return out


def comparison_region(acts: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                      n_layers: int, convention: str = "dynlab") -> dict[str, np.ndarray]:
    """CKA (both estimators), SVCCA and PWCCA of every (layer, site) against the same site of
    the target checkpoint, under `convention` (`comparative`); NaN where either lacks it."""
    shape = (n_layers, len(SITES))
    indices = comparative(convention)
    out = {name: np.full(shape, np.nan) for name in indices}
    for layer in range(n_layers):
        for j, site in enumerate(SITES):
            x, y = activation_matrix(acts, layer, site), activation_matrix(target, layer, site)
            if x is None or y is None:
                continue
            for name, (fn, _) in indices.items():
                out[name][layer, j] = fn(x, y)
    return out


def same_samples(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two checkpoints' activations hold the same rows: equal token positions and,
    when both record their batch, equal tokens."""
    for key, required in (("token_positions", True), ("batch_tokens", False)):
        pa, pb = a.get(key), b.get(key)
        if pa is None or pb is None:
            if required:
                return False
            continue
        if pa.shape != pb.shape or not bool(torch.equal(pa, pb)):
            return False
    return True


# ----------------------------------------------------------------------------------------
# Targets


def parse_targets(spec: str | Sequence[str] | None) -> list[str]:
    """'final,previous' -> ['final', 'previous']; each final (or its synonym latest), first,
    previous, an integer STEP or RUN@STEP. InputError otherwise."""
    if spec is None:
        return ["final"]
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = ["final" if s == "latest" else s for s in items if s]
    if not items:
        raise InputError(f"--target: expected {TARGET_HELP}, got nothing")
    for item in items:
        step = item.rsplit("@", 1)[-1]
        if item in ("final", "first", "previous"):
            continue
        if step.isdigit() and ("@" not in item or item.split("@")[0]):
            continue
        raise InputError(f"--target: expected {TARGET_HELP}, got {item!r}")
    return list(dict.fromkeys(items))


def check_targets(targets: Sequence[str], runs: Sequence[Run]) -> None:
    """InputError unless every STEP / RUN@STEP target names a checkpoint that exists: a bare
    STEP in every run, RUN@STEP in that run. The message lists the steps there are."""
    by_name = {r.name: r for r in runs}
    for target in targets:
        if target in ("final", "first", "previous"):
            continue
        name, _, at = target.rpartition("@")
        if name and name not in by_name:
            raise InputError(f"--target {target}: run {name!r} is not among the analysed runs "
                             f"({', '.join(by_name)})")
        for run in [by_name[name]] if name else runs:
            steps = [c.step for c in run.checkpoints]
            if int(at) not in steps:
                raise InputError(f"--target {target}: run {run.name!r} has no checkpoint at "
                                 f"step {int(at)} (steps: {', '.join(map(str, steps))}; or "
                                 "final, first, previous)")


def source_reader(ckpt: Checkpoint):
    """The reader of a non-dynlab checkpoint (through a --grads-data wrapper), or None."""
    reader = getattr(ckpt, "reader", None)
    inner = getattr(reader, "inner", None)
    return getattr(inner, "reader", None) if inner is not None else reader


def has_saved(ckpt: Checkpoint) -> bool:
    """Whether a checkpoint carries activations: dynlab's activations.safetensors, or a
    reader's own (pico-train's learning_dynamics/val_activations.pt)."""
    reader = source_reader(ckpt)
    if reader is not None and hasattr(reader, "has_activations"):
        return reader.has_activations(ckpt)
    return ckpt.has("activations.safetensors")


def load_saved(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """A checkpoint's saved activations in the layout of the module docstring."""
    reader = source_reader(ckpt)
    if reader is not None and hasattr(reader, "saved_activations"):
        return reader.saved_activations(ckpt)
    return load_tensors(ckpt.file("activations.safetensors"))


def resolve_target(target: str, run: Run, step: int, runs: Mapping[str, Run],
                   available: Callable[[Checkpoint], bool] = has_saved) -> Checkpoint | None:
    """The checkpoint a (run, step) is compared with, or None (no such checkpoint: NaN)."""
    with_acts = [c for c in run.checkpoints if available(c)]
    if not with_acts:
        return None
    if target == "final":
        return with_acts[-1]
    if target == "first":
        return with_acts[0]
    if target == "previous":
        before = [c for c in with_acts if c.step < step]
        return before[-1] if before else None
    name, _, at = target.rpartition("@")
    other = runs.get(name) if name else run
    if other is None:
        raise InputError(f"--target {target}: run {name!r} is not among the analysed runs "
                         f"({', '.join(runs)})")
    found = [c for c in other.checkpoints if c.step == int(at) and available(c)]
    return found[0] if found else None


# ----------------------------------------------------------------------------------------
# Into the store


def activation_steps(runs: Sequence[Run]) -> bool:
    """Whether any checkpoint of these runs carries activations."""
    return any(has_saved(c) for r in runs for c in r.checkpoints)


def act_sv_size(runs: Sequence[Run]) -> int:
    """Width of act_sv: no activation matrix has more features than max(d_model, hidden)."""
    return max(max(r.spec.d_model, r.spec.activation_hidden_dim, r.spec.n_kv_heads
                   * r.spec.head_dim) for r in runs)


def activation_variables(metrics: Sequence[str], convention: str = "dynlab"
                         ) -> dict[str, tuple[tuple[str, ...], str]]:
    """Variable -> (dims, long name) of the activation tables."""
    base = ("run", "step", "layer", "act_site")
    out: dict[str, tuple[tuple[str, ...], str]] = {
        f"act_{m}": (base, f"{metrics_mod.METRICS[m].long_name} of the centred activations")
        for m in metrics}
    out["act_sigma"] = (base + ("act_sv",), "singular values of the centred activations "
                        "(samples × features), descending, NaN past min(n − 1, p)")
    out["act_max_dim"] = (base, "max(samples, features) of each activation matrix (the "
                          "numerical-zero tolerance of metrics recomputed from act_sigma)")
    for name, (_, long_name) in GEOMETRY.items():
        out[name] = (base, long_name)
    for name, (_, long_name) in comparative(convention).items():
        out[name] = (("run", "target", "step", "layer", "act_site"), long_name + " against "
                     "the target checkpoint's activations at the same site")
    out["act_analyzed"] = (("run", "step"), "1 once the activation metrics of a checkpoint "
                           "are written")
    out["cmp_analyzed"] = (("run", "target", "step"), "1 once the comparisons of a checkpoint "
                           "against a target are written")
    return out


def spectrum_metrics(metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if not metrics_mod.METRICS[m].entrywise]


def ensure_activation_store(path: Path, runs: Sequence[Run], metrics: Sequence[str],
                            targets: Sequence[str]) -> None:
    """Create the activation variables (and the act_site, act_sv, target coordinates) in an
    analysis store, or grow the target coordinate by new targets."""
    from dynlab.analysis import store as S

    group = S.open_group_for_update(path)
    n_sv = act_sv_size(runs)
    sizes = {"run": group["run"].shape[0], "step": group["step"].shape[0],
             "layer": group["layer"].shape[0], "act_site": len(SITES), "act_sv": n_sv,
             "target": len(targets)}
    if "act_site" in group:
        if group["act_sv"].shape[0] < n_sv:
            raise S.StoreError(f"{path}: activation features up to {n_sv} do not fit the "
                               f"store's act_sv ({group['act_sv'].shape[0]}); use another -o")
        stored = [str(t) for t in group["target"][...]]
        new = [t for t in targets if t not in stored]
        if new:
            S.grow_dimension(path, "target", S.string_coordinate(new, "target"))
        sizes["target"] = len(stored) + len(new)
        sizes["act_sv"] = group["act_sv"].shape[0]
    else:
        with S.quiet_zarr():
            S.create_variable(group, "act_site", ("act_site",),
                              S.string_coordinate(SITES, "act_site"))
            S.create_variable(group, "act_sv", ("act_sv",), np.arange(n_sv))
            S.create_variable(group, "target", ("target",),
                              S.string_coordinate(targets, "target"))
    group = S.open_group_for_update(path)
    with S.quiet_zarr():
        convention = str(group.attrs.get("convention", "dynlab"))
        for name, (dims, long_name) in activation_variables(spectrum_metrics(
                metrics), convention).items():
            if name in group:
                continue
            shape = tuple(sizes[d] for d in dims)
            chunks = tuple(1 if d in ("run", "step", "target") else sizes[d] for d in dims)
            flag = name.endswith("_analyzed")
            S.create_variable(group, name, dims, shape=shape, chunks=chunks,
                              dtype="int8" if flag else "float64", fill_value=0 if flag
                              else np.nan, attrs={"long_name": long_name})
    S.consolidate(path)


def check_token_ids(batch: torch.Tensor, model: torch.nn.Module, data: str,
                    where: object) -> None:
    """InputError unless every token id of `batch` has a row in the model's input embedding
    (a tokenizer with more ids than the model's vocabulary does not belong to it)."""
    rows = model.get_input_embeddings().num_embeddings if hasattr(
        model, "get_input_embeddings") else model.embedding_proj.num_embeddings
    top = int(batch.max()) if batch.numel() else -1
    if top >= rows:
        raise InputError(f"--activations-data {data}: the tokenizer gives token id {top}, but "
                         f"the model at {where} has {rows} embedding rows; its tokenizer does "
                         "not belong to this model")


def computed_activations(run: Run, ckpt: Checkpoint, data: str, n_seq: int, positions: str,
                         batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's activations computed now on the run's fixed batch of `data` (made once
    per run and kept in `batches`): dynlab's PicoDecoder for a dynlab run, transformers' own
    class and the checkpoint's own tokenizer for a Hugging Face checkpoint."""
    reader = source_reader(ckpt)
    if reader is None:
        from dynlab.model import load_checkpoint_model

        if run.name not in batches:
            batches[run.name] = data_batch(run, data, n_seq)
        model = load_checkpoint_model(ckpt.path)
        check_token_ids(batches[run.name], model, data, ckpt.path)
        return forward_activations(model, batches[run.name], positions)
    fmt = getattr(reader, "format", "?")
    if fmt not in ("hf", "hf-hub"):
        raise InputError(f"--activations-data: {run.name} is a {fmt} run; activations are "
                         "computed for dynlab runs and Hugging Face checkpoints only (a "
                         "pico-train run's own saved activations are read without "
                         "--activations-data)")
    from dynlab.sources.arch import ADAPTERS, HF_ACTIVATION_SITES

    family = ADAPTERS[reader.model_type].family
    if family not in HF_ACTIVATION_SITES:
        raise InputError(f"--activations-data: {run.name} is a {family} checkpoint in Hugging "
                         "Face format, which transformers has no class for; activations are "
                         f"computed for {', '.join(HF_ACTIVATION_SITES)} checkpoints")
    if fmt == "hf-hub":  # fetched again (the parameter pass released it), released at once
        model_dir = Path(reader.fetch(ckpt.revision))
        try:
            if run.name not in batches:
                reader.fetch_tokenizer(ckpt.revision)
            model = hf_model(model_dir, f"--activations-data {data}")
            tok = (hf_tokenizer([model_dir], f"--activations-data {data}")
                   if run.name not in batches else None)
        finally:
            reader.release(ckpt)
    else:
        model_dir = Path(ckpt.path)
        model = hf_model(model_dir, f"--activations-data {data}")
        tok = (hf_tokenizer([model_dir, run.path], f"--activations-data {data}")
               if run.name not in batches else None)
    if run.name not in batches:
        batches[run.name] = hf_data_batch(tok, hf_context(model), data, n_seq)
    check_token_ids(batches[run.name], model, data, ckpt.path)
    sites = hf_sites(model, family, run.spec.n_heads)
    return forward_activations(model, batches[run.name], positions, sites=sites,
                               call=lambda ids: model(input_ids=ids))


def analyze_activations(runs: Sequence[Run], path: Path, metrics: Sequence[str],
                        targets: str | Sequence[str] | None = None, *,
                        progress: bool = False, data: str | None = None,
                        positions: str = "sample:16", n_seq: int = 16,
                        steps: Mapping[str, Sequence[int]] | None = None) -> int:
    """Activation metrics of every checkpoint with activations into the store at `path` (made
    by dynlab analyze for these runs), against each target. Resumable: (run, step) cells and
    (run, target, step) comparisons already flagged are skipped. Returns the checkpoints
    written.

    data: compute every checkpoint's activations now, on a fixed batch of n_seq sequences of
    this data (`data_batch`) at `positions` (seeded with 0), instead of reading saved ones —
    for runs saved without activations. The store records the source (`activations_source`
    attribute) and refuses another one later. steps: run -> the steps to analyse (default
    every checkpoint); targets are found among all of a run's checkpoints."""
    import warnings

    from dynlab.analysis import store as S

    names = parse_targets(targets)
    check_targets(names, runs)
    metrics = spectrum_metrics(metrics)
    source = "saved" if data is None else f"computed: {data}, {n_seq} sequences, {positions}"
    if data is not None:
        parse_positions(positions)
    ensure_activation_store(path, runs, metrics, names)
    group = S.open_group_for_update(path)
    stored_source = group.attrs.get("activations_source")
    if stored_source is not None and stored_source != source:
        raise S.StoreError(f"{path}: its activation metrics come from {stored_source!r}, not "
                           f"{source!r}; use another -o path")
    group.attrs.update({"activations_source": source})
    convention = str(group.attrs.get("convention", "dynlab"))
    batches: dict[str, torch.Tensor] = {}

    def available(ckpt: Checkpoint) -> bool:
        return data is not None or has_saved(ckpt)
    run_index = {str(r): i for i, r in enumerate(group["run"][...])}
    step_index = {int(s): j for j, s in enumerate(group["step"][...])}
    target_index = {str(t): k for k, t in enumerate(group["target"][...])}
    n_layers, n_sv = group["layer"].shape[0], group["act_sv"].shape[0]
    done = np.asarray(group["act_analyzed"][...])
    cmp_done = np.asarray(group["cmp_analyzed"][...])
    by_name = {r.name: r for r in runs}
    cache: dict[Path, dict[str, torch.Tensor]] = {}

    runs_by_path = {c.path: r for r in runs for c in r.checkpoints}

    def load(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        if ckpt.path not in cache:
            if len(cache) > 4:
                cache.pop(next(iter(cache)))
            if data is None:
                cache[ckpt.path] = load_saved(ckpt)
            else:
                cache[ckpt.path] = computed_activations(runs_by_path[ckpt.path], ckpt, data,
                                                        n_seq, positions, batches)
        return cache[ckpt.path]

    written = 0
    for run in runs:
        i = run_index[run.name]
        for ckpt in run.checkpoints:
            if not available(ckpt) or (steps is not None and
                                       ckpt.step not in set(steps.get(run.name, ()))):
                continue
            j = step_index[ckpt.step]
            todo = [t for t in names if not cmp_done[i, target_index[t], j]]
            if done[i, j] and not todo:
                continue
            acts = load(ckpt)
            if not done[i, j]:
                for name, arr in geometry_region(acts, n_layers, metrics, n_sv).items():
                    group[name][i, j] = arr
                group["act_analyzed"][i, j] = 1
            for t in todo:
                k = target_index[t]
                other = resolve_target(t, run, ckpt.step, by_name, available)
                if other is not None:
                    tacts = load(other)
                    if same_samples(acts, tacts):
                        for name, arr in comparison_region(acts, tacts, n_layers,
                                                           convention).items():
                            group[name][i, k, j] = arr
                    else:
                        warnings.warn(f"{ckpt.path}: its activations and those of target "
                                      f"{t} ({other.path}) hold different token positions; "
                                      "their comparison is NaN", RuntimeWarning, stacklevel=2)
                group["cmp_analyzed"][i, k, j] = 1
            written += 1
    S.consolidate(path)
    return written
