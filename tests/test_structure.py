"""Code structure that review keeps asking for, checked: no import cycle between m3search's
modules (top-level or lazy imports alike), and one definition of each shared constant."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "m3search"


def import_graph() -> dict[str, set[str]]:
    """module -> m3search modules it imports anywhere in its file (lazy imports included)."""
    modules = {
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in SRC.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "m3search.cli" not in graph["m3search.server"] and "m3search.server" in graph["m3search.cli"]
    assert graph["m3search.serverfile"] == {
        "m3search.engines",
        "m3search.engines.files",
    }  # location and file rules only
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_location_rules_load_nothing_heavy():
    """The CLI reads a collection's location (which engine, where a server record lives) before it
    loads anything: m3search.engines and m3search.serverfile import no engine, NumPy or client."""
    code = (
        "import sys, m3search.serverfile; print(sorted(m for m in sys.modules if m.startswith(('m3search', 'numpy'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "['m3search', 'm3search.engines', 'm3search.engines.files', 'm3search.serverfile']"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modes_and_fusions_are_defined_once():
    """plan.py is their one home: no other module spells the tuples out."""
    for path in SRC.rglob("*.py"):
        if path.name == "plan.py":
            continue
        text = path.read_text(encoding="utf-8")
        for literal in ('("dense", "sparse", "colbert")', '("weighted", "rrf", "dbsf")', '"dense+colbert", "all"'):
            assert literal not in text, f"{path.name} defines {literal} again: import it from m3search.plan"
