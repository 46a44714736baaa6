"""One registry implementation for every extension point: merge methods, evaluator model kinds, data kinds.

A ``Registry`` maps a name to an entry built from a decorated function. Built-in entries register when their
package is first imported; entries from other packages register through a Python entry-point group (the entry
point names a module whose import registers them). A duplicate name is an error, never a silent overwrite; an
unknown name lists what is available and the nearest match; a plugin that fails to import is one warning naming
it, never a crash.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from soupkit.errors import SoupkitError, unknown_choice

Entry = TypeVar("Entry")


class PluginWarning(UserWarning):
    """A plugin (an entry point of a soupkit group) could not be loaded; soupkit carries on without it."""


class Registry(Generic[Entry]):
    """Name -> entry for one family (``what``: "merge method", "model kind", ...).

    ``builtins``: the module whose import registers the built-in entries. ``group``: the entry-point group
    other packages register through (None: built-ins only).
    """

    def __init__(self, what: str, builtins: str, *, group: str | None = None,
                 error: type[SoupkitError] = SoupkitError):
        self.what = what
        self._builtins = builtins
        self._group = group
        self._error = error
        self._entries: dict[str, Entry] = {}
        self._owners: dict[str, str] = {}
        self._loaded = False

    def add(self, name: str, entry: Entry, owner: str) -> None:
        """Register ``entry`` under ``name`` (``owner``: the module defining it, for the duplicate message)."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered (by {self._owners[name]})")
        self._entries[name] = entry
        self._owners[name] = owner

    def load(self) -> None:
        """Import the built-ins, then every plugin of the entry-point group (once)."""
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtins)
        if self._group is not None:
            load_plugins(self._group, self.what)

    def get(self, name: str, where: str = "") -> Entry:
        """The entry called ``name``; an unknown name is a one-line error listing the available ones."""
        self.load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self._error(f"{where}{unknown_choice(self.what, str(name), self._entries)}") from None

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def owner(self, name: str) -> str:
        return self._owners[name]

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self.load()
        return iter([self._entries[name] for name in sorted(self._entries)])


def load_plugins(group: str, what: str, *, entry_points: Callable[..., object] | None = None) -> list[str]:
    """Import every module named by an entry point of ``group``; returns the names loaded. A plugin that fails
    (missing module, an exception on import, a name clash) is one ``PluginWarning`` naming it."""
    from importlib.metadata import entry_points as installed

    loaded = []
    for point in (entry_points or installed)(group=group):  # type: ignore[operator]
        try:
            point.load()
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            warnings.warn(f"{what} plugin {point.name!r} ({point.value}) failed to load and is skipped: {message}",
                          PluginWarning, stacklevel=2)
            continue
        loaded.append(point.name)
    return loaded
