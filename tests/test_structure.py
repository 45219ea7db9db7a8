"""The package's structure: no module reaches into another's private names, and no cycle among
the imports that run when a module loads (function-level imports are lazy and not counted)."""

from __future__ import annotations

import ast
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
        tree = ast.parse(path.read_text())
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


def test_no_import_cycle_at_load_time():
    mods = modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and ours(node.module):
                targets.update(imported_modules(node, mods))
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if ours(a.name))
        edges[name] = {t for t in targets if t in mods and t != name}
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

    for m in sorted(mods):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_the_checks_see_a_private_import_and_a_cycle(tmp_path, monkeypatch):
    """The two checks fail on a planted private import and a planted cycle."""
    pkg = tmp_path / "dynlab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from dynlab.b import _hidden\n")
    (pkg / "b.py").write_text("from dynlab import a\n_hidden = 1\n")
    cli = tmp_path / "cli"
    cli.mkdir()
    (cli / "__init__.py").write_text("")
    monkeypatch.setitem(PACKAGES, "dynlab", pkg)
    monkeypatch.setitem(PACKAGES, "dynlab_cli", cli)
    for check in (test_no_module_uses_a_private_name_of_another, test_no_import_cycle_at_load_time):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a planted fault")
