"""The rules that keep the layout (docs/architecture.md), checked on every run.

1. The core (``linewatch/``) never imports a service; ``linewatch/cli/``, the composition root, is
   the one exception, and it wires the services with plain imports, never through ``importlib``.
2. The services (producers, workers, calibration, dashboard, bridges) never import each other.
3. No import cycle anywhere in the five packages.
4. The code cites no missing document (there is no ``DESIGN.md``).

Rules 1 and 2 are the import-linter contracts in ``pyproject.toml`` (``[tool.importlinter]``);
``lint-imports`` from the repository root runs the same check by hand.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("linewatch", "producers", "workers", "calibration", "dashboard", "bridges")
SERVICES = ("producers", "workers", "calibration", "dashboard", "bridges")


def _lint_imports_command() -> list[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    if exe.exists():
        return [str(exe)]
    # the same entry point, for an environment without the console script on disk
    return [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def test_import_contracts_hold():
    """The core never imports a service (except the composition root linewatch.cli) and the
    services never import each other. Import-linter prints every broken chain, module by module,
    with line numbers; the report is shown when the test fails."""
    proc = subprocess.run(
        [*_lint_imports_command(), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"import contracts broken (lint-imports exit {proc.returncode}):\n{report}"
    assert "0 broken" in report, report


def _module_graph():
    import grimp  # a dev dependency (import-linter's own graph builder): missing means a broken setup

    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself),
    each given as one concrete cycle through it. Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    components.append(sorted(component))

    def one_cycle(component: list[str]) -> list[str]:
        # shortest path from the first member back to itself, inside the component (BFS)
        members = set(component)
        first = component[0]
        previous: dict[str, str] = {}
        frontier = [first]
        while frontier:
            following = []
            for node in frontier:
                for child in sorted(edges.get(node, ())):
                    if child not in members:
                        continue
                    if child == first:
                        path = [node]
                        while path[-1] != first:
                            path.append(previous[path[-1]])
                        return [first, *reversed(path[:-1]), first]
                    if child not in previous:
                        previous[child] = node
                        following.append(child)
            frontier = following
        return component  # unreachable for a real component

    return [one_cycle(c) for c in components]


def test_no_import_cycles():
    """No module imports, directly or through others, a module that imports it back: every
    package reads bottom-up. A cycle is printed module -> module with the line numbers of each
    import that ties it."""
    graph = _module_graph()
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = _cycles(edges)
    if cycles:
        lines = []
        for cycle in cycles:
            lines.append("cycle:")
            for importer, imported in zip(cycle, cycle[1:]):
                numbers = sorted(
                    d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)
                )
                lines.append(f"  {importer} -> {imported} (l. {', '.join(map(str, numbers))})")
        pytest.fail(f"{len(cycles)} import cycle(s):\n" + "\n".join(lines))


def test_cycle_finder_finds_a_cycle():
    """The finder itself: a known circle is reported, a tree is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"a"}}) == [["a", "a"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


_SERVICE_NAME = re.compile(rf"^(?:{'|'.join(SERVICES)})(?:\.[A-Za-z_][\w.]*)?(?::\w+)?$")


def test_core_names_no_service_for_a_dynamic_import():
    """Import-linter only sees import statements; a core module that reaches a service through
    ``importlib.import_module("workers.x")`` or a ``"workers.x:Class"`` registry string would
    slip past it. The composition root (linewatch/cli/) is the only place that wires services,
    and it does so with plain imports."""
    offenders = []
    core = ROOT / "linewatch"
    for path in sorted(core.rglob("*.py")):
        if (core / "cli") in path.parents:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value.strip()
                if ("." in text or ":" in text) and _SERVICE_NAME.match(text):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    assert not offenders, "core modules name a service module:\n" + "\n".join(offenders)


_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".grimp_cache", ".import_linter_cache",
              "node_modules", "build", "dist", "runs", "reports", "data", "test-artifacts", ".venv", "venv"}


def _repository_files() -> list[Path]:
    """What the repository holds: git's tracked and untracked-but-not-ignored files, or, without
    git, a walk that skips caches and outputs."""
    try:
        proc = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, timeout=60, check=True,
        )
        files = [ROOT / name for name in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if name]
        if files:
            return [f for f in files if f.is_file()]
    except (OSError, subprocess.SubprocessError):
        pass
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        found.extend(Path(dirpath) / f for f in filenames)
    return found


def test_no_file_cites_a_missing_design_doc():
    """The repository has no DESIGN.md, so nothing (code, docs, scripts, config) may send a
    reader there; measured numbers live in docs/results, the design in docs/architecture.md.
    The tests folder is left out (this check has to name the file)."""
    missing = "DESIGN" + ".md"
    assert not (ROOT / missing).exists(), f"{missing} exists again: drop this check or the file"
    tests_dir = ROOT / "tests"
    citing = []
    for path in _repository_files():
        if tests_dir in path.parents:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if missing.encode() in data:
            for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                if missing in line:
                    citing.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not citing, f"files cite the missing {missing}:\n" + "\n".join(citing)
