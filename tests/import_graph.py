"""The import graph of the product and its benchmarks, read from the source with ``ast``: every
``import`` and ``from ... import`` counts, those inside functions included (a function-level import
hides a cycle from Python, not from this graph).

The layers (docs/architecture.md): ``models`` and ``pipeline`` at the bottom, importing neither each
other nor anything above; ``ops`` over them; ``orchestration`` over ``ops``; ``benchmarks`` on top,
imported by nothing (but tests). ``tests/test_layers.py`` keeps them.

    python -m tests.import_graph [ROOT]     # arrows that run up, cycles, largest files and functions
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

LAYERS = {"models": 0, "pipeline": 0, "ops": 1, "orchestration": 2, "benchmarks": 3, "tests": 4}
PACKAGES = ("models", "pipeline", "ops", "orchestration", "benchmarks")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (the deepest module of ours the import names)
    line: int
    local: bool  # inside a function


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` of ``packages`` under ``root``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _targets(mods: dict[str, Path], current: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of ours an import statement names (a package's ``__init__`` for a name that is
    not itself a module); nothing for third-party imports."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the current package upwards
            package = current.split(".")
            if mods[current].name != "__init__.py":
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names]
    found = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name.split(".")[0] in LAYERS:
            found.append(name)
    return found


def edges(root: Path = ROOT, packages=PACKAGES) -> list[Edge]:
    mods = modules(root, packages)
    out: dict[tuple[str, str, int], Edge] = {}  # one edge per statement and module it names
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        local_lines = {
            n.lineno
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            for n in ast.walk(fn)
            if isinstance(n, ast.Import | ast.ImportFrom)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(mods, name, node):
                    if target != name:
                        out[(name, target, node.lineno)] = Edge(
                            name, target, node.lineno, node.lineno in local_lines
                        )
    return list(out.values())


def upward(all_edges: list[Edge]) -> list[Edge]:
    """Imports between packages that do not go strictly down a layer (``models`` and ``pipeline``
    share the bottom layer and import neither each other)."""
    bad = []
    for e in all_edges:
        a, b = e.source.split(".")[0], e.target.split(".")[0]
        if a != b and LAYERS[b] >= LAYERS[a]:
            bad.append(e)
    return bad


def cycles(all_edges: list[Edge]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (Tarjan's strongly
    connected components of more than one module)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in all_edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(set(graph) | {e.target for e in all_edges}):
        if v not in index:
            visit(v)
    return found


def sizes(root: Path = ROOT, packages=PACKAGES) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(lines per file, lines per function)``, largest first."""
    files, functions = [], []
    for name, path in modules(root, packages).items():
        text = path.read_text()
        files.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(files, reverse=True), sorted(functions, reverse=True)


def main(argv: list[str] | None = None) -> int:
    root = Path((argv or sys.argv[1:] or [str(ROOT)])[0]).resolve()
    packages = [p for p in PACKAGES if (root / p).is_dir()]
    all_edges = edges(root, packages)
    bad, loops = upward(all_edges), cycles(all_edges)
    files, functions = sizes(root, packages)
    print(f"{root}: {len(files)} modules, {sum(n for n, _ in files)} lines, {len(all_edges)} imports of ours")
    print(f"arrows up a layer (or across the bottom one): {len(bad)}")
    for e in bad:
        print(f"  {e.source}:{e.line} -> {e.target}" + (" (in a function)" if e.local else ""))
    print(f"module cycles: {len(loops)}")
    for group in loops:
        print("  " + " <-> ".join(group))
    print("largest files: " + ", ".join(f"{m} {n}" for n, m in files[:6]))
    print("longest functions: " + ", ".join(f"{m} {n}" for n, m in functions[:6]))
    print(
        f"files over 500 lines: {sum(n > 500 for n, _ in files)}; functions over 80 lines: "
        f"{sum(n > 80 for n, _ in functions)}"
    )
    return 1 if bad or loops else 0


if __name__ == "__main__":
    sys.exit(main())
