"""Hugging Face Hub repositories as runs: `hf://ORG/NAME`, one checkpoint per revision.

Revisions are branches or tags that name a step (`step1000`, `step_1000`, `checkpoint-1000`,
`global_step1000`), given as a comma list and/or ranges `stepA:stepB:K` (A, A+K, … up to B
inclusive), e.g. `step0,step1000:step143000:1000`. Without `--revisions`, every branch
matching `step<N>` (huggingface_hub's `list_repo_refs`; offline, the refs in the local cache).

Each revision is fetched with huggingface_hub's `snapshot_download` into its cache (default
`HF_HUB_CACHE`, or `cache_dir`), only config.json and the safetensors weights (or, when a
revision has none, the `.bin` weights). Revision t+1 is fetched while t is analysed and each
is deleted (huggingface_hub's own cache deletion) once analysed, so at most two revisions
are on disk; `keep_downloads` keeps them, and a revision that was in the cache before dynlab
started is never deleted. With `HF_HUB_OFFLINE=1` nothing goes to the network: revisions
come from the cache, and one that is not there is a clear error.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dynlab.runs.checkpoints import Keep, ModelSpec, read_json
from dynlab.sources.arch import ADAPTERS, adapter_for
from dynlab.sources.base import (
    Grads,
    Reader,
    SourceCheckpoint,
    SourceError,
    SourceRun,
    Tensors,
)
from dynlab.sources.hf import convert_model_dir, source_config, step_of

URL = re.compile(r"^hf://([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?/?$")
PICO_MODEL_COMMIT = re.compile(r"^Saving HF Model -- Step (\d+)$")
PICO_LD_COMMIT = re.compile(r"^Saving Learning Dynamics Data \(val\) -- Step (\d+)$")
LD_GRADIENTS = ["learning_dynamics/*_gradients.pt"]
STEP_BRANCH = re.compile(r"^step\d+$")
WEIGHTS = ["config.json", "*.safetensors", "*.safetensors.index.json"]
BIN_WEIGHTS = ["config.json", "*.bin", "*.bin.index.json"]
#: a checkpoint's own tokenizer (fetched only for --activations-data)
TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.json", "merges.txt", "tokenizer.model"]
MAX_ON_DISK = 2


def parse_url(url: str) -> tuple[str, str | None]:
    """hf://ORG/NAME -> (ORG/NAME, None); hf://ORG/NAME@BRANCH -> (ORG/NAME, BRANCH)."""
    m = URL.match(url)
    if not m:
        raise SourceError(f"{url}: expected hf://ORG/NAME (or hf://ORG/NAME@BRANCH for a pico "
                          "run saved one commit per checkpoint)")
    return m.group(1), m.group(2)


def pico_commits(repo_id: str, branch: str) -> tuple[dict[int, str], dict[int, str]]:
    """A pico run on the Hub (one branch per run, one commit per save): step -> commit of
    each "Saving HF Model -- Step N" and each "Saving Learning Dynamics Data (val) -- Step N"
    commit (the newest one of a step), from the branch's history (`list_repo_commits`)."""
    hub = _hub()
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if offline():
        raise SourceError(f"hf://{repo_id}@{branch}: a pico run's steps come from its commit "
                          "history, which needs the Hub (HF_HUB_OFFLINE is set)")
    try:
        commits = hub.HfApi().list_repo_commits(repo_id, revision=branch)
    except RevisionNotFoundError:
        raise SourceError(f"hf://{repo_id}: branch {branch} does not exist") from None
    except RepositoryNotFoundError:
        raise SourceError(f"hf://{repo_id}: no such repository on the Hugging Face Hub (or it "
                          "is private and no token is set)") from None
    except Exception as e:
        raise SourceError(f"hf://{repo_id}@{branch}: the Hugging Face Hub cannot be reached "
                          f"({type(e).__name__})") from None
    models: dict[int, str] = {}
    ld: dict[int, str] = {}
    for c in commits:  # newest first
        for pattern, found in ((PICO_MODEL_COMMIT, models), (PICO_LD_COMMIT, ld)):
            m = pattern.match((c.title or "").strip())
            if m and int(m.group(1)) not in found:
                found[int(m.group(1))] = c.commit_id
    if not models:
        raise SourceError(f"hf://{repo_id}@{branch}: no commit titled 'Saving HF Model -- Step N'")
    return models, ld


@dataclass(frozen=True)
class RevisionRange:
    """`stepA:stepB:K` of --revisions: the revisions `<prefix>N` with A <= N <= B and N - A
    a multiple of K. It is never expanded into its members (a range may span 10^9 steps):
    it is matched against the revisions that exist (`select_revisions`)."""

    text: str
    prefix: str
    start: int
    stop: int
    every: int

    def __contains__(self, step: object) -> bool:
        return (isinstance(step, int) and self.start <= step <= self.stop
                and (step - self.start) % self.every == 0)

    def count(self) -> int:
        """How many steps the range spans."""
        return (self.stop - self.start) // self.every + 1


def revision_items(spec: str) -> list[str | RevisionRange]:
    """The items of a --revisions comma list: revision names, and ranges `stepA:stepB:K`
    (RevisionRange). SourceError for a malformed range or an empty list."""
    out: list[str | RevisionRange] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if ":" not in item:
            out.append(item)
            continue
        parts = item.split(":")
        if len(parts) != 3:
            raise SourceError(f"--revisions {item!r}: a range is stepA:stepB:K")
        a, b = (step_of(p) if step_of(p) is not None else _int(p, item) for p in parts[:2])
        k = _int(parts[2], item)
        if k <= 0 or b < a:
            raise SourceError(f"--revisions {item!r}: needs A <= B and a step K > 0")
        prefix = re.match(r"^(\D*)", parts[0]).group(1) or "step"
        out.append(RevisionRange(item, prefix, a, b, k))
    if not out:
        raise SourceError(f"--revisions {spec!r}: no revision named")
    return out


#: the most revisions `parse_revisions` writes out
MAX_LISTED = 100_000


def parse_revisions(spec: str) -> list[str]:
    """'step0,step1000:step3000:1000' -> [step0, step1000, step2000, step3000] (ranges are
    inclusive of their end when it lies on the grid; duplicates removed, order kept). A list
    of more than MAX_LISTED revisions is refused; the analysis itself never writes a range
    out (`select_revisions`)."""
    items = revision_items(spec)
    total = sum(i.count() if isinstance(i, RevisionRange) else 1 for i in items)
    if total > MAX_LISTED:
        raise SourceError(f"--revisions {spec!r}: names {total:,} revisions, more than "
                          f"{MAX_LISTED:,} can be listed")
    out: list[str] = []
    for item in items:
        if isinstance(item, RevisionRange):
            out.extend(f"{item.prefix}{n}" for n in range(item.start, item.stop + 1, item.every))
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def select_revisions(spec: str, known: Sequence[str], where: str) -> list[str]:
    """The revisions of `known` (those that exist) that --revisions `spec` names, in the
    order named: every listed name must exist, and every range must match at least one
    (SourceError naming what does not, `where` saying where it was looked for). Time and
    memory grow with len(known), not with the width of a range."""
    out: list[str] = []
    missing: list[str] = []
    known_set = set(known)
    for item in revision_items(spec):
        if isinstance(item, str):
            (out if item in known_set else missing).append(item)
            continue
        hits = sorted((r for r in known if step_of(r) in item
                       and r == f"{item.prefix}{step_of(r)}"), key=step_of)
        if not hits:
            steps = sorted(r for r in known if step_of(r) is not None)
            shown = ", ".join(steps[:5]) + (" …" if len(steps) > 5 else "")
            raise SourceError(f"--revisions {item.text!r}: no revision in this range exists "
                              f"{where} (there are: {shown or 'none'})")
        out.extend(hits)
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise SourceError(f"revision(s) {shown} do not exist {where}")
    return list(dict.fromkeys(out))


def select_steps(spec: str, steps: Sequence[int], where: str) -> list[int]:
    """The steps of `steps` (those a pico run's branch has commits for) that --revisions
    `spec` names (stepN or N, and ranges), sorted; SourceError for a named step without a
    commit or a range that matches none."""
    keep: set[int] = set()
    missing: list[int] = []
    for item in revision_items(spec):
        if isinstance(item, RevisionRange):
            hits = [s for s in steps if s in item]
            if not hits:
                raise SourceError(f"{where}: --revisions {item.text!r}: no 'Saving HF Model' "
                                  "commit in this range")
            keep.update(hits)
            continue
        step = step_of(item) if step_of(item) is not None else _int(item, item)
        (keep.add(step) if step in steps else missing.append(step))
    if missing:
        raise SourceError(f"{where}: no 'Saving HF Model' commit for step(s) "
                          f"{', '.join(map(str, sorted(missing)[:5]))}")
    return sorted(keep)


def _int(text: str, item: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SourceError(f"--revisions {item!r}: {text!r} is not a step (stepN or N)") from None


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (set in the environment or its constants)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise SourceError("hf:// sources need huggingface_hub: pip install 'dynlab[hf]'") from None
    return huggingface_hub


def repo_folder(repo_id: str, cache_dir: Path) -> Path:
    """The repository's folder in a huggingface_hub cache (models--ORG--NAME)."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def cache_path(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(_hub().constants.HF_HUB_CACHE)


def cached_refs(repo_id: str, cache_dir: Path) -> dict[str, str]:
    """Revision name -> commit of every ref in the local cache whose snapshot is present."""
    refs = repo_folder(repo_id, cache_dir) / "refs"
    out = {}
    if refs.is_dir():
        for f in refs.rglob("*"):
            if f.is_file():
                commit = f.read_text().strip()
                if (repo_folder(repo_id, cache_dir) / "snapshots" / commit).is_dir():
                    out[str(f.relative_to(refs))] = commit
    return out


def remote_refs(repo_id: str) -> list[str]:
    """Branches and tags of a Hub repository (needs the network)."""
    hub = _hub()
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        refs = hub.HfApi().list_repo_refs(repo_id)
    except RepositoryNotFoundError:
        raise SourceError(f"hf://{repo_id}: no such repository on the Hugging Face Hub (or it "
                          "is private and no token is set)") from None
    except Exception as e:  # requests' ConnectionError, timeouts, Hub errors
        raise SourceError(
            f"hf://{repo_id}: the Hugging Face Hub cannot be reached ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); set HF_HUB_OFFLINE=1 to use "
            "revisions already in the local cache"
        ) from None
    return [b.name for b in refs.branches] + [t.name for t in refs.tags]


def resolve_revisions(repo_id: str, spec: str | None, cache_dir: Path) -> list[str]:
    """The revisions to analyse, each checked to exist (online: on the Hub; offline: in the
    local cache), sorted by step."""
    known = list(cached_refs(repo_id, cache_dir)) if offline() else remote_refs(repo_id)
    where = "in the local cache (HF_HUB_OFFLINE is set)" if offline() else "on the Hub"
    if spec is None:
        wanted = [r for r in known if STEP_BRANCH.match(r)]
        if not wanted:
            raise SourceError(f"hf://{repo_id}: no step<N> branch {where}; pass --revisions")
    else:
        try:
            wanted = select_revisions(spec, known, where)
        except SourceError as e:
            raise SourceError(f"hf://{repo_id}: {e}") from None
    bad = [r for r in wanted if step_of(r) is None]
    if bad:
        raise SourceError(f"hf://{repo_id}: revision(s) {', '.join(bad)} do not name a step "
                          "(expected stepN, step_N, checkpoint-N or global_stepN)")
    return sorted(wanted, key=step_of)


class _Downloads:
    """Revisions on disk that dynlab fetched (at most MAX_ON_DISK at a time)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.live: dict[str, Path] = {}
        self.max_live = 0


@dataclass(frozen=True)
class HubReader(Reader):
    """A Hub repository read revision by revision through huggingface_hub's cache."""

    repo_id: str
    model_type: str
    spec: ModelSpec
    cache_dir: Path
    keep_downloads: bool = False
    preexisting: frozenset[str] = frozenset()
    revisions: tuple[str, ...] = ()
    steps: tuple[int, ...] = ()  # when revisions are commits (a pico run); else from names
    ld_revisions: tuple[tuple[int, str], ...] = ()  # pico: step -> learning-dynamics commit
    relora: dict | None = None
    format: str = "hf-hub"
    state: _Downloads = field(default_factory=_Downloads, compare=False, repr=False)

    def checkpoints(self, run_name: str) -> list[SourceCheckpoint]:
        steps = self.steps or tuple(step_of(r) for r in self.revisions)
        return [SourceCheckpoint(run_name, step, Path(f"hf://{self.repo_id}@{r}"),
                                 reader=self, revision=r)
                for r, step in zip(self.revisions, steps, strict=True)]

    def grad_kinds(self) -> tuple[str, ...]:
        return ("grads", "train_grads") if self.ld_revisions else ()

    def grads(self, ckpt: SourceCheckpoint, weights: Tensors,
              kinds: tuple[str, ...] = ("grads", "train_grads")) -> Grads:
        """A pico run's learning-dynamics gradients, from the step's "(val)" commit (which
        holds the step's learning_dynamics/ folder); deleted again unless kept."""
        commit = dict(self.ld_revisions).get(ckpt.step)
        if commit is None:
            return Grads()
        from dynlab.sources.pico import GRAD_FILES, module_key
        from dynlab.sources.tensors import load_torch_tensor_dict

        path = snapshot(self.repo_id, commit, self.cache_dir, LD_GRADIENTS)
        found = {}
        try:
            for kind, name in GRAD_FILES.items():
                f = path / "learning_dynamics" / name
                if kind in kinds and f.is_file():
                    g = {module_key(k): v.clone() for k, v in load_torch_tensor_dict(f).items()}
                    found[kind] = {k: v for k, v in g.items() if k in weights
                                   and tuple(v.shape) == tuple(weights[k].shape)}
        finally:
            if not self.keep_downloads and commit not in self.preexisting:
                delete_revision(self.cache_dir, path.name)
        return Grads(found.get("grads"), found.get("train_grads"))

    @property
    def lora_scale(self) -> float | None:
        return 1.0 if self.relora is not None else None

    def fetch(self, revision: str) -> Path:
        """The revision's snapshot folder, downloaded if needed (waiting while two fetched
        revisions are still on disk)."""
        st = self.state
        with st.cond:
            if revision in st.live:
                return st.live[revision]
            st.cond.wait_for(lambda: len(st.live) < MAX_ON_DISK or self.keep_downloads)
        path = snapshot(self.repo_id, revision, self.cache_dir, WEIGHTS)
        if not any(path.glob("*.safetensors")):
            path = snapshot(self.repo_id, revision, self.cache_dir, BIN_WEIGHTS)
        with st.cond:
            st.live[revision] = path
            st.max_live = max(st.max_live, len(st.live))
        return path

    def fetch_tokenizer(self, revision: str) -> Path:
        """The revision's snapshot folder with its tokenizer files added (those it has)."""
        return snapshot(self.repo_id, revision, self.cache_dir, TOKENIZER)

    def weights(self, ckpt: SourceCheckpoint, keep: Keep = None) -> Tensors:
        """Every tensor, whatever `keep` says: the revision is converted whole."""
        path = self.fetch(ckpt.revision)
        config = read_json(path / "config.json")
        adapter = adapter_for(config, path / "config.json")
        spec = adapter.spec(config, path / "config.json")
        if spec != self.spec:
            raise SourceError(f"hf://{self.repo_id}@{ckpt.revision}: config.json describes "
                              f"another model than the first revision ({spec} vs {self.spec})")
        return convert_model_dir(path, ADAPTERS[self.model_type], spec, config)

    def release(self, ckpt: SourceCheckpoint) -> None:
        st = self.state
        with st.cond:
            path = st.live.pop(ckpt.revision, None)
            st.cond.notify_all()
        if path is None or self.keep_downloads or ckpt.revision in self.preexisting:
            return
        delete_revision(self.cache_dir, path.name)


def snapshot(repo_id: str, revision: str, cache_dir: Path, patterns: list[str]) -> Path:
    hub = _hub()
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                          allow_patterns=patterns,
                                          local_files_only=offline()))
    except RevisionNotFoundError:
        raise SourceError(f"hf://{repo_id}: revision {revision} does not exist") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if offline() else "the Hugging Face Hub cannot be reached")
        raise SourceError(f"hf://{repo_id}@{revision}: not in the local cache {cache_dir} and "
                          f"{why}") from None
    except Exception as e:
        raise SourceError(f"hf://{repo_id}@{revision}: download failed ({type(e).__name__}: "
                          f"{e})") from None


def delete_revision(cache_dir: Path, commit: str) -> None:
    """Delete one cached revision (its snapshot, and blobs no other revision uses) through
    huggingface_hub's cache manager."""
    hub = _hub()
    strategy = hub.scan_cache_dir(cache_dir).delete_revisions(commit)
    strategy.execute()


def preexisting_revisions(repo_id: str, wanted: list[str], cache_dir: Path) -> frozenset[str]:
    """The wanted revisions already in the cache before dynlab fetched anything (never
    deleted)."""
    before = cached_refs(repo_id, cache_dir)
    snapshots = repo_folder(repo_id, cache_dir) / "snapshots"
    return frozenset(r for r in wanted if r in before or (snapshots / r).is_dir())


def open_hub_run(url: str, revisions: str | None, *, keep_downloads: bool = False,
                 cache_dir: str | Path | None = None) -> SourceRun:
    """hf://ORG/NAME (revisions are step branches) or hf://ORG/NAME@BRANCH (a pico run: one
    commit per save; `revisions` then selects steps)."""
    repo_id, branch = parse_url(url)
    cache = cache_path(cache_dir)
    steps: tuple[int, ...] = ()
    ld: tuple[tuple[int, str], ...] = ()
    if branch is None:
        wanted = resolve_revisions(repo_id, revisions, cache)
        name = repo_id
    else:
        models, ld_map = pico_commits(repo_id, branch)
        chosen = sorted(models)
        if revisions is not None:
            chosen = select_steps(revisions, chosen, f"hf://{repo_id}@{branch}")
        wanted = [models[s] for s in chosen]
        steps = tuple(chosen)
        ld = tuple((s, ld_map[s]) for s in chosen if s in ld_map)
        name = f"{repo_id}@{branch}"
    preexisting = preexisting_revisions(repo_id, wanted, cache)
    first = wanted[0]
    path = snapshot(repo_id, first, cache, ["config.json"])
    config = read_json(path / "config.json")  # its weights come when it is analysed
    adapter = adapter_for(config, Path(f"hf://{repo_id}@{first}/config.json"))
    spec = adapter.spec(config, Path(f"hf://{repo_id}@{first}/config.json"))
    relora = dict(config["relora"]) if adapter.family == "pico" and config.get("relora") else None
    reader = HubReader(repo_id, adapter.model_types[0], spec, cache, keep_downloads,
                       preexisting, tuple(wanted), steps, ld, relora)
    cfg = source_config(config, adapter, "hf-hub", f"hf://{repo_id}")
    cfg["source"]["revisions"] = list(wanted)
    if relora is not None:
        cfg["kind"] = "relora"
    return SourceRun(name, Path(f"hf://{repo_id}"), cfg, spec, tuple(reader.checkpoints(name)),
                     reader=reader)
