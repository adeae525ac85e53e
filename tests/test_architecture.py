"""The layering the code promises (ARCHITECTURE.md), checked on the source itself.

- Imports flow one way: ``harness`` -> ``methods`` and ``harness`` -> ``evaluations`` (``methods`` may call the
  pure functions of ``evaluations``); ``methods`` and ``evaluations`` import nothing of the harness but its leaf
  modules, and a leaf imports no other project module but leaves.
- The import graph of the three packages has no cycle, counting imports inside functions and under
  ``TYPE_CHECKING`` alike.
- The orchestration never asks which method it runs: no registered method name and no ``hasattr`` or
  ``modality`` branch in ``harness/``.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from methods import list_methods

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "methods", "evaluations")
LEAVES = {"harness.errors", "harness.splits", "harness.schedules", "harness.backbones", "harness.keyed"}
"""Modules every package may import: the error types, the loaded-data containers, the schedules, the timm adapter, keyed random numbers."""


def _modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}" if p.stem != "__init__" else p.parent.name: p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in ``path`` (module level, functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


GRAPH = {name: _imports(path, _modules()) - {name} for name, path in _modules().items()}


@pytest.mark.parametrize("package", ["methods", "evaluations"])
def test_methods_and_evaluations_import_only_the_harness_leaves(package: str) -> None:
    upward = {(m, i) for m, imports in GRAPH.items() if m.split(".")[0] == package for i in imports if i.split(".")[0] == "harness" and i not in LEAVES}
    assert upward == set(), f"{package} imports the harness's orchestration: {sorted(upward)}"


def test_evaluations_do_not_import_methods() -> None:
    assert {(m, i) for m, imports in GRAPH.items() if m.startswith("evaluations") for i in imports if i.split(".")[0] == "methods"} == set()


def test_leaves_import_only_leaves() -> None:
    assert {(m, i) for m in LEAVES for i in GRAPH[m] if i not in LEAVES} == set()


def test_the_import_graph_has_no_cycle() -> None:
    graph = GRAPH
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def _code_tokens(path: Path) -> list[tokenize.TokenInfo]:
    """Names and string literals of ``path``, docstrings and comments left out."""
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    out = []
    for i, tok in enumerate(tokens):
        docstring = tok.type == tokenize.STRING and (i == 0 or tokens[i - 1].type in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL, tokenize.DEDENT))
        if tok.type == tokenize.NAME or (tok.type == tokenize.STRING and not docstring):
            out.append(tok)
    return out


def test_the_harness_names_no_method_and_asks_no_method_what_it_is() -> None:
    names = set(list_methods())
    found = []
    for path in sorted((ROOT / "harness").glob("*.py")):
        for tok in _code_tokens(path):
            if (tok.type == tokenize.NAME and tok.string in names | {"hasattr", "modality"}) or (tok.type == tokenize.STRING and any(re.search(rf"\b{n}\b", tok.string) for n in names)):
                found.append(f"{path.name}:{tok.start[0]} {tok.string}")
    assert found == []


def test_the_check_sees_what_it_looks_for(tmp_path: Path) -> None:
    """The checks above can fail: a method name, a hasattr branch and an upward import are all caught."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""Doc naming simclr is fine."""\nif hasattr(m, "encode_text") or name == "clip":\n    from harness.run import run\n')
    assert [t.string for t in _code_tokens(bad) if t.string in {"hasattr", '"clip"'}] == ["hasattr", '"clip"']
    assert _imports(bad, _modules()) == {"harness.run"}
