"""Adapter registries: one decorator on a plain function registers a model kind or a data kind.

```python
@model_adapter("timm")
def timm_model(name: str, num_classes: int = 1000, weights: Path | None = None, *, context: BuildContext) -> ...:
    ...
```

The function's signature is the recipe schema of that kind: every parameter before ``*`` is a recipe key
(validated by pydantic with extra keys forbidden, so a misspelt key gets a "did you mean"); parameters annotated
``Path`` are resolved against the recipe's folder. The keyword-only ``context`` receives what the adapter may
need from the evaluator (the recipe folder, the model's preprocessing for data adapters).
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError, suggest
from soupkit.registry import Registry


@dataclass(frozen=True)
class Adapter:
    """A registered adapter: its kind name, function and the pydantic model of its recipe keys."""

    kind: str
    fn: Callable[..., Any]
    schema: Any  # a pydantic BaseModel subclass
    path_fields: tuple[str, ...]
    description: str

    @property
    def fields(self) -> list[str]:
        return list(self.schema.model_fields)


def _is_path(hint: Any) -> bool:
    if hint is Path:
        return True
    return any(arg is Path for arg in typing.get_args(hint))


class AdapterRegistry(Registry[Adapter]):
    """Kind name -> adapter for one family ("model kind", "data kind"): soupkit's one registry implementation
    (``soupkit.registry``), plus the decorator that builds an adapter from its function and recipe validation.
    Adapters from other packages register through the family's entry-point group."""

    def __init__(self, what: str, builtins: str, group: str):
        super().__init__(what, builtins, group=group, error=RecipeError)

    def register(self, kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``fn`` under ``kind``; a name registered twice is an error."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(kind, _adapter(kind, fn), owner=fn.__module__)
            return fn

        return decorate

    def validate(self, kind: str, params: Mapping[str, Any], *, where: str, folder: Path,
                 also_allowed: tuple[str, ...] = ()) -> dict[str, Any]:
        """Check ``params`` against the adapter's signature; returns them with defaults filled in and paths
        resolved. ``where`` prefixes every error (``"recipe.yaml: model"``); ``also_allowed`` are keys the
        caller handles itself (listed in the "unknown key" message)."""
        from pydantic import ValidationError

        adapter = self.get(kind, f"{where}.kind: ")
        try:
            values = adapter.schema.model_validate(dict(params)).model_dump()
        except ValidationError as error:
            raise RecipeError(pydantic_message(error, where, ["kind", *adapter.fields, *also_allowed])) from None
        for name in adapter.path_fields:
            if values.get(name) is not None:
                values[name] = resolve_path(values[name], folder, f"{where}.{name}")
        return values


def _adapter(kind: str, fn: Callable[..., Any]) -> Adapter:
    from pydantic import ConfigDict, create_model

    hints = typing.get_type_hints(fn)
    fields: dict[str, Any] = {}
    paths = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            continue
        hint = hints.get(param.name, Any)
        fields[param.name] = (hint, ... if param.default is inspect.Parameter.empty else param.default)
        if _is_path(hint):
            paths.append(param.name)
    schema = create_model(f"{kind}_params", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                          **fields)
    doc = inspect.getdoc(fn) or ""
    return Adapter(kind, fn, schema, tuple(paths), doc.split("\n\n")[0].replace("\n", " "))


def resolve_path(value: Any, folder: Path, where: str) -> Path:
    """``~`` and ``$VARS`` expanded, relative paths taken from ``folder``; an unset variable is an error (the
    shipped recipes mark their placeholders that way)."""
    text = os.path.expandvars(os.path.expanduser(str(value)))
    if "$" in text:
        var = text[text.index("$"):].split("/")[0].strip("${}")
        raise RecipeError(f"{where}: environment variable {var} is not set (path {value!r}); set it or edit the recipe")
    path = Path(text)
    return path if path.is_absolute() else folder / path


def pydantic_message(error: Any, where: str, allowed: list[str]) -> str:
    """The first pydantic error as one line naming the field, with a suggestion for a misspelt key."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    field = f"{where}.{loc}" if loc else where
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        return f"{field}: unknown key {key!r}.{suggest(key, allowed)} Allowed: {', '.join(allowed)}"
    if first["type"] == "missing":
        return f"{field}: missing required key"
    return f"{field}: {first['msg']} (got {first.get('input')!r})"


models = AdapterRegistry("model kind", "soupkit.eval.models", "soupkit.models")
data = AdapterRegistry("data kind", "soupkit.eval.data", "soupkit.data")
model_adapter = models.register
data_adapter = data.register


# ----------------------------------------------------------------------------------------------- documentation


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    text = text or str(hint).replace("typing.", "").replace("pathlib.", "")
    return " ".join(text.split()).replace("|", "or")


def _key_cell(name: str, field: Any) -> str:
    hint = _type_name(field.annotation)
    default = "required" if field.is_required() else f"= {field.default!r}"
    return f"`{name}` {hint} {default}"


def kinds_markdown() -> str:
    """``docs/kinds.md``: every built-in model and data kind, what it is and its recipe keys, from the registries
    (the adapters' signatures and docstrings). Regenerate with ``python -m soupkit.eval.registry > docs/kinds.md``;
    a test fails when the file is stale."""
    lines = ["# Evaluator kinds", "",
             "<!-- generated by `python -m soupkit.eval.registry > docs/kinds.md`; do not edit by hand -->", "",
             "A recipe's `model:` names one model kind and each dataset entry one data kind (`kind: NAME`); the",
             "other keys of the entry are the kind's parameters below. A new kind is a decorated function in a new",
             "file of `soupkit/eval/models/` (`@model_adapter`) or `soupkit/eval/data/` (`@data_adapter`), or in",
             "another package registered through the `soupkit.models` / `soupkit.data` entry-point group.", ""]
    for registry, title in ((models, "Model kinds"), (data, "Data kinds")):
        lines += [f"## {title}", "", "| kind | what it is | recipe keys | defined in |", "|---|---|---|---|"]
        for adapter in registry:
            owner = registry.owner(adapter.kind)
            if not owner.startswith("soupkit."):
                continue  # plugins document themselves
            keys = "<br>".join(_key_cell(n, f) for n, f in adapter.schema.model_fields.items()) or "-"
            what = " ".join(adapter.description.split()).replace("|", "\\|") or "-"
            lines.append(f"| `{adapter.kind}` | {what} | {keys} | `{owner}` |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # run as a script this file is a second module: use the registries adapters fill
    from soupkit.eval import registry as _registry

    print(_registry.kinds_markdown(), end="")
