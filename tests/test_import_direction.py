"""The package's imports keep one direction (docs/architecture.md, "Floors"): read from the
source with `ast`, every import (top-level, inside a function, or for type checking only) and
the package `__init__` each one runs are checked against the rules written here as data."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"growth": ROOT / "growth", "growth.controllers": ROOT / "controllers",
            "growth.search_spaces": ROOT / "search_spaces"}

# Floors, bottom to top: a module imports its own floor and the floors below, never above.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("growth", "growth.errors", "growth.io", "growth.plugins")),
    ("graph", ("growth.graph", "growth.layers", "growth.modules", "growth.compile",
               "growth.trace", "growth.converters")),
    ("data", ("growth.data",)),
    ("operators", ("growth.ops", "growth.remap", "growth.optim")),
    ("search space", ("growth.search_spaces",)),
    ("loop", ("growth.model", "growth.context", "growth.searching", "growth.train",
              "growth.scenarios", "growth.devices", "growth.regularizers",
              "growth.distillation", "growth.masks", "growth.memory", "growth.metrics",
              "growth.stats")),
    ("strategies", ("growth.strategies", "growth.compress")),
    ("search engine", ("growth.controllers", "growth.cluster", "growth.keeper")),
    ("campaign", ("growth.config", "growth.rundir", "growth.checkpoint", "growth.campaign",
                  "growth.runlog", "growth.tracking")),
    ("reports", ("growth.runs", "growth.report", "growth.plots")),
    ("commands", ("growth.commands", "growth.cli", "growth.demo", "growth.__main__")),
]
# Within and across floors, what some modules must never import (prefixes).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # data knows no network
    "growth.data": ("growth.graph", "growth.layers", "growth.compile", "growth.trace",
                    "growth.model", "growth.ops"),
    # operators are pure: no optimizer, no dataset, no file
    "growth.ops": ("growth.optim", "growth.data", "growth.io", "growth.remap"),
    # metrics and statistics are plain numbers
    "growth.metrics": ("growth.graph", "growth.model", "growth.data", "growth.train"),
    "growth.stats": ("growth.graph", "growth.model", "growth.data", "growth.train", "torch",
                     "numpy"),
    # strategies know no run directory, campaign, Ray or controller module
    "growth.strategies": ("growth.controllers", "growth.cluster", "growth.campaign",
                          "growth.rundir", "growth.checkpoint", "growth.config", "ray"),
    "growth.compress": ("growth.controllers", "growth.cluster", "growth.campaign",
                        "growth.rundir", "growth.checkpoint", "growth.config", "ray"),
}
# Ray is the search engine's and the commands'.
RAY_ALLOWED = ("growth.controllers", "growth.cluster", "growth.keeper", "growth.commands")
TOP_LEVEL_NAMES = ("controllers", "search_spaces")  # installed only under growth.


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [pkg, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            if pkg == "growth" and name.startswith(("growth.controllers", "growth.search_spaces")):
                continue
            mods[name] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Every dotted name this module imports (absolute), wherever the import statement is."""
    out: set[str] = set()
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            out |= {mod, *(f"{mod}.{a.name}" for a in node.names)}
    return out


def _graph() -> tuple[dict[str, Path], dict[str, set[str]], dict[str, set[str]]]:
    """Modules, their edges to package modules (with the package __init__s an import runs),
    and every raw name each imports."""
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    raw: dict[str, set[str]] = {}
    for name, path in mods.items():
        raw[name] = _imports(name, path)
        for target in raw[name]:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            edges[name].add(target)
            parts = target.split(".")
            for k in range(1, len(parts)):  # importing a.b.c runs a's and a.b's __init__
                parent = ".".join(parts[:k])
                if parent in mods and not name.startswith(parent + ".") and parent != name:
                    edges[name].add(parent)
    return mods, edges, raw


def _floor(module: str) -> int:
    best, floor = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), i
    if floor is None:
        raise AssertionError(f"{module} has no floor: add it to FLOORS in {__file__}")
    return floor


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


GRAPH = _graph()


def test_every_module_has_a_floor() -> None:
    mods, _, _ = GRAPH
    assert len(mods) > 60
    for name in mods:
        _floor(name)


def test_imports_go_down_the_floors() -> None:
    mods, edges, _ = GRAPH
    wrong = [f"{a} ({FLOORS[_floor(a)][0]}) imports {b} ({FLOORS[_floor(b)][0]})"
             for a in sorted(mods) for b in sorted(edges[a]) if _floor(b) > _floor(a)]
    assert not wrong, "\n".join(wrong)


def test_forbidden_imports() -> None:
    mods, _, raw = GRAPH
    wrong = []
    for name in sorted(mods):
        for owner, banned in FORBIDDEN.items():
            if _under(name, (owner,)):
                wrong += [f"{name} imports {t}" for t in sorted(raw[name]) if _under(t, banned)]
        if not _under(name, RAY_ALLOWED):
            wrong += [f"{name} imports {t} (Ray belongs to {RAY_ALLOWED})"
                      for t in sorted(raw[name]) if _under(t, ("ray",))]
        wrong += [f"{name} imports {t}: write growth.{t}" for t in sorted(raw[name])
                  if _under(t, TOP_LEVEL_NAMES)]
    assert not wrong, "\n".join(wrong)


def test_no_circles() -> None:
    mods, edges, _ = GRAPH
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(mods):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("source,banned", [
    ("import growth.campaign\n", "growth.campaign"),
    ("from growth import cluster\n", "growth.cluster"),
    ("def f():\n    from ..controllers import driver\n", "growth.controllers.driver"),
])
def test_the_reader_sees_every_kind_of_import(tmp_path: Path, source: str, banned: str
                                              ) -> None:
    """A planted import in a strategy (top level, `from`-form, relative, inside a function)
    is read, so the rules cannot be passed by hiding one."""
    path = tmp_path / "planted.py"
    path.write_text(source)
    found = _imports("growth.strategies.planted", path)
    assert any(_under(t, (banned,)) for t in found)
    assert any(_under(t, FORBIDDEN["growth.strategies"]) for t in found)
