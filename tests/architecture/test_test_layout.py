"""``tests/`` mirrors ``soupkit/``: a test of ``soupkit/<package>/...`` lives under ``tests/<package>/...``, the few
folders that cut across the package say which subject they hold, and files are named by subject, never by the
issue or round that brought them."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
PACKAGE = TESTS.parent / "soupkit"

#: folders of tests/ that are not a soupkit package, each with the subject it holds
ACROSS = {
    "architecture": "the package's shape: layers, import graph, function size, this layout",
    "docs": "README and CONTRIBUTING: generated blocks current, every shown command runs",
    "hostile": "the bad-input corpus run through the real CLI, and parser property tests",
    "reliability": "faults, signals and kills at chosen moments, regressions",
    "fuzz": "mutation fuzzing of every reader",
    "golden": "data: mergekit's own outputs, for the parity tests",
}

#: names that tell when a test was written instead of what it checks
HISTORY_WORDS = {"new", "old", "again", "more", "extra", "misc", "two", "three", "followup", "fixes"}
HISTORY_TOKEN = re.compile(r"(round|issue|v|part)\d+")


def _packages() -> set[Path]:
    return {p.parent.relative_to(PACKAGE) for p in PACKAGE.rglob("__init__.py")} - {Path(".")}


def test_every_test_folder_is_a_package_or_a_declared_subject() -> None:
    packages = _packages()
    for folder in sorted(p for p in TESTS.rglob("*") if p.is_dir() and p.name not in ("__pycache__",)):
        relative = folder.relative_to(TESTS)
        if relative.parts[0] in ACROSS or relative.parts[0].startswith("."):
            continue
        assert relative in packages, f"tests/{relative}/ mirrors no soupkit/{relative}/ package"


def test_every_package_has_its_tests() -> None:
    for package in sorted(_packages()):
        tests = TESTS / package
        if package.parts[0] in {"eval"} and len(package.parts) > 1:
            continue  # eval's model and data kinds are tested through the registry (tests/eval/test_kinds.py)
        assert tests.is_dir() and any(tests.glob("test_*.py")), f"soupkit/{package}/ has no tests/{package}/"


def test_files_are_named_by_subject() -> None:
    for path in sorted(TESTS.rglob("*.py")):
        words = path.stem.split("_")
        named_by_history = any(w in HISTORY_WORDS or HISTORY_TOKEN.fullmatch(w) for w in words)
        assert not named_by_history, f"{path.relative_to(TESTS)} is named by history, not subject"
