"""PEP 562 lazy exports, shared by the packages whose public names live in torch-heavy modules."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, table: Mapping[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``table`` maps each public name to the module defining
    it, imported on first use and then cached in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*table, *(k for k in namespace if not k.startswith("_"))})

    return __getattr__, __dir__


class LazyModule:
    """A module imported on first attribute access: ``torch = LazyModule("torch")`` lets a module that only
    *declares* things (a merge method's signature) be imported without paying for torch (~3 s here)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)  # a dict lookup once imported
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


#: torch, imported when first used
torch: Any = LazyModule("torch")
