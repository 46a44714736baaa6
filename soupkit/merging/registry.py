"""Merge methods: one decorated, typed function per method, and everything else derived from its signature.

```python
@merge_method("ties", pretty_name="TIES-merging", reference="https://arxiv.org/abs/2306.01708", elementwise=False)
def ties(tensors: Sequence[Tensor], *, base: Tensor,
         weights: float | list[float] = 1.0,
         density: Annotated[float | list[float], Param("Fraction of each task vector kept.", gt=0, le=1)] = 0.2,
         convention: Literal["soupkit", "mergekit"] = "soupkit") -> Tensor:
    ...
```

The keyword-only parameters are the method's parameters: ``list[...]`` ones (``float | list[float]``) are per
model (one value per input; one number, the default included, applies to every input), the others global;
``Literal[...]`` lists a parameter's choices; ``Param`` adds help text and bounds. Defaults are the true ones:
``soupkit methods`` shows them and provenance records them. From this one
declaration come the ``soupkit merge`` flags and their help, validation with one-line errors (a pydantic model:
types, bounds, finite numbers), ``soupkit methods``, merge-config validation and the methods table in the docs.

Engine context is asked for by name, never passed otherwise: ``base`` (the base model's tensor; the method then
needs ``--base``), ``key`` (the tensor's name), ``offset`` (where an elementwise chunk starts in the flat tensor).
A parameter annotated ``Annotated[..., TensorFiles("Fisher")]`` is given as one file per input and received as
each file's matching tensor chunk (or None where a file lacks the key).

Methods are pure functions over float32/float64 tensors on the compute device (a lazy, read-once sequence of the
inputs, so a weighted mean holds one input at a time); they must not modify their inputs. Method modules import
torch lazily (``soupkit._lazy.torch``) so that declaring them costs nothing: ``soupkit merge --help`` stays fast.
Methods from other packages register through the ``soupkit.methods`` entry-point group.
"""

from __future__ import annotations

import builtins
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, create_model

from soupkit.errors import ParameterError, suggest
from soupkit.options import user_name
from soupkit.registry import Registry

#: engine context a method may declare, and what it receives
CONTEXT = {
    "base": "the base model's tensor (the method needs --base; with a default of None, --base is optional)",
    "key": "the tensor's name (e.g. to seed randomness per tensor)",
    "offset": "where this flat chunk starts in the tensor (elementwise methods)",
}
_KINDS = (float, int, bool, str)


@dataclass(frozen=True)
class Param:
    """Help text and bounds of a parameter: ``Annotated[float, Param("Task-vector scaling.", ge=0)]``. Bounds
    apply to each value of a per-model parameter."""

    help: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None


@dataclass(frozen=True)
class TensorFiles:
    """Marks a per-model parameter given as tensor files keyed like the inputs (e.g. Fisher information); the
    method receives, in step with the inputs, each file's chunk of the same tensor (None where it lacks it)."""

    what: str


@dataclass(frozen=True)
class Parameter:
    """One method parameter, read from the function's signature."""

    name: str
    kind: type  # float, int, bool or str
    per_model: bool
    default: Any
    required: bool
    help: str = ""
    files: TensorFiles | None = None
    bounds: Param = field(default_factory=Param)
    choices: tuple[str, ...] = ()  # a Literal[...] parameter's values

    def interval(self) -> str:
        """The allowed range, as a user reads it: ``in (0, 1]``, ``>= 0``."""
        b = self.bounds
        low = f"({_number(b.gt)}" if b.gt is not None else f"[{_number(b.ge)}" if b.ge is not None else None
        high = f"{_number(b.lt)})" if b.lt is not None else f"{_number(b.le)}]" if b.le is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>' if low[0] == '(' else '>='} {low[1:]}"
        return f"{'<' if high[-1] == ')' else '<='} {high[:-1]}" if high else "valid"

    def type_name(self) -> str:
        kind = "path" if self.files else " | ".join(map(repr, self.choices)) if self.choices else self.kind.__name__
        return f"{kind} per model" if self.per_model else kind

    def describe(self) -> str:
        default = "required" if self.required else f"default {_show(self.default)}"
        return f"{self.name} ({self.type_name()}, {default})"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _show(value: Any) -> str:
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


class MethodParams(BaseModel):
    """Bound, validated parameters of one method call; ``check`` callbacks receive this object."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    _n_models: int = PrivateAttr(default=0)

    @property
    def n_models(self) -> int:
        return self._n_models

    def values(self) -> dict[str, Any]:
        """Parameter name -> value, as the method function receives them."""
        return {name: getattr(self, name) for name in type(self).model_fields}


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
    check: Callable[[Any], None] | None
    parameters: dict[str, Parameter] = field(default_factory=dict)
    context: frozenset[str] = frozenset()
    propagates_nonfinite: bool = False
    schema: type[MethodParams] = MethodParams
    optional_base: bool = False  # ``base: Tensor | None = None``: merges with or without --base
    linear: Callable[[Mapping[str, Any], int], list[float] | None] | None = None

    @property
    def needs_base(self) -> bool:
        """--base is required."""
        return "base" in self.context and not self.optional_base

    @property
    def takes_base(self) -> bool:
        """--base is accepted (required or optional)."""
        return "base" in self.context

    @property
    def auxiliary(self) -> dict[str, TensorFiles]:
        """Parameters given as tensor files: name -> marker."""
        return {p.name: p.files for p in self.parameters.values() if p.files is not None}

    def validate(self, params: Mapping[str, Any], n_models: int) -> MethodParams:
        """``params`` (library values, config values or CLI strings) checked for ``n_models`` inputs."""
        self._check_count(n_models)
        unknown = [k for k in params if k not in self.parameters]
        if unknown:
            name = user_name(unknown[0])
            owners = [m.name for m in METHODS if unknown[0] in m.parameters]
            raise ParameterError(f"method {self.name!r} has no parameter {name if name != unknown[0] else repr(name)}."
                                 f"{suggest(unknown[0], self.parameters)} Its parameters: "
                                 f"{', '.join(map(user_name, self.parameters)) or 'none'}"
                                 + (f" ({name} is a parameter of {', '.join(owners)})" if owners else ""))
        given = {k: _per_model(self.name, self.parameters[k], v, n_models) for k, v in params.items() if v is not None}
        for name, spec in self.parameters.items():  # a per-model default (density 0.2) applies to every model
            if name not in given and spec.per_model and spec.default is not None and not spec.files:
                given[name] = _per_model(self.name, spec, spec.default, n_models)
        try:
            bound = self.schema.model_validate(given)
        except ValidationError as error:
            raise ParameterError(_message(self, error)) from None
        for name, spec in self.parameters.items():
            values = getattr(bound, name)
            if (spec.per_model and spec.kind is float and isinstance(values, list) and values
                    and not math.isfinite(sum(map(abs, values)))):
                raise ParameterError(f"{self.name}: {user_name(name)} are too large: their sum overflows, got "
                                     f"{', '.join(map(str, values))}")
        bound._n_models = n_models
        if self.check is not None:
            try:
                self.check(bound)
            except ParameterError as error:
                message = str(error)
                raise ParameterError(message if message.startswith(f"{self.name}:") else f"{self.name}: {message}"
                                     ) from None
        return bound

    def bind(self, params: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Validated parameters with defaults filled in, as the method function takes them."""
        return self.validate(params, n_models).values()

    def linear_weights(self, params: Mapping[str, Any], n_models: int) -> list[float] | None:
        """The weights ``w_i`` with ``output = sum_i w_i x_i`` when the method, with these bound parameters, is
        linear in its inputs taken as updates over a zero base (so a soup of LoRA adapters is exactly an
        adapter); None when it is not. Declared by the method (``merge_method(linear=...)``)."""
        return None if self.linear is None else self.linear(params, n_models)

    def _check_count(self, n_models: int) -> None:
        exact = self.max_models == self.min_models
        if n_models < self.min_models:
            raise ParameterError(f"method {self.name!r} needs {'exactly' if exact else 'at least'} "
                                 f"{self.min_models} input models, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise ParameterError(f"method {self.name!r} takes {'exactly' if exact else 'at most'} "
                                 f"{self.max_models} input models, got {n_models}")


def _per_model(method: str, spec: Parameter, value: Any, n_models: int) -> Any:
    """CLI strings split at commas; one value of a per-model parameter applies to every model."""
    if isinstance(value, str) and spec.per_model:
        value = [v.strip() for v in value.split(",") if v.strip()]
        if len(value) == 1:
            value = value[0]
    if not spec.per_model:
        return value
    if not isinstance(value, (list, tuple)):
        return [value] * n_models
    if len(value) != n_models:
        raise ParameterError(f"{method}: {user_name(spec.name)} has {len(value)} values for {n_models} input models")
    return list(value)


_PLAIN = {"int_parsing": "must be an integer", "int_from_float": "must be an integer", "int_type": "must be an integer",
          "float_parsing": "must be a number", "float_type": "must be a number",
          "finite_number": "must be a finite number", "bool_parsing": "must be true or false",
          "bool_type": "must be true or false", "string_type": "must be text", "list_type": "must be a list"}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _message(method: MergeMethod, error: ValidationError) -> str:
    """The first pydantic error as one line: ``ties: density[1] must be in (0, 1], got 1.5``."""
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    where = user_name(loc[0]) + "".join(f"[{p}]" for p in loc[1:]) if loc else "parameters"
    if first["type"] == "missing":
        return f"method {method.name!r} needs parameter {user_name(loc[0])}"
    spec = method.parameters.get(loc[0]) if loc else None
    if first["type"] in _BOUNDS and spec is not None:
        text = f"must be {spec.interval()}"
    elif first["type"] == "literal_error" and spec is not None and spec.choices:
        return f"{method.name}: {where} must be one of {', '.join(spec.choices)}, got {first.get('input')!r}"
    else:
        text = _PLAIN.get(first["type"]) or first["msg"].removeprefix("Value error, ")
    return f"{method.name}: {where} {text[0].lower()}{text[1:]}, got {_show(first.get('input'))}"


# --------------------------------------------------------------------------------------------- signatures


class _Names(dict):
    """Evaluates a method's string annotations without importing torch: names the module defines only for type
    checkers (``Tensor``) read as ``Any``."""

    def __init__(self, namespace: Mapping[str, Any]):
        super().__init__()
        self._namespace = namespace

    def __missing__(self, name: str) -> Any:
        if name in self._namespace:
            return self._namespace[name]
        return getattr(builtins, name, Any)


def _annotation(fn: Callable[..., Any], param: inspect.Parameter) -> Any:
    hint = param.annotation
    if hint is inspect.Parameter.empty:
        return float
    if isinstance(hint, str):
        hint = eval(hint, {}, _Names(fn.__globals__))
    return hint


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _unwrap(hint: Any) -> tuple[Any, list[Any]]:
    """``Annotated[X, m...] | None`` -> (X without None, metadata)."""
    metadata: list[Any] = []
    if typing.get_origin(hint) is typing.Annotated:
        hint, *metadata = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
        if typing.get_origin(hint) is typing.Annotated:
            hint, *more = typing.get_args(hint)
            metadata += more
    return hint, metadata


def _parameter(fn: Callable[..., Any], param: inspect.Parameter) -> tuple[Parameter, Any]:
    """One keyword-only parameter -> (its description, its pydantic field)."""
    hint, metadata = _unwrap(_annotation(fn, param))
    files = next((m for m in metadata if isinstance(m, TensorFiles)), None)
    info = next((m for m in metadata if isinstance(m, Param)), Param())
    per_model, kind = _per_model_kind(hint)
    choices: tuple[str, ...] = ()
    if typing.get_origin(kind) is typing.Literal:
        choices = tuple(typing.get_args(kind))
        if not choices or not all(isinstance(c, str) for c in choices):
            raise TypeError(f"merge method {fn.__name__}: parameter {param.name}: Literal choices must be strings")
        kind = str
    if files is not None:
        kind, per_model = str, True
    if kind not in _KINDS:
        raise TypeError(f"merge method {fn.__name__}: parameter {param.name} has unsupported type {hint}; "
                        f"use float, int, bool, str or a list of one of them")
    required = param.default is inspect.Parameter.empty
    bounds = {k: v for k, v in (("ge", info.ge), ("gt", info.gt), ("le", info.le), ("lt", info.lt)) if v is not None}
    strict = kind is str and not choices  # a Literal is exact already
    checks: list[Any] = [Field(strict=strict, **bounds)] if bounds or strict else []
    if kind in (float, int):
        checks.append(BeforeValidator(_not_bool))  # `scaling: true` in a config is a mistake, not 1.0
    base_type: Any = typing.Literal[choices] if choices else kind  # type: ignore[valid-type]
    item = typing.Annotated[(base_type, *checks)] if checks else base_type
    value_type = list[item] if per_model else item  # type: ignore[valid-type]
    if not required and param.default is None:
        value_type = value_type | None
    if per_model and not required and param.default is not None and not isinstance(param.default, (int, float)):
        raise TypeError(f"merge method {fn.__name__}: parameter {param.name}: a per-model default is one value "
                        f"for every model (density: float | list[float] = 0.2)")
    spec = Parameter(param.name, kind, per_model, None if required else param.default, required,
                     info.help, files, info, choices)
    return spec, (value_type, ... if required else param.default)


def _per_model_kind(hint: Any) -> tuple[bool, Any]:
    """``list[float]`` or ``float | list[float]`` -> (True, float); ``float`` -> (False, float)."""
    if typing.get_origin(hint) in (list, tuple, Sequence):
        args = typing.get_args(hint)
        return True, _unwrap(args[0])[0] if args else float
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        lists = [a for a in typing.get_args(hint) if typing.get_origin(a) in (list, tuple, Sequence)]
        if len(lists) == 1 and typing.get_args(lists[0]):
            return True, _unwrap(typing.get_args(lists[0])[0])[0]
    return False, hint


def _signature(name: str, fn: Callable[..., Any]) -> tuple[dict[str, Parameter], type[MethodParams], frozenset[str]]:
    parameters = inspect.signature(fn).parameters.values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 1 or any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in parameters):
        raise TypeError(f"merge method {fn.__name__} must take one positional argument (the tensors) and "
                        f"keyword-only parameters (no *args/**kwargs)")
    specs: dict[str, Parameter] = {}
    fields: dict[str, Any] = {}
    context = []
    for param in parameters:
        if param.kind is not param.KEYWORD_ONLY:
            continue
        if param.name in CONTEXT:
            context.append(param.name)
            continue
        specs[param.name], fields[param.name] = _parameter(fn, param)
    schema = create_model(f"{name}_parameters", __base__=MethodParams, **fields)
    return specs, schema, frozenset(context)


def _optional_base(fn: Callable[..., Any]) -> bool:
    """``base: Tensor | None = None``: the method merges with or without a base model."""
    base = inspect.signature(fn).parameters.get("base")
    return base is not None and base.default is None


# --------------------------------------------------------------------------------------------- registry

METHODS: Registry[MergeMethod] = Registry("merge method", "soupkit.merging.methods", group="soupkit.methods",
                                          error=ParameterError)


def merge_method(
    name: str,
    *,
    pretty_name: str,
    reference: str | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool = True,
    check: Callable[[Any], None] | None = None,
    propagates_nonfinite: bool = False,
    linear: Callable[[Mapping[str, Any], int], list[float] | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as merge method ``name``; its signature declares the parameters (module docstring).

    ``elementwise`` methods may be fed flat chunks of a tensor (so huge tensors stream); others get whole
    tensors. ``check(params)`` validates values together (it receives the bound ``MethodParams``, with
    ``n_models``) and raises ``ParameterError``. ``propagates_nonfinite``: NaN/Inf in any input always makes
    the output NaN/Inf (a mean with positive weights), so the engine checks one output instead of every input.
    ``linear(params, n_models)``: the weights ``w_i`` with ``output = sum_i w_i x_i`` over a zero base, or None
    where these parameters make the method non-linear (``MergeMethod.linear_weights``; LoRA adapters without a
    base are then merged exactly).
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not fn.__module__.startswith("soupkit.merging.methods"):
            METHODS.load()  # built-ins first: a plugin named like one is refused, never the built-in after it
        parameters, schema, context = _signature(name, fn)
        doc = inspect.getdoc(fn)
        METHODS.add(name, MergeMethod(
            name=name, fn=fn, pretty_name=pretty_name, reference=reference,
            description=doc.split("\n\n")[0].replace("\n", " ") if doc else pretty_name,
            min_models=min_models, max_models=max_models, elementwise=elementwise, check=check,
            parameters=parameters, context=context, propagates_nonfinite=propagates_nonfinite, schema=schema,
            optional_base=_optional_base(fn),
            linear=linear,
        ), owner=fn.__module__)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    """Look up a method by name; an unknown name lists what is available and the nearest match."""
    return METHODS.get(name)


def list_methods() -> list[str]:
    """Names of every registered merge method (built-ins and plugins)."""
    return METHODS.names()
