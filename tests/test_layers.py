"""The layers hold: no import runs up a layer or across the bottom one, and no modules import each
other, function-level imports included (``tests/import_graph.py``; docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

from tests.import_graph import cycles, edges, upward


def test_no_import_runs_up_a_layer_and_no_module_cycle():
    all_edges = edges()
    assert len(all_edges) > 200  # the graph was read (248 imports of ours on 2026-12-02)
    bad = [f"{e.source}:{e.line} -> {e.target}" for e in upward(all_edges)]
    assert bad == []
    assert cycles(all_edges) == []


def test_nothing_but_tests_imports_the_benchmarks():
    assert [
        e for e in edges() if e.target.startswith("benchmarks") and not e.source.startswith("benchmarks")
    ] == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_sees_arrows_and_cycles_hidden_in_functions(tmp_path):
    """What today's checks would miss if the graph skipped function-level or relative imports: an
    arrow up from ``ops`` into ``orchestration`` inside a function, an import across the bottom
    layer, and a cycle closed by a relative import inside a function."""
    _write(
        tmp_path,
        {
            "models/__init__.py": "",
            "models/net.py": "import torch\n",
            "pipeline/__init__.py": "",
            "pipeline/reader.py": "from models.net import torch\n",  # across the bottom layer
            "ops/__init__.py": "",
            "ops/a.py": "from ops.b import g\n\ndef f():\n    from orchestration.run import go\n",
            "ops/b.py": "def g():\n    from . import a\n",  # closes ops.a -> ops.b -> ops.a
            "orchestration/__init__.py": "",
            "orchestration/run.py": "from ops.a import f\n\ndef go():\n    pass\n",
        },
    )
    all_edges = edges(tmp_path, ("models", "pipeline", "ops", "orchestration"))
    bad = {(e.source, e.target, e.local) for e in upward(all_edges)}
    assert bad == {("pipeline.reader", "models.net", False), ("ops.a", "orchestration.run", True)}
    assert sorted(map(tuple, cycles(all_edges))) == [("ops.a", "ops.b", "orchestration.run")]
