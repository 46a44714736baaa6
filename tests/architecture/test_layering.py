"""Every layer on its floor, read from the source with ``ast`` (no import runs): no module imports from a layer
above its own, the module-level import graph has no cycle, and an import of soupkit's own modules inside a
function is a deliberate, commented place (CLI start-up stays torch-free; a cycle waiting for its fix).

The order is documented in CONTRIBUTING.md ("Architecture"); change both together.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "soupkit"

#: lowest first; a module belongs to the first entry that is it or a package above it (longest prefix wins)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("soupkit._version", "soupkit._lazy", "soupkit.errors", "soupkit.interrupt", "soupkit.registry",
                    "soupkit.options_parse", "soupkit.yaml_file")),
    ("io", ("soupkit.io",)),
    ("options", ("soupkit.options",)),
    ("merging", ("soupkit.merging",)),
    ("report", ("soupkit.report",)),
    ("eval", ("soupkit.eval",)),
    ("soups", ("soupkit.soups",)),
    ("diagnosis", ("soupkit.diagnosis", "soupkit.inspection")),
    ("api", ("soupkit", "soupkit.demo", "soupkit.demo_train")),  # the public facade and the demo built on it
    ("cli", ("soupkit.cli", "soupkit.__main__")),
]

#: modules whose function-level imports of soupkit are the lead's to move (their files are being rewritten by
#: others): module -> how many such imports are left without a comment. The count must only go down: a module
#: that lowers it must lower it here too, a module that gains one fails.
IMPORT_DEBT: dict[str, int] = {
    "soupkit.cli.merge_cmd": 15,
    "soupkit.diagnosis.report": 0,
    "soupkit.eval.models.clip": 4,
    "soupkit.eval.cache": 1,
    "soupkit.eval.data.text": 1,
    "soupkit.eval.text": 2,
    "soupkit.io.hf_folder": 4,
    "soupkit.io.lora": 0,
    "soupkit.merging.adapters": 0,
    "soupkit.merging.api": 1,
    "soupkit.merging.mergekit": 0,
    "soupkit.report.methods": 0,
    "soupkit.report.plots": 6,
    "soupkit.soups.common": 1,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is in no layer: add it to LAYERS (and to CONTRIBUTING.md)"
    return found


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the soupkit module imported (a submodule when ``from package import submodule``)
    line: int
    in_function: bool
    commented: bool  # a comment on the line, or on the line(s) just above (a commented group of imports)


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "soupkit"]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    if target.split(".")[0] != "soupkit":
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


#: what a comment on a function-level import must say: why it waits (measured start-up laziness, or a cycle)
REASONS = re.compile(r"#.*\b(lazy|cycle)\b", re.IGNORECASE)


def _commented(lines: list[str], node: ast.stmt) -> bool:
    if REASONS.search(lines[node.lineno - 1]):
        return True
    above = node.lineno - 2
    while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
        above -= 1  # a group of consecutive imports shares the comment above it
    while above >= 0 and lines[above].strip().startswith("#"):  # a comment of several lines
        if REASONS.search(lines[above]):
            return True
        above -= 1
    return False


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    text = path.read_text()
    lines = text.splitlines()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue  # annotations only: never executed
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, child, path.name == "__init__.py"):
                    found.append(Import(module, target, child.lineno, in_function, _commented(lines, child)))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(text), False)
    return found


@functools.cache
def all_imports() -> tuple[Import, ...]:
    """Every import of the package, parsed once and only by the worker that runs these tests (not at collection)."""
    return tuple(imp for module in MODULES for imp in imports_of(module))


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_import_from_a_higher_layer() -> None:
    """Module-level and function-level alike: a lazy import still is a dependency."""
    upward = [f"{i.source}:{i.line} imports {i.target} ({LAYERS[layer_of(i.source)][0]} -> "
              f"{LAYERS[layer_of(i.target)][0]})" for i in all_imports() if layer_of(i.target) > layer_of(i.source)]
    assert upward == [], "imports up a layer:\n" + "\n".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return components


def test_no_import_cycle_between_modules() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in all_imports():
        if not imp.in_function and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _uncommented_lazy(module: str) -> list[Import]:
    return [i for i in all_imports() if i.source == module and i.in_function and not i.commented]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_soupkit_imports_inside_functions_say_why(module: str) -> None:
    """Imports belong at module level, where they show the graph. The exceptions are places where laziness is
    measured to matter (the CLI answers ``--help`` and argument errors without importing torch; see
    tests/cli/test_help.py) or a cycle waits for its fix; each carries a comment saying which ("lazy: ...",
    "cycle: ...")."""
    left = _uncommented_lazy(module)
    debt = IMPORT_DEBT.get(module, 0)
    where = ", ".join(f"line {i.line} ({i.target})" for i in left)
    assert len(left) <= debt, f"{module}: function-level imports without a comment saying why: {where}"
    assert len(left) == debt, f"{module}: {debt - len(left)} fewer left: lower IMPORT_DEBT[{module!r}] to {len(left)}"


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    source = ("from soupkit.errors import SoupkitError\n"
              "def f():\n"
              "    # lazy: why\n"
              "    from soupkit.io import atomic\n"
              "    import soupkit.merging\n")
    tree = ast.parse(source)
    node = tree.body[1].body[0]
    assert _commented(source.splitlines(), node) and _commented(source.splitlines(), tree.body[1].body[1])
    assert _targets("soupkit.eval.models.clip", ast.parse("from ..registry import models").body[0], False) == [
        "soupkit.eval.registry"]
