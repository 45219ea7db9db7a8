"""The package's structure: no module reaches into another's private names; no import cycle,
counting every import (module level and function-local alike, since a lazy import still ties
the two modules together); and the layers below, from the bottom up, import only downwards:

    base        dynlab.errors, .atomic, .faults, .devices, .version, .locking
    maths       dynlab.analysis.{metrics, spectra, heavytail, representations}: formulas on tensors
    data        dynlab.data, dynlab.model, dynlab.runs: text, models, the run layout on disk
    sources     dynlab.sources (readers of checkpoints), dynlab.eval (perplexity, BLiMP)
    pipeline    the rest of dynlab.analysis: plan, components, task, executors, store, export
    figures     dynlab.viz
    trainer     dynlab.training
    entry       dynlab (the package's functions), dynlab.demo, dynlab.testing, python -m dynlab,
                and the CLI (dynlab_cli)

So the maths never does I/O, a source never runs the pipeline, and nothing below the trainer
imports it or the CLI. A module may import any module of its own layer or of a lower one.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dynlab": ROOT / "dynlab", "dynlab_cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of dynlab and its CLI."""
    out = {}
    for pkg, base in PACKAGES.items():
        for f in base.rglob("*.py"):
            parts = [pkg, *f.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


@functools.cache
def parsed(text: str) -> ast.Module:
    """A file's syntax tree (cached by its text: the checks walk every file several times)."""
    return ast.parse(text)


def ours(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in PACKAGES


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def imported_modules(node: ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    """What `from A import b, c` loads: A.b where that is a module, else A itself."""
    subs = [f"{node.module}.{a.name}" for a in node.names]
    found = [s for s in subs if s in mods]
    return found + ([node.module] if len(found) < len(subs) else [])


def test_no_module_uses_a_private_name_of_another():
    mods = modules()
    found = []
    for name, path in mods.items():
        tree = parsed(path.read_text())
        aliases = {}  # local name -> our module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and ours(node.module):
                for a in node.names:
                    if private(a.name):
                        found.append(f"{name}: from {node.module} import {a.name}")
                    if f"{node.module}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if ours(a.name) and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and private(node.attr)
                    and aliases[node.value.id] != name):
                found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert found == []


def import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports anywhere in its file (functions included)."""
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(parsed(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and ours(node.module):
                targets.update(imported_modules(node, mods))
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if ours(a.name))
        edges[name] = {t for t in targets if t in mods and t != name}
    return edges


#: the layers, bottom up: (name, module prefixes); a module belongs to its longest prefix
LAYERS = [
    ("base", ["dynlab.errors", "dynlab.atomic", "dynlab.faults", "dynlab.devices",
              "dynlab.version", "dynlab.locking"]),
    ("maths", ["dynlab.analysis.metrics", "dynlab.analysis.spectra", "dynlab.analysis.heavytail",
               "dynlab.analysis.representations", "dynlab.analysis.memo"]),
    ("data", ["dynlab.data", "dynlab.model", "dynlab.runs"]),
    # maths on a runnable model (Hessian, loss line, gradient noise, attention)
    ("function space", ["dynlab.function_space"]),
    ("sources", ["dynlab.sources", "dynlab.eval"]),
    # evaluation of any source into the store is pipeline work, like analysis
    ("pipeline", ["dynlab.analysis", "dynlab.eval.sources"]),
    ("figures", ["dynlab.viz"]),
    ("trainer", ["dynlab.training"]),
    ("entry", ["dynlab", "dynlab.demo", "dynlab.testing", "dynlab.__main__", "dynlab_cli"]),
]


def layer_of(module: str) -> int:
    """The index in LAYERS of the layer `module` belongs to (its longest matching prefix)."""
    best, length = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_every_module_imports_only_its_own_layer_or_lower():
    found = []
    for name, targets in import_edges(modules()).items():
        for t in sorted(targets):
            if layer_of(t) > layer_of(name):
                found.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {t} "
                             f"({LAYERS[layer_of(t)][0]})")
    assert found == []


def test_no_module_below_imports_the_trainer_or_the_cli():
    """The rule the layer table implies, spelt out: only the entry points import these."""
    entry = len(LAYERS) - 1
    found = [f"{name} imports {t}" for name, targets in import_edges(modules()).items()
             for t in targets
             if t.split(".")[0] == "dynlab_cli" or t.startswith("dynlab.training")
             if layer_of(name) < layer_of("dynlab.training") or (
                 t.split(".")[0] == "dynlab_cli" and layer_of(name) < entry)]
    assert found == []


def test_no_import_cycle():
    edges = import_edges(modules())
    cycles, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert cycles == []


def planted(tmp_path: Path, monkeypatch, files: dict[str, str]) -> None:
    """Point the checks at a fake package tree holding `files` (path under the root -> text)."""
    for rel, text in {"dynlab/__init__.py": "", "cli/__init__.py": "", **files}.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        for parent in f.relative_to(tmp_path).parents:
            if parent != Path(".") and not (tmp_path / parent / "__init__.py").exists():
                (tmp_path / parent / "__init__.py").write_text("")
        f.write_text(text)
    monkeypatch.setitem(PACKAGES, "dynlab", tmp_path / "dynlab")
    monkeypatch.setitem(PACKAGES, "dynlab_cli", tmp_path / "cli")


def fails(check) -> bool:
    try:
        check()
    except AssertionError:
        return True
    return False


def test_the_checks_pass_on_a_clean_tree(tmp_path, monkeypatch):
    planted(tmp_path, monkeypatch, {
        "dynlab/analysis/metrics.py": "from dynlab.errors import InputError\n",
        "dynlab/errors.py": "class InputError(Exception): ...\n",
        "dynlab/training/trainer.py": "def f():\n    from dynlab.analysis import metrics\n",
        "cli/main.py": "from dynlab.training import trainer\n"})
    for check in (test_no_module_uses_a_private_name_of_another, test_no_import_cycle,
                  test_every_module_imports_only_its_own_layer_or_lower,
                  test_no_module_below_imports_the_trainer_or_the_cli):
        assert not fails(check), check.__name__


def test_the_checks_see_a_private_import_and_a_cycle(tmp_path, monkeypatch):
    """A private import, and a cycle made by a function-local import, each fail."""
    planted(tmp_path, monkeypatch, {
        "dynlab/a.py": "from dynlab.b import _hidden\n",
        "dynlab/b.py": "def f():\n    from dynlab import a\n_hidden = 1\n"})
    assert fails(test_no_module_uses_a_private_name_of_another)
    assert fails(test_no_import_cycle)


def test_the_checks_see_an_import_against_the_layers(tmp_path, monkeypatch):
    """Maths reaching the store, a source reaching the pipeline, a reader reaching the trainer
    (inside a function) and the store reaching the CLI each fail."""
    cases = [
        {"dynlab/analysis/spectra.py": "from dynlab.analysis import store\n",
         "dynlab/analysis/store.py": ""},
        {"dynlab/sources/follow.py": "def f():\n    from dynlab.analysis import run\n",
         "dynlab/analysis/run.py": ""},
        {"dynlab/sources/grads.py": "def f():\n    from dynlab.training.dynamics import g\n",
         "dynlab/training/dynamics.py": "g = 1\n"},
        {"dynlab/analysis/store.py": "import dynlab_cli.main\n", "cli/main.py": ""},
    ]
    for i, files in enumerate(cases):
        planted(tmp_path / str(i), monkeypatch, files)
        assert fails(test_every_module_imports_only_its_own_layer_or_lower), files
    assert fails(test_no_module_below_imports_the_trainer_or_the_cli)
