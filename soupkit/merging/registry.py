"""The merge-method registry: one decorator on a plain function over tensors registers a method.

```python
@merge_method("linear", pretty_name="Linear (weighted average)", reference="https://arxiv.org/abs/2203.05482")
def linear(tensors: Sequence[Tensor], *, weights: list[float] | None = None, normalize: bool = True) -> Tensor:
    ...
```

The function's signature is the method's schema (as in mergekit's ``easy_define``): keyword parameters
annotated ``list[float]`` are per-model (one value per input), everything else is global. Two names are
reserved: ``base`` (the base model's tensor; declares that the method needs ``--base``) and ``key`` (the tensor
name, for methods that seed randomness per tensor). The same schema validates library calls, YAML merge configs
and writes the CLI help, so they never drift apart.

Methods are pure: they receive float32/float64 tensors on the compute device (a lazy, read-once sequence of the
inputs, so a weighted mean never holds more than one input at a time), must not modify them in place, and
return one tensor of the same shape.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from soupkit.errors import ParameterError, suggest, unknown_choice

_RESERVED = ("base", "key", "offset")


@dataclass(frozen=True)
class Parameter:
    """One method parameter, derived from the function signature."""

    name: str
    kind: type  # float, int, bool, str
    per_model: bool
    default: Any
    required: bool
    optional: bool  # annotation admits None

    def describe(self) -> str:
        kind = f"list[{self.kind.__name__}] (one per model)" if self.per_model else self.kind.__name__
        default = "required" if self.required else f"default {self.default!r}"
        return f"{self.name}: {kind}, {default}"


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method."""

    name: str
    fn: Callable[..., Any]
    pretty_name: str
    reference: str | None
    description: str
    min_models: int
    max_models: int | None
    elementwise: bool
    check: Callable[..., None] | None
    parameters: dict[str, Parameter] = field(default_factory=dict)
    needs_base: bool = False
    takes_key: bool = False
    propagates_nonfinite: bool = False

    def bind(self, params: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Validate ``params`` for ``n_models`` inputs; returns the full parameter dict (defaults filled)."""
        if n_models < self.min_models:
            need = "exactly" if self.max_models == self.min_models else "at least"
            raise ParameterError(f"method {self.name!r} needs {need} {self.min_models} input models, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            need = "exactly" if self.max_models == self.min_models else "at most"
            raise ParameterError(f"method {self.name!r} takes {need} {self.max_models} input models, got {n_models}")
        unknown = [k for k in params if k not in self.parameters]
        if unknown:
            valid = ", ".join(self.parameters) or "none"
            raise ParameterError(
                f"method {self.name!r} has no parameter {unknown[0]!r}.{suggest(unknown[0], self.parameters)} "
                f"Its parameters: {valid}"
            )
        bound: dict[str, Any] = {}
        for name, spec in self.parameters.items():
            if name not in params or params[name] is None:
                if spec.required:
                    raise ParameterError(f"method {self.name!r} needs parameter {name!r}")
                bound[name] = spec.default
                continue
            bound[name] = _coerce(self.name, spec, params[name], n_models)
        if self.check is not None:
            self.check(n_models=n_models, **bound)
        return bound

    def help(self) -> str:
        lines = [f"{self.name}: {self.pretty_name}", f"  {self.description}"]
        lines += [f"  - {p.describe()}" for p in self.parameters.values()]
        if self.needs_base:
            lines.append("  - needs a base model (--base)")
        if self.reference:
            lines.append(f"  paper: {self.reference}")
        return "\n".join(lines)


def _coerce(method: str, spec: Parameter, value: Any, n_models: int) -> Any:
    def one(item: Any) -> Any:
        if spec.kind is bool:
            if isinstance(item, bool):
                return item
            if isinstance(item, str) and item.lower() in ("true", "false", "1", "0", "yes", "no"):
                return item.lower() in ("true", "1", "yes")
            raise ParameterError(f"{method}: parameter {spec.name!r} must be true or false, got {item!r}")
        try:
            if spec.kind is int and isinstance(item, float) and not item.is_integer():
                raise ValueError
            return spec.kind(item)
        except (TypeError, ValueError):
            raise ParameterError(
                f"{method}: parameter {spec.name!r} must be a {spec.kind.__name__}, got {item!r}"
            ) from None

    if spec.per_model:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * n_models  # one number applies to every model
        if not isinstance(value, (list, tuple)):
            raise ParameterError(f"{method}: parameter {spec.name!r} must be a list with one value per model")
        if len(value) != n_models:
            raise ParameterError(
                f"{method}: parameter {spec.name!r} has {len(value)} values for {n_models} input models"
            )
        return [one(v) for v in value]
    if isinstance(value, (list, tuple)):
        raise ParameterError(f"{method}: parameter {spec.name!r} takes one value, got a list")
    return one(value)


def _parameters(fn: Callable[..., Any]) -> dict[str, Parameter]:
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    result: dict[str, Parameter] = {}
    positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 1:
        raise TypeError(f"merge method {fn.__name__} must take exactly one positional argument (the tensors)")
    for param in signature.parameters.values():
        if param.kind is not param.KEYWORD_ONLY or param.name in _RESERVED:
            continue
        hint = hints.get(param.name, float)
        args = typing.get_args(hint)
        optional = type(None) in args
        core = next((a for a in args if a is not type(None)), hint) if args and optional else hint
        per_model = typing.get_origin(core) in (list, Sequence, tuple)
        kind = typing.get_args(core)[0] if per_model else core
        if kind not in (float, int, bool, str):
            raise TypeError(f"merge method {fn.__name__}: parameter {param.name} has unsupported type {hint}")
        required = param.default is param.empty
        result[param.name] = Parameter(param.name, kind, per_model, None if required else param.default,
                                       required, optional)
    return result


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    pretty_name: str,
    reference: str | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool = True,
    check: Callable[..., None] | None = None,
    propagates_nonfinite: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as merge method ``name``. ``elementwise`` methods may be fed flat chunks of a tensor
    (so huge tensors stream); others get whole tensors. ``check(n_models=..., **params)`` validates values.
    ``propagates_nonfinite``: a NaN/Inf in any input always makes the output NaN/Inf (true of a mean with
    positive weights), so the engine checks the one output instead of every input."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered (by {_REGISTRY[name].fn.__module__})")
        signature = inspect.signature(fn)
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            pretty_name=pretty_name,
            reference=reference,
            description=inspect.getdoc(fn).split("\n\n")[0].replace("\n", " ") if fn.__doc__ else pretty_name,
            min_models=min_models,
            max_models=max_models,
            elementwise=elementwise,
            check=check,
            parameters=_parameters(fn),
            needs_base="base" in signature.parameters,
            takes_key="key" in signature.parameters,
            propagates_nonfinite=propagates_nonfinite,
        )
        return fn

    return register


def _load_builtin_methods() -> None:
    import soupkit.merging.methods  # noqa: F401  (each module registers itself on import)


def get_method(name: str) -> MergeMethod:
    """Look up a method by name; unknown names list what is available and the nearest match."""
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ParameterError(unknown_choice("merge method", name, _REGISTRY)) from None


def list_methods() -> list[str]:
    """Names of every registered merge method."""
    _load_builtin_methods()
    return sorted(_REGISTRY)
