"""Merge configs: one YAML file describes a whole merge, validated before any tensor is read.

```yaml
method: ties
base: zeroshot.safetensors          # for methods that need one
models:                             # per-model parameters sit next to each path
  - path: finetuned_a.safetensors
    weight: 1.0                     # -> weights
    density: 0.3                    # -> density (ties' per-model list)
  - path: finetuned_b.safetensors
    weight: 0.5
    density: 0.2
parameters:                         # global parameters of the method
  scaling: 0.8
dtype: bf16                         # optional: fp32, fp16, bf16
include: ["encoder.*"]              # optional globs; the other tensors are copied from the first model
exclude: ["*.bias"]
eval: ../digits.yaml                # optional evaluation recipe, validated and passed on (MergeConfig.eval)
```

A model entry's key ``k`` sets the method's per-model parameter ``k`` or ``ks`` (``weight`` -> ``weights``,
``fisher`` -> ``fishers``); the method's signature is the schema, so configs, library calls and CLI flags
accept the same parameters. Relative paths resolve against the config file's folder. Examples for every method:
``recipes/merges/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError, SoupkitError, suggest
from soupkit.merging.engine import auxiliary_parameters, parse_dtype
from soupkit.merging.registry import MergeMethod, get_method

FIELDS = ("method", "base", "models", "parameters", "dtype", "include", "exclude", "eval")
#: keyword arguments of ``merge()`` that are not method parameters
ENGINE_OPTIONS = ("dtype", "precise", "device", "allow_missing", "allow_nonfinite", "include", "exclude",
                  "shard_size", "ema", "progress", "metadata", "chunk_elements", "recalibrate_bn")


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge config: every path resolved and checked to exist, parameters bound to the method."""

    source: str
    method: str
    models: list[Path]
    base: Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    eval: str | None = None


def load_merge_config(path_or_dict: str | Path | Mapping[str, Any]) -> MergeConfig:
    """Read and validate a merge config (a YAML path or an already-parsed mapping)."""
    if isinstance(path_or_dict, Mapping):
        return _Parser("<merge config>", Path.cwd()).parse(path_or_dict)
    path = Path(path_or_dict)
    if not path.is_file():
        raise RecipeError(f"{path}: no such merge config file")
    from soupkit.yaml_file import read_yaml

    data = read_yaml(path, "merge config")
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: a merge config is a mapping with fields {', '.join(FIELDS)}")
    return _Parser(str(path), path.resolve().parent).parse(data)


def merge_from_config(path_or_dict: str | Path | Mapping[str, Any], output: str | Path | None = None, *,
                      force: bool = False, **overrides: Any) -> Any:
    """Merge as a config describes; returns what ``soupkit.merge`` returns (the state dict, or the written path).

    ``overrides`` are ``merge()`` keyword arguments (engine options such as ``device`` or ``shard_size``, or
    method parameters); those given (not None or empty) take precedence over the config's.
    """
    from soupkit.merging import merge

    config = load_merge_config(path_or_dict)
    given = {k: v for k, v in overrides.items() if v is not None and not (isinstance(v, (tuple, list)) and not v)}
    spec = get_method(config.method)
    for name in given:
        if name not in ENGINE_OPTIONS and name not in spec.parameters:
            raise RecipeError(f"{config.source}: method {config.method!r} has no parameter {name!r} to override."
                              f"{suggest(name, [*spec.parameters, *ENGINE_OPTIONS])}")
    params = {**config.parameters, **{k: v for k, v in given.items() if k not in ENGINE_OPTIONS}}
    engine = {"dtype": config.dtype, "include": config.include, "exclude": config.exclude,
              **{k: v for k, v in given.items() if k in ENGINE_OPTIONS}}
    engine["metadata"] = {"soupkit.config": config.source, **(engine.get("metadata") or {})}
    return merge(config.models, config.method, output, base=config.base, force=force, **params, **engine)


class _Parser:
    """Validation of one config; every error names the config and the field."""

    def __init__(self, source: str, folder: Path):
        self.source = source
        self.folder = folder

    def fail(self, where: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.source}: {where}: {problem}")

    def path(self, value: Any, where: str, *, must_exist: bool = True) -> Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise self.fail(where, f"expected a file path, got {value!r}")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.folder / path
        if must_exist and not path.exists():
            raise self.fail(where, f"{path}: no such file")
        return path

    def parse(self, data: Mapping[str, Any]) -> MergeConfig:
        for name in data:
            if name not in FIELDS:
                raise RecipeError(f"{self.source}: unknown field {name!r}.{suggest(str(name), FIELDS)} "
                                  f"Valid fields: {', '.join(FIELDS)}")
        if not isinstance(data.get("method"), str):
            raise self.fail("method", "give the merge method's name (`soupkit methods` lists them)")
        try:
            spec = get_method(data["method"])
        except SoupkitError as error:
            raise self.fail("method", str(error)) from None
        models = data.get("models")
        if not isinstance(models, list) or not models:
            raise self.fail("models", "give a list of models, each a path or {path: ..., weight: ...}")
        paths, per_model = self.models(spec, models)
        params = self.parameters(spec, data.get("parameters") or {}, per_model, len(paths))
        base = None
        if data.get("base") is not None:
            if not spec.needs_base:
                raise self.fail("base", f"method {spec.name!r} does not use a base model; remove the field")
            base = self.path(data["base"], "base")
        elif spec.needs_base:
            raise self.fail("base", f"method {spec.name!r} needs a base model (the pre-trained checkpoint)")
        try:
            spec.bind(params, len(paths))  # values and counts, before any tensor is read
            parse_dtype(data.get("dtype"))
        except SoupkitError as error:
            raise RecipeError(f"{self.source}: {error}") from None
        return MergeConfig(self.source, spec.name, paths, base, params, data.get("dtype"),
                           self.globs(data, "include"), self.globs(data, "exclude"), self.recipe(data.get("eval")))

    def models(self, spec: MergeMethod, entries: list[Any]) -> tuple[list[Path], dict[str, dict[int, Any]]]:
        """Each model's path, and per-model parameter -> {model index: value}."""
        per_model_names = {p.name for p in spec.parameters.values() if p.per_model}
        accepted = sorted(["path"] + [n[:-1] if n.endswith("s") else n for n in per_model_names])
        paths: list[Path] = []
        values: dict[str, dict[int, Any]] = {}
        auxiliary = auxiliary_parameters(spec)
        for index, entry in enumerate(entries):
            where = f"models[{index}]"
            if isinstance(entry, (str, Path)):
                entry = {"path": entry}
            if not isinstance(entry, Mapping) or "path" not in entry:
                raise self.fail(where, "expected a path or a mapping with a 'path' field")
            paths.append(self.path(entry["path"], f"{where}.path"))
            for key, value in entry.items():
                if key == "path":
                    continue
                name = key if key in per_model_names else f"{key}s"
                if name not in per_model_names:
                    raise self.fail(f"{where}.{key}", f"method {spec.name!r} has no per-model parameter {key!r}."
                                    f"{suggest(str(key), accepted)} Per-model fields: {', '.join(accepted)}")
                if name in auxiliary:
                    value = str(self.path(value, f"{where}.{key}"))
                values.setdefault(name, {})[index] = value
        return paths, values

    def parameters(self, spec: MergeMethod, given: Any, per_model: dict[str, dict[int, Any]],
                   n_models: int) -> dict[str, Any]:
        if not isinstance(given, Mapping):
            raise self.fail("parameters", "expected a mapping of parameter name -> value")
        params: dict[str, Any] = {}
        for name, value in given.items():
            if name not in spec.parameters:
                raise self.fail(f"parameters.{name}", f"method {spec.name!r} has no parameter {name!r}."
                                f"{suggest(str(name), spec.parameters)} Its parameters: "
                                f"{', '.join(spec.parameters) or 'none'}")
            if name in auxiliary_parameters(spec) and isinstance(value, list):
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

    def globs(self, data: Mapping[str, Any], name: str) -> tuple[str, ...]:
        value = data.get(name) or ()
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "expected a glob or a list of globs")
        return tuple(value)

    def recipe(self, value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail("eval", f"expected a recipe path or built-in recipe name, got {value!r}")
        if value.endswith((".yaml", ".yml")) or "/" in value:
            return str(self.path(value, "eval"))
        return value  # a built-in recipe name, resolved by the evaluator
