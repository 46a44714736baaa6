"""The merge config's schema (``MergeConfig``, the file's fields) and its validating parser, shared by
soupkit's own format (``soupkit.merging.config``) and mergekit's (``soupkit.merging.mergekit``), which both build
a ``MergeConfig``: the one module the two readers import, so neither imports the other back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from soupkit.errors import RecipeError, SoupkitError, suggest
from soupkit.merging.registry import MergeMethod, get_method
from soupkit.options import OutputOptions

#: output options a config may set (force is the caller's decision, never a file's)
CONFIG_OPTIONS = tuple(name for name in OutputOptions.model_fields if name != "force")


class _TensorRule(BaseModel):
    """One entry of ``tensors:``: parameters for the tensors whose name matches ``match``."""

    model_config = ConfigDict(extra="forbid")

    match: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(min_length=1)


class TensorRules:
    """Per-tensor parameters: the config's ``parameters`` updated by the first rule whose pattern matches the
    tensor's name (a callable ``key -> parameters``, as mergekit's per-layer gradients are)."""

    def __init__(self, defaults: Mapping[str, Any], rules: list[tuple[str, dict[str, Any]]]):
        self.defaults, self.rules = dict(defaults), rules

    def __call__(self, key: str) -> dict[str, Any]:
        for pattern, parameters in self.rules:
            if fnmatchcase(key, pattern):
                return {**self.defaults, **parameters}
        return dict(self.defaults)


class _File(BaseModel):
    """The fields of a merge config file (the method's parameters are checked by the method's own model)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(min_length=1)
    models: list[str | dict[str, Any]] = Field(min_length=1)
    base: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    eval: str | None = Field(default=None, min_length=1)
    tensors: list[_TensorRule] = Field(default_factory=list)


FIELDS = (*_File.model_fields, *CONFIG_OPTIONS)


class MergeConfig(BaseModel):
    """A validated merge config: every path resolved and checked to exist, parameters bound to the method.
    ``layer_parameters``, when set, gives each tensor's parameters from its name (mergekit's per-layer
    gradients and filters); ``parameters`` is then empty."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: str
    method: str
    models: list[Path]
    base: Path | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    options: OutputOptions = Field(default_factory=OutputOptions)
    eval: str | None = None
    layer_parameters: Callable[[str], Mapping[str, Any]] | None = None
    #: a mergekit frankenmerge (``slices`` cutting or stacking layers): ``soupkit.merging.slices.SlicePlan``
    slices: Any = None

    @property
    def dtype(self) -> str | None:
        return self.options.dtype

    @property
    def include(self) -> tuple[str, ...]:
        return self.options.include

    @property
    def exclude(self) -> tuple[str, ...]:
        return self.options.exclude


class _Parser:
    """Validation of one config; every error names the config and the field."""

    def __init__(self, source: str, folder: Path):
        self.source = source
        self.folder = folder

    def fail(self, where: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.source}: {where}: {problem}")

    def path(self, value: Any, where: str) -> Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise self.fail(where, f"expected a file path, got {value!r}")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.folder / path
        if not path.exists():
            raise self.fail(where, f"{path}: no such file")
        return path

    def parse(self, data: Mapping[str, Any]) -> MergeConfig:
        own = {k: v for k, v in data.items() if k not in CONFIG_OPTIONS}
        try:
            file = _File.model_validate(own)
        except ValidationError as error:
            raise self._explain(error) from None
        try:
            spec = get_method(file.method)
            options = OutputOptions.build({k: v for k, v in data.items() if k in CONFIG_OPTIONS})
        except SoupkitError as error:
            raise RecipeError(f"{self.source}: {error}") from None
        paths, params = self.models(spec, file)
        base = self.base(spec, file.base)
        try:
            spec.validate(params, len(paths))  # values and counts, before any tensor is read
        except SoupkitError as error:
            raise RecipeError(f"{self.source}: {error}") from None
        rules = self.tensor_rules(spec, file, params, len(paths))
        return MergeConfig(source=self.source, method=spec.name, models=paths, base=base,
                           parameters={} if rules else params, options=options, eval=self.recipe(file.eval),
                           layer_parameters=TensorRules(params, rules) if rules else None)

    def tensor_rules(self, spec: MergeMethod, file: _File, params: dict[str, Any], n_models: int
                     ) -> list[tuple[str, dict[str, Any]]]:
        """``tensors:`` entries, each rule's parameters validated merged over the global ones."""
        rules = []
        for index, rule in enumerate(file.tensors):
            where = f"tensors[{index}].parameters"
            for name in rule.parameters:
                if name not in spec.parameters:
                    raise self.fail(f"{where}.{name}", f"method {spec.name!r} has no parameter {name!r}."
                                    f"{suggest(str(name), spec.parameters)}")
                if name in spec.auxiliary:
                    raise self.fail(f"{where}.{name}", "tensor files cannot be set per tensor")
            try:
                spec.validate({**params, **rule.parameters}, n_models)
            except SoupkitError as error:
                raise self.fail(where, str(error)) from None
            rules.append((rule.match, dict(rule.parameters)))
        return rules

    def _explain(self, error: ValidationError) -> RecipeError:
        errors = error.errors()  # a misspelt field explains the "missing" one: name it first
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = ".".join(str(p) for p in first["loc"]) or "config"
        if first["type"] == "extra_forbidden":
            name = str(first["loc"][-1])
            return RecipeError(f"{self.source}: unknown field {name!r}.{suggest(name, FIELDS)} "
                               f"Valid fields: {', '.join(FIELDS)}")
        if first["type"] == "missing":
            hint = {"method": " (`soupkit methods` lists them)", "models": " (a list of paths or {path: ...})"}
            return self.fail(loc, f"missing{hint.get(loc, '')}")
        return self.fail(loc.split(".")[0], f"{first['msg']} (got {first.get('input')!r})")

    def base(self, spec: MergeMethod, value: str | None) -> Path | None:
        if value is not None and not spec.takes_base:
            raise self.fail("base", f"method {spec.name!r} does not use a base model; remove the field")
        if value is None and spec.needs_base:
            raise self.fail("base", f"method {spec.name!r} needs a base model (the pre-trained checkpoint)")
        return None if value is None else self.path(value, "base")

    def models(self, spec: MergeMethod, file: _File) -> tuple[list[Path], dict[str, Any]]:
        """Each model's path, and the method parameters with per-model values gathered into lists."""
        per_model_names = {p.name for p in spec.parameters.values() if p.per_model}
        accepted = sorted(["path"] + [n[:-1] if n.endswith("s") else n for n in per_model_names])
        paths: list[Path] = []
        values: dict[str, dict[int, Any]] = {}
        for index, entry in enumerate(file.models):
            where = f"models[{index}]"
            entry = {"path": entry} if isinstance(entry, str) else entry
            if "path" not in entry:
                raise self.fail(where, "expected a path or a mapping with a 'path' field")
            paths.append(self.path(entry["path"], f"{where}.path"))
            for key, value in entry.items():
                if key == "path":
                    continue
                name = key if key in per_model_names else f"{key}s"
                if name not in per_model_names:
                    raise self.fail(f"{where}.{key}", f"method {spec.name!r} has no per-model parameter {key!r}."
                                    f"{suggest(str(key), accepted)} Per-model fields: {', '.join(accepted)}")
                if name in spec.auxiliary:
                    value = str(self.path(value, f"{where}.{key}"))
                values.setdefault(name, {})[index] = value
        return paths, self.parameters(spec, file.parameters, values, len(paths))

    def parameters(self, spec: MergeMethod, given: dict[str, Any], per_model: dict[str, dict[int, Any]],
                   n_models: int) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, value in given.items():
            if name not in spec.parameters:
                raise self.fail(f"parameters.{name}", f"method {spec.name!r} has no parameter {name!r}."
                                f"{suggest(str(name), spec.parameters)} Its parameters: "
                                f"{', '.join(spec.parameters) or 'none'}")
            if name in spec.auxiliary and isinstance(value, list):
                value = [str(self.path(v, f"parameters.{name}[{i}]")) for i, v in enumerate(value)]
            params[name] = value
        for name, by_model in per_model.items():
            fallback = params.get(name)
            if isinstance(fallback, list):
                raise self.fail(f"parameters.{name}", "set it either per model (in models) or here, not both")
            if fallback is None and name == "weights":
                fallback = 1.0  # the default weight of every method taking weights
            missing = [i for i in range(n_models) if i not in by_model]
            if missing and fallback is None:
                singular = name[:-1] if name.endswith("s") else name
                raise self.fail(f"models[{missing[0]}]", f"no {singular!r} (other models set one); set it for "
                                f"every model or give a default in parameters")
            params[name] = [by_model.get(i, fallback) for i in range(n_models)]
        return params

    def recipe(self, value: str | None) -> str | None:
        if value is None:
            return None
        if value.endswith((".yaml", ".yml")) or "/" in value:
            return str(self.path(value, "eval"))
        return value  # a built-in recipe name, resolved by the evaluator
