"""The layering the code promises (ARCHITECTURE.md), checked on the source itself.

- ``core`` is the contract: it imports nothing of the project but itself.
- ``methods`` and ``evaluations`` import only ``core`` (and ``methods`` the pure functions of ``evaluations``).
- The sub-packages of ``harness`` import one way, in the order of :data:`HARNESS_LAYERS`.
- The import graph has no cycle, counting imports inside functions and under ``TYPE_CHECKING`` alike.
- The orchestration never asks which method it runs: no registered method name and no ``hasattr`` or
  ``modality`` branch in ``harness/``.
- Importing ``core`` or ``methods.base`` imports no method module.
"""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from methods import list_methods
from tests.helpers.runs import REPO as ROOT

PACKAGES = ("core", "harness", "methods", "evaluations")
HARNESS_LAYERS = ("signals", "config", "data", "track", "train", "trial", "launch", "sweep", "tables", "cli", "__main__")
"""``harness``'s sub-packages (and top-level modules), lowest first: each may import only those before it."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


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


GRAPH = {name: _imports(path, MODULES) - {name} for name, path in MODULES.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def _layer(module: str) -> int:
    """The position of a ``harness`` module's sub-package in :data:`HARNESS_LAYERS` (the package itself: -1)."""
    parts = module.split(".")
    return HARNESS_LAYERS.index(parts[1]) if len(parts) > 1 else -1


def test_core_imports_nothing_of_the_project_but_itself() -> None:
    assert {(m, i) for m, imports in GRAPH.items() if _top(m) == "core" for i in imports if _top(i) != "core"} == set()


@pytest.mark.parametrize("package", ["methods", "evaluations"])
def test_methods_and_evaluations_import_only_the_contract(package: str) -> None:
    upward = {(m, i) for m, imports in GRAPH.items() if _top(m) == package for i in imports if _top(i) == "harness"}
    assert upward == set(), f"{package} imports the orchestration: {sorted(upward)}"


def test_evaluations_do_not_import_methods() -> None:
    assert {(m, i) for m, imports in GRAPH.items() if _top(m) == "evaluations" for i in imports if _top(i) == "methods"} == set()


def test_every_harness_module_belongs_to_a_layer() -> None:
    assert {m for m in MODULES if _top(m) == "harness" and len(m.split(".")) > 1 and m.split(".")[1] not in HARNESS_LAYERS} == set()


def test_the_harness_sub_packages_import_one_way() -> None:
    upward = {(m, i) for m, imports in GRAPH.items() if _top(m) == "harness" for i in imports if _top(i) == "harness" and _layer(i) > _layer(m)}
    assert upward == set(), f"imports against the layer order {HARNESS_LAYERS}: {sorted(upward)}"


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_importing_the_contract_and_the_method_interface_imports_no_method() -> None:
    """A fresh interpreter: ``core``'s modules and ``methods.base`` leave every method module out of sys.modules."""
    contract = sorted(m for m in MODULES if _top(m) == "core")
    code = f"import sys\nfor m in {[*contract, 'methods.base']!r}:\n    __import__(m)\nprint(__import__('json').dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert [m for m in loaded if m.startswith("methods.") and m != "methods.base"] == []
    assert not any(m == "harness" or m.startswith("harness.") for m in loaded)


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
    for path in sorted((ROOT / "harness").rglob("*.py")):
        for tok in _code_tokens(path):
            if (tok.type == tokenize.NAME and tok.string in names | {"hasattr", "modality"}) or (tok.type == tokenize.STRING and any(re.search(rf"\b{n}\b", tok.string) for n in names)):
                found.append(f"{path.relative_to(ROOT)}:{tok.start[0]} {tok.string}")
    assert found == []


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The checks above can fail: a method name, a hasattr branch, an upward import and a layer violation are caught."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""Doc naming simclr is fine."""\nif hasattr(m, "encode_text") or name == "clip":\n    from harness.trial.run import run\n')
    assert [t.string for t in _code_tokens(bad) if t.string in {"hasattr", '"clip"'}] == ["hasattr", '"clip"']
    assert _imports(bad, MODULES) == {"harness.trial.run"}
    assert _layer("harness.trial.run") > _layer("harness.data.augment") and _layer("harness.sweep.driver") > _layer("harness.launch.workers")
