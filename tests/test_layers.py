"""The dependency order of docs/structures.md ("Layers"), checked on the import graph.

import-linter's contracts live in pyproject.toml; grimp's graph counts imports inside functions
too, so an import that points back up cannot hide in a function body.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("serve_app", "autoscaling")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_linter_contracts_hold():
    # lint_imports_command is what the `lint-imports` script runs; no cache: the tree changes
    done = _run(
        """
        import sys
        from importlinter.cli import lint_imports_command
        sys.argv = ["lint-imports", "--no-cache"]
        sys.exit(lint_imports_command())
        """
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 6 kept, 0 broken." in done.stdout, done.stdout


def _strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's SCCs of size > 1 (iterative: the graph has a few hundred modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    imported = graph.find_modules_directly_imported_by(child)
                    work.append((child, iter(sorted(imported))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_import_cycle():
    graph = grimp.build_graph(*ROOTS, cache_dir=None)
    assert _strongly_connected(graph) == []


def test_cycle_finder_sees_imports_inside_functions(tmp_path, monkeypatch):
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import cyclepkg.b\n")
    (pkg / "b.py").write_text("def f():\n    from cyclepkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclepkg", cache_dir=None)
    assert _strongly_connected(graph) == [["cyclepkg.a", "cyclepkg.b"]]


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("serve_app.api.routes", ("torch",)),
        ("serve_app.engine.engine", ("ray", "redis")),
        ("serve_app.engine.async_engine", ("ray", "redis")),
        ("serve_app.rollout.controller", ("ray", "torch")),
        ("autoscaling.policy", ("ray", "torch")),
        # an expert shard actor reports metrics without loading the whole engine
        ("serve_app.metrics.reporter", ("serve_app.engine.engine",)),
        ("serve_app.cli.main", ("ray", "torch")),  # `moeserve --help` stays fast
    ],
)
def test_import_loads_no_forbidden_package(module, absent):
    done = _run(
        f"""
        import sys
        import {module}
        print(sorted(m for m in {absent!r} if m in sys.modules))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing {module} loaded {done.stdout.strip()}"


def test_the_engine_does_not_name_redis():
    """The engine knows a shared-prefix connector (serve_app/engine/kv_connector.py), never the
    Redis tier behind it, its settings nor its policies: not even in a comment."""
    engine = Path(__file__).resolve().parent.parent / "serve_app" / "engine"
    named = [
        f"{path.name}:{n}"
        for path in sorted(engine.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "redis" in line.lower()
    ]
    assert named == []
