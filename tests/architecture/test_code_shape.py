"""The code stays readable as it grows: no function in soupkit/ over ~60 lines (docstring excluded), and method
modules declare their parameters without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "soupkit"
MAX_LINES = 60


def long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                lines -= body[0].end_lineno - body[0].lineno + 1  # the docstring
            if lines > MAX_LINES:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_sixty_lines() -> None:
    assert long_functions() == []


def test_declaring_methods_and_building_the_cli_import_no_torch() -> None:
    code = ("import sys\nfrom soupkit.merging.registry import list_methods, get_method\n"
            "[get_method(m) for m in list_methods()]\nimport soupkit.cli\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "NO-TORCH"
