"""The tree shows the pipeline: no import cycles, and no module imports a later pipeline stage.

Stages, in the order data flows (docs/ARCHITECTURE.md): shared helpers → checkpoints → activations →
rules → merging → evaluation → application (tune, cache, demo, cli, commands) → components (the UI).
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    ("shared", ("acm", "acm.errors", "acm.sizes", "acm.processes")),
    ("checkpoints", ("acm.checkpoints",)),
    ("activations", ("acm.activations",)),
    ("rules", ("acm.rules",)),
    ("merging", ("acm.merging",)),
    ("evaluation", ("acm.evaluation",)),
    ("application", ("acm.tune", "acm.tune_ray", "acm.cache", "acm.presets", "acm.demo", "acm.cli", "acm.commands",
                     "acm.__main__")),
    ("ui", ("components", "app")),
]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def project_modules() -> dict[str, Path]:
    files = [*(ROOT / "acm").rglob("*.py"), *(ROOT / "components").rglob("*.py"), ROOT / "app.py"]
    return {module_name(f): f for f in files}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports, at any depth (``from acm.x import y`` counts y when y is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    return out


def stage_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} belongs to no pipeline stage: add it to tests/test_architecture.py STAGES"
    return rank


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: {d for d in imports_of(f, mods) if d != m and d != "acm"} for m, f in mods.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert find_cycles(graph()) == []


def test_no_module_imports_a_later_stage():
    bad = [f"{m} ({STAGES[stage_of(m)][0]}) imports {d} ({STAGES[stage_of(d)][0]})"
           for m, deps in graph().items() for d in deps if stage_of(d) > stage_of(m)]
    assert bad == []


def test_the_checker_finds_a_cycle_and_a_layering_violation():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert stage_of("acm.checkpoints.models") < stage_of("acm.merging.engine") < stage_of("components.merge")
    with pytest.raises(AssertionError, match="no pipeline stage"):
        stage_of("somewhere.else")
