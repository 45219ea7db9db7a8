"""The study file: a grid of conditions × seeds in one YAML file, read and checked before
anything runs.

    name: mini                         # optional (default: the file's stem)
    seeds: [0, 1, 2, 3, 4]             # distinct integers; every condition runs every seed
    common:                            # `dynlab train` options for every condition
      steps: 600
    conditions:                        # name -> condition
      decoder-micro:
        kind: decoder                  # decoder | relora
        preset: micro                  # optional, as `dynlab train --preset`
        config: decoder-tiny.yaml      # optional `--config` file (relative to the study file)
        scale: micro                   # optional: the size the claims group by (default: preset)
        overrides: {lr: 3.0e-3}        # optional `dynlab train` options (win over common)
    eval:                              # optional evaluation phase (`dynlab eval` options)
      ppl: default                     # default (embedded grammar), none, or a path
      blimp: /data/blimp               # default, none, a path, or nyu-mll/blimp
      limit: 25                        # pairs per UID
      batch_size: 32
    analyze:                           # optional `dynlab analyze` options
      metrics: per,cn,cn_nz
      kinds: weights,grads,updates
    slurm:                             # optional: submitit executor parameters (--slurm)
      cluster: slurm                   # slurm | local | debug (submitit's executors)
      timeout_min: 600

Every (condition, seed) is one run, `OUT/runs/<condition>-s<seed>`. An unknown key, a
duplicated seed, a condition without a kind or with options `dynlab train` refuses raise
InputError naming the file and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynlab.errors import InputError

TOP_KEYS = ("name", "seeds", "common", "conditions", "eval", "analyze", "slurm")
CONDITION_KEYS = ("kind", "preset", "config", "scale", "overrides")
EVAL_KEYS = ("ppl", "blimp", "limit", "batch_size", "uid", "device")
ANALYZE_KEYS = ("metrics", "kinds", "device", "precision", "activations", "target")
CLUSTERS = ("slurm", "local", "debug")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*(-[A-Za-z0-9_.]+)*$")
#: options a study sets itself for every run
#: options of the `dynlab train` command line that are not training options (the runner
#: applies them: `nproc: N` trains a run with N torchrun processes)
LAUNCH_OPTIONS = ("nproc",)
RESERVED = ("seed", "out", "resume", "overwrite", "stop_at", "config", "dry_run")


@dataclass(frozen=True)
class Condition:
    """One condition of the grid: what `dynlab train KIND` gets besides seed and --out."""

    name: str
    kind: str
    scale: str
    options: dict[str, Any]
    config: Path | None = None


@dataclass(frozen=True)
class Unit:
    """One (condition, seed): a run of the study."""

    condition: str
    seed: int
    kind: str
    run: str
    options: dict[str, Any]
    config: Path | None = None


@dataclass(frozen=True)
class Study:
    """A checked study file."""

    path: Path
    name: str
    seeds: tuple[int, ...]
    conditions: tuple[Condition, ...]
    eval: dict[str, Any] | None = None
    analyze: dict[str, Any] = field(default_factory=dict)
    slurm: dict[str, Any] | None = None

    def units(self) -> list[Unit]:
        """Every (condition, seed), seed by seed (conditions in file order within a seed), so
        that a study stopped early has whole seeds: every condition of its first seeds."""
        return [Unit(c.name, s, c.kind, run_name(c.name, s), {**c.options, "seed": s}, c.config)
                for s in self.seeds for c in self.conditions]

    def condition(self, name: str) -> Condition:
        return next(c for c in self.conditions if c.name == name)

    def design(self) -> dict:
        """The grid as JSON (OUT/study.json): what `dynlab study report` needs to read a store."""
        return {"name": self.name, "file": str(self.path), "seeds": list(self.seeds),
                "conditions": [{"name": c.name, "kind": c.kind, "scale": c.scale,
                                "config": None if c.config is None else str(c.config),
                                "options": c.options} for c in self.conditions],
                "runs": {u.run: {"condition": u.condition, "seed": u.seed, "kind": u.kind}
                         for u in self.units()},
                "eval": self.eval, "analyze": self.analyze}


def training_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options `dynlab.train` takes: `options` without LAUNCH_OPTIONS."""
    return {k: v for k, v in options.items() if k not in LAUNCH_OPTIONS}


def run_name(condition: str, seed: int) -> str:
    """The run directory's (and the store's run) name of a (condition, seed)."""
    return f"{condition}-s{seed}"


def _mapping(value: Any, where: str, path: Path) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{path}: {where}: expected a mapping, got {type(value).__name__}")
    return value


def _known(data: dict, keys: tuple[str, ...], where: str, path: Path) -> None:
    unknown = [str(k) for k in data if k not in keys]
    if unknown:
        raise InputError(f"{path}: unknown key {unknown[0]!r} in {where}; expected one of "
                         f"{', '.join(keys)}")


def _seeds(value: Any, path: Path) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{path}: seeds: expected a non-empty list of integers")
    bad = [s for s in value if not isinstance(s, int) or isinstance(s, bool) or s < 0]
    if bad:
        raise InputError(f"{path}: seeds: {bad[0]!r} is not a non-negative integer")
    dup = sorted({s for s in value if value.count(s) > 1})
    if dup:
        raise InputError(f"{path}: seeds: seed {dup[0]} is listed twice (each seed is one run "
                         "of every condition)")
    return tuple(value)


def _train_options(options: dict, where: str, path: Path) -> dict:
    from dynlab.training.config import option_name, option_names

    known = (set(option_names()) - {"extra", "kind"}) | set(LAUNCH_OPTIONS)
    out = {}
    for key, value in options.items():
        name = option_name(str(key))
        name = {"hidden_dim": "activation_hidden_dim"}.get(name, name)  # the CLI's spelling
        if name not in known:
            raise InputError(f"{path}: {where}: unknown training option {key!r} (expected "
                             "`dynlab train` options, e.g. steps, lr, reset-every)")
        if name in RESERVED:
            raise InputError(f"{path}: {where}: {key!r} is set by the study for each run "
                             "(seeds: and --out); leave it out")
        out[name] = value
    return out


def _condition(name: Any, data: Any, common: dict, path: Path) -> Condition:
    where = f"conditions.{name}"
    if not isinstance(name, str) or not NAME.match(name) or re.search(r"-s\d+$", name):
        raise InputError(f"{path}: {where}: a condition name is letters, digits, '_', '.' and "
                         "'-' (not ending in -s<digits>, the seed suffix)")
    data = _mapping(data, where, path)
    _known(data, CONDITION_KEYS, where, path)
    kind = data.get("kind")
    if kind not in ("decoder", "relora"):
        raise InputError(f"{path}: {where}.kind: expected decoder or relora, got {kind!r}")
    options = dict(common)
    options.update(_train_options(_mapping(data.get("overrides"), f"{where}.overrides", path),
                                  f"{where}.overrides", path))
    if data.get("preset") is not None:
        options["preset"] = data["preset"]
    config = None
    if data.get("config") is not None:
        config = (path.parent / str(data["config"])).resolve()
        if not config.is_file():
            raise InputError(f"{path}: {where}.config: {config} not found")
    from dynlab.training.config import make_config

    try:
        cfg = make_config(kind, training_options(options), config).resolved()
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise InputError(f"{path}: {where}: {err}") from err
    scale = str(data.get("scale") or cfg.preset)
    return Condition(name, kind, scale, options, config)


def _section(data: dict, key: str, keys: tuple[str, ...], path: Path) -> dict | None:
    value = data.get(key)
    if value is None or value is False:
        return None
    if value is True:
        return {}
    value = _mapping(value, key, path)
    _known(value, keys, key, path)
    return dict(value)


def load_study(path: str | Path) -> Study:
    """Read and check a study file (see the module docstring); InputError names the file
    and the offending key."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"study file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"study file {path}: not valid YAML ({err})") from err
    data = _mapping(data, "the file", path)
    _known(data, TOP_KEYS, "the study file", path)
    if not data.get("conditions"):
        raise InputError(f"{path}: conditions: expected at least one condition")
    seeds = _seeds(data.get("seeds"), path)
    common = _train_options(_mapping(data.get("common"), "common", path), "common", path)
    conditions = tuple(_condition(n, c, common, path)
                       for n, c in _mapping(data["conditions"], "conditions", path).items())
    slurm = _section(data, "slurm", (), path) if data.get("slurm") is None else \
        dict(_mapping(data["slurm"], "slurm", path))
    if slurm is not None and slurm.get("cluster", "slurm") not in CLUSTERS:
        raise InputError(f"{path}: slurm.cluster: expected one of {', '.join(CLUSTERS)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise InputError(f"{path}: name: expected a non-empty string")
    return Study(path.resolve(), name, seeds, conditions,
                 eval=_section(data, "eval", EVAL_KEYS, path),
                 analyze=_section(data, "analyze", ANALYZE_KEYS, path) or {}, slurm=slurm)
