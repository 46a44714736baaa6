"""mergekit configs (``merge_method:``) read as soupkit merges that give mergekit's numbers.

``load_merge_config`` sends a mapping with ``merge_method`` here. Accepted: the methods both tools share
(``SUPPORTED``: mergekit's names and parameter names); ``models: [{model: PATH, parameters: {...}}]``, or
``slices`` of ``sources`` with ``layer_range`` (one slice spanning every layer is a plain merge; others stack or
interleave layers: a ``SlicePlan`` run by ``soupkit.merging.slices``, "frankenmerges"); ``base_model`` (also per
slice); global ``parameters``; ``dtype`` and ``out_dtype`` (the output dtype: soupkit computes in fp32 whatever
the config says, mergekit in ``dtype``, so a bf16 config agrees to bf16 rounding). Paths are local files or
folders, relative to the config's folder (no Hugging Face hub). Anything else is refused in one line naming the
file and field, so soupkit never silently computes something mergekit would not; so is every number that is not
finite (``.nan`` would pass every range check) or out of its range.

Each mergekit method runs as the soupkit method of the same name, mergekit's conventions switched on
(``docs/methods.md`` tabulates them): ``weight`` -> ``weights``, ``lambda`` -> ``scaling``, ``normalize`` and
``rescale`` with mergekit's per-method defaults, ``convention="mergekit"`` for ties, dare_ties, slerp and
model_stock (k = max(1, int(density*n)), + elected on a zero sign sum, a zero tensor kept in slerp's angle, t
outside [0, 1] extrapolating, negative Model Stock cosines kept), DARE's ``density`` (the keep fraction) ->
``drop_rate = 1 - density``; slerp's ``t`` interpolates from ``base_model`` to the other model.
``tests/merging/methods/test_mergekit_golden.py`` checks all of it against mergekit 0.1.5's own output.

Parameter values follow mergekit's rules (``evaluate``): a number; a list of numbers, a gradient interpolated
linearly over the layers; or a list of ``{filter: TEXT, value: ...}`` conditions, the first whose filter occurs
in the tensor name (or is absent or ``*``) applying. A model's own parameter wins over the slice's, which wins
over the global one; a setting no filter matches falls through to the next. A tensor's gradient position
(mergekit's ``t``, ``position``): layer i of L at i / (L - 1) (1 when L = 1; within a slice, over its own
layers), L = the largest index + 1 in names like ``model.layers.N.`` (also ``h.N.``, ``layer.N.``, ``blocks.N.``,
``block.N.``), read from the first input's tensor names. Tensors outside the layers (embeddings, and also the
final norm and ``lm_head`` after them) take a gradient's first value (t = 0), as mergekit's planner gives its
pre- and post-weights alike.

DARE masks: mergekit draws them with ``torch.bernoulli`` from the global RNG (a new mask every run); soupkit's
are seeded and deterministic (``seed`` 0), so DARE merges agree with mergekit in expectation, and exactly at
density 1. mergekit 0.1.5 rescales kept entries to the task vector's L1 norm (1/density in expectation); soupkit
by 1/density.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError, SoupkitError, suggest
from soupkit.io import open_checkpoint
from soupkit.merging.config_schema import MergeConfig, _Parser
from soupkit.merging.engine import SoupkitWarning
from soupkit.merging.registry import get_method
from soupkit.merging.slices import SliceGroup, SlicePlan, layer_count_updates
from soupkit.options import OutputOptions

REQUIRED = ...  # a parameter mergekit requires (it has no default)
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
#: tensors before the layers (embeddings): a frankenmerge takes them from its first slice, the rest from its last
_PRE = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FIELDS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype")
_NO_TOKENIZER = ("soupkit does not build tokenizers (mergekit's vocabulary merging reshapes the embeddings); "
                 "remove it: a folder output copies the first input folder's tokenizer files")
_REFUSED = {
    "tokenizer_source": _NO_TOKENIZER,
    "tokenizer": _NO_TOKENIZER,
    "chat_template": "soupkit does not write chat templates; remove it (a folder output copies the first input "
                     "folder's tokenizer files, template included)",
    "modules": "multi-module merges are not supported; merge each module's models with its own config",
}


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """mergekit's value of one parameter setting for ``tensor`` at gradient position ``t`` in [0, 1]; None when
    no condition's filter matches."""
    if not isinstance(setting, list):
        return setting
    if all(isinstance(v, (int, float)) for v in setting):
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        return (1 - (scaled - low)) * setting[low] + (scaled - low) * setting[high]
    if all(isinstance(v, (int, float, str)) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    for condition in setting:
        where = condition.get("filter")
        if where is None or where == "*" or (tensor and where in tensor):
            return evaluate(condition["value"], tensor, t)
    return None


def position(key: str, n_layers: int) -> float:
    """A tensor's place on a gradient: layer i at i / (n_layers - 1) (1 when there is one layer), every tensor
    outside the layers at 0 -- embeddings, and also the final norm and ``lm_head`` after the layers: mergekit's
    planner resolves its architectures' pre- and post-weights alike at t = 0 (its ``plan_module``)."""
    match = _LAYER.search(key)
    if match:
        return int(match.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0
    return 0.0


def _layer_of(key: str) -> int | None:
    match = _LAYER.search(key)
    return int(match.group(1)) if match else None


def _renumber(key: str, layer: int) -> str:
    """``key`` with its layer index replaced by ``layer``."""
    match = _LAYER.search(key)
    assert match is not None
    return key[:match.start(1)] + str(layer) + key[match.end(1):]


def count_layers(keys: list[str]) -> int:
    """The number of layers named in ``keys`` (largest index + 1; 0 when none is)."""
    indices = [int(m.group(1)) for k in keys if (m := _LAYER.search(k))]
    return max(indices) + 1 if indices else 0


# ------------------------------------------------------------------------------ mergekit method -> soupkit


class _Problem(Exception):
    """A bad value found while translating: (field, problem); the reader adds the file."""


def _weights(models: list[dict[str, Any]]) -> list[float]:
    return [m["weight"] for m in models]


def _linear(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"weights": _weights(models), "normalize": g["normalize"]}


def _task_arithmetic(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    # rescale has no effect without sparsification, as in mergekit
    return {"weights": _weights(models), "normalize": g["normalize"], "scaling": g["lambda"]}


def _ties(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"weights": _weights(models), "density": [min(1.0, m["density"]) for m in models],
            "normalize": g["normalize"], "scaling": g["lambda"], "convention": "mergekit", "rescale": g["rescale"]}


def _dare(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    if not g["rescale"]:
        raise _Problem("parameters.rescale", "false (DARE without rescaling) is not supported: soupkit's DARE "
                       "always rescales kept entries by 1/density")
    return {"weights": _weights(models), "normalize": g["normalize"], "scaling": g["lambda"],
            "drop_rate": [1.0 - min(1.0, m["density"]) for m in models]}


def _dare_ties(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return {**_dare(g, models), "convention": "mergekit"}


def _slerp(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"t": g["t"], "convention": "mergekit"}


def _passthrough(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"scale": 1.0 if models[0]["scale"] is None else models[0]["scale"]}


def _sparsified(g: dict[str, Any], models: list[dict[str, Any]], extra: str) -> dict[str, Any]:
    """breadcrumbs and della: mergekit's generalised task arithmetic with its own sparsification."""
    return {"weights": _weights(models), "density": [min(1.0, m["density"]) for m in models],
            extra: [m[extra] for m in models], "normalize": g["normalize"], "scaling": g["lambda"],
            "rescale": g["rescale"]}


def _breadcrumbs(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return _sparsified(g, models, "gamma")


def _della(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return _sparsified(g, models, "epsilon")


def _sce(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"select_topk": g["select_topk"]}


def _nuslerp(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"weights": _weights(models), "nuslerp_flatten": g["nuslerp_flatten"],
            "nuslerp_row_wise": g["nuslerp_row_wise"]}


def _multislerp(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"weights": _weights(models), "normalize_weights": g["normalize_weights"], "eps": g["eps"]}


def _same_names(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    """Methods whose global parameters keep mergekit's names (karcher, nearswap, arcee_fusion)."""
    return dict(g)


def _model_stock(g: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    if g["filter_wise"]:
        raise _Problem("parameters.filter_wise", "true (one angle per row) is not supported; remove it")
    return {"convention": "mergekit"}


@dataclass(frozen=True)
class _Method:
    """A mergekit method: its parameters (name -> mergekit's default, ``REQUIRED`` where it has none) and the
    translation of their values to the soupkit method of the same name."""

    translate: Callable[[dict[str, Any], list[dict[str, Any]]], dict[str, Any]]
    global_params: dict[str, Any]
    model_params: dict[str, Any]
    base: bool = True  # base_model required; its task vector is never merged
    optional_base: bool = False  # base_model may be given (then as above) or not (nuslerp, multislerp)


def _gta(translate: Callable[..., dict[str, Any]], normalize: bool, rescale: bool, **extra: float) -> _Method:
    """One of mergekit's generalized task-arithmetic methods (``extra``: its sparsification's per-model
    parameters and their defaults: breadcrumbs' gamma, della's epsilon)."""
    return _Method(translate, {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
                   {"weight": REQUIRED, "density": 1.0, **extra})


METHODS = {
    "linear": _Method(_linear, {"normalize": True}, {"weight": REQUIRED}, base=False),
    "task_arithmetic": _gta(_task_arithmetic, normalize=False, rescale=False),
    "ties": _gta(_ties, normalize=True, rescale=False),
    "dare_linear": _gta(_dare, normalize=False, rescale=True),
    "dare_ties": _gta(_dare_ties, normalize=False, rescale=True),
    "slerp": _Method(_slerp, {"t": REQUIRED}, {}),
    "model_stock": _Method(_model_stock, {"filter_wise": False}, {}),
    "passthrough": _Method(_passthrough, {}, {"scale": None}, base=False),
    # the methods of soupkit's files of the same names (mergekit's defaults here, their formulas there)
    "breadcrumbs": _gta(_breadcrumbs, normalize=False, rescale=False, gamma=0.01),
    "breadcrumbs_ties": _gta(_breadcrumbs, normalize=False, rescale=False, gamma=0.01),
    "della": _gta(_della, normalize=True, rescale=True, epsilon=0.15),
    "della_linear": _gta(_della, normalize=False, rescale=True, epsilon=0.15),
    "sce": _Method(_sce, {"select_topk": 1.0, "int8_mask": False}, {}),
    "nuslerp": _Method(_nuslerp, {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": REQUIRED},
                       base=False, optional_base=True),
    "multislerp": _Method(_multislerp, {"normalize_weights": True, "eps": 1e-8}, {"weight": REQUIRED},
                          base=False, optional_base=True),
    "karcher": _Method(_same_names, {"max_iter": 10, "tol": 1e-5}, {}, base=False),
    "nearswap": _Method(_same_names, {"t": REQUIRED}, {}),
    "arcee_fusion": _Method(_same_names, {}, {}),
}
SUPPORTED = tuple(METHODS)
#: the Python type every evaluated value of a parameter must have
_KINDS = {"weight": float, "density": float, "lambda": float, "t": float, "normalize": bool, "rescale": bool,
          "int8_mask": bool, "filter_wise": bool, "scale": float,
          "gamma": float, "epsilon": float, "select_topk": float, "nuslerp_flatten": bool, "nuslerp_row_wise": bool,
          "normalize_weights": bool, "eps": float, "max_iter": int, "tol": float}


# ------------------------------------------------------------------------------ values per tensor

#: where one parameter may be set, in mergekit's lookup order: (field for messages, its settings)
Levels = tuple[tuple[str, Mapping[str, Any]], ...]


@dataclass(frozen=True)
class _Recipe:
    """A parsed mergekit config: the method and, per merged model and for the globals, where settings sit."""

    source: str
    name: str
    method: _Method
    model_levels: list[Levels]
    global_levels: Levels

    def values(self, key: str, t: float) -> dict[str, Any]:
        """The soupkit method's parameters for tensor ``key`` at gradient position ``t``."""
        spec = self.method
        g = {n: self._lookup(n, d, self.global_levels, key, t) for n, d in spec.global_params.items()}
        models = [{n: self._lookup(n, d, levels, key, t) for n, d in spec.model_params.items()}
                  for levels in self.model_levels]
        try:
            return spec.translate(g, models)
        except _Problem as problem:
            raise RecipeError(f"{self.source}: {problem.args[0]}: {problem.args[1]}") from None

    def _lookup(self, name: str, default: Any, levels: Levels, key: str, t: float) -> Any:
        for where, settings in levels:
            if name in settings:
                value = evaluate(settings[name], key, t)
                if value is not None:
                    return self._typed(name, value, f"{where}.{name}")
        if default is REQUIRED:
            tensor = f" for tensor {key}" if key else ""
            raise RecipeError(f"{self.source}: {levels[0][0]}: no {name!r}{tensor} (mergekit requires it for "
                              f"{self.name}); set it there or in the global parameters")
        return default

    def _typed(self, name: str, value: Any, where: str) -> Any:
        if _KINDS[name] is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{self.source}: {where}: must be true or false, got {value!r}")
            return value
        if _KINDS[name] is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value != int(value):
                raise RecipeError(f"{self.source}: {where}: must be a whole number, got {value!r}")
            return int(value)
        if isinstance(value, str):  # mergekit's float fields read YAML's 1e-3 (a string in YAML 1.1) as a number
            value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{self.source}: {where}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{self.source}: {where}: must be a finite number, got {value!r}")
        if name == "density" and value <= 0:
            raise RecipeError(f"{self.source}: {where}: must be > 0 (the fraction of each task vector kept), got "
                              f"{value!r}")
        return float(value)


@dataclass(frozen=True)
class LayerParameters:
    """A mergekit config's method parameters as a function of the tensor name (gradients and filters)."""

    recipe: _Recipe
    n_layers: int

    def __call__(self, key: str) -> dict[str, Any]:
        return self.recipe.values(key, position(key, self.n_layers))


def _varies(levels: Levels) -> bool:
    return any(isinstance(v, list) for _, settings in levels for v in settings.values())


# ------------------------------------------------------------------------------ reading the file


@dataclass
class _Slice:
    """One checked slice: its models, base, parameter recipe, inputs' first layers, length and tensor names."""

    paths: list[Path]
    base: Path | None
    recipe: Any
    inputs: list[Path]
    starts: dict[Path, int]
    length: int
    keys: dict[Path, list[str]]

    @property
    def template(self) -> list[str]:
        return self.keys[self.inputs[0].resolve()]


class _Reader(_Parser):
    """Validation of one mergekit config; every error names the config and the field."""

    def parse(self, data: Mapping[str, Any]) -> MergeConfig:
        self.fields(data)
        name = data["merge_method"]
        if name not in METHODS:
            raise self.fail("merge_method", f"{name!r} is not supported; soupkit runs mergekit's "
                            f"{', '.join(SUPPORTED)}.{suggest(str(name), SUPPORTED)}")
        method = METHODS[name]
        if "slices" in data and not self.one_whole_slice(data["slices"]):
            return self.frankenmerge(data, name, method)
        entries, slice_levels, slice_base = self.entries(data, method)
        global_levels = (*slice_levels, ("parameters", self.settings(data.get("parameters"), "parameters",
                                                                      {**method.global_params,
                                                                       **method.model_params})))
        if any("int8_mask" in settings for _, settings in global_levels):

            warnings.warn(f"{self.source}: int8_mask has no effect in soupkit (mergekit's int8 only saves memory "
                          f"in its sign masks; the numbers are the same)", SoupkitWarning, stacklevel=3)
        base_value = slice_base if slice_base is not None else data.get("base_model")
        paths, levels, base = self.roles(name, method, entries, base_value, global_levels)
        recipe = _Recipe(self.source, name, method, levels, global_levels)
        options = self.options(data)
        if not any(_varies(lv) for lv in [global_levels, *levels]):
            params = self.validated(name, recipe.values("", 0.0), len(paths))
            return MergeConfig(source=self.source, method=name, models=paths, base=base, parameters=params,
                               options=options)
        keys = _keys([base, *paths] if base is not None else paths)
        per_key = LayerParameters(recipe, count_layers(keys))
        seen: set[str] = set()
        for key in keys:  # every distinct parameter set validated now, before any tensor is read
            params = per_key(key)
            if repr(sorted(params.items())) not in seen:
                seen.add(repr(sorted(params.items())))
                self.validated(name, params, len(paths), key)
        return MergeConfig(source=self.source, method=name, models=paths, base=base, options=options,
                           layer_parameters=per_key)

    def fields(self, data: Mapping[str, Any]) -> None:
        for field in data:
            if field in _REFUSED:
                raise self.fail(str(field), _REFUSED[field])
            if field in _KINDS:
                raise self.fail(str(field), "mergekit reads it from `parameters` (a top-level one is ignored); "
                                "move it under parameters")
            if field not in _FIELDS:
                raise self.fail(str(field), f"unknown mergekit field.{suggest(str(field), _FIELDS)} Supported: "
                                f"{', '.join(_FIELDS)}")
        if not isinstance(data["merge_method"], str):
            raise self.fail("merge_method", f"expected a method name, got {data['merge_method']!r}")
        if ("models" in data) == ("slices" in data):
            raise self.fail("models", "give exactly one of models or slices")

    def settings(self, value: Any, where: str, allowed: Mapping[str, Any]) -> dict[str, Any]:
        """A ``parameters`` mapping, each setting's shape checked (scalar, gradient list or conditions)."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected a mapping of parameter names to values, got {value!r}")
        for name, setting in value.items():
            if name not in allowed:
                raise self.fail(f"{where}.{name}", f"not a parameter here.{suggest(str(name), allowed)} "
                                f"Accepted: {', '.join(allowed) or 'none'}")
            self.setting(setting, f"{where}.{name}")
        return dict(value)

    def setting(self, value: Any, where: str, nested: bool = False) -> None:
        scalar = (int, float, str)
        if isinstance(value, scalar):
            self.finite(value, where)
            return
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"expected a number, a list of numbers or a list of {{filter, value}}, got "
                            f"{value!r}")
        if all(isinstance(v, scalar) for v in value):
            for index, item in enumerate(value):
                self.finite(item, f"{where}[{index}]")
            return
        for index, condition in enumerate(value):
            if nested or not isinstance(condition, Mapping) or "value" not in condition \
                    or set(condition) - {"filter", "value"}:
                raise self.fail(f"{where}[{index}]", f"expected {{filter: TEXT, value: ...}}, got {condition!r}")
            if not isinstance(condition.get("filter", ""), (str, type(None))):
                raise self.fail(f"{where}[{index}].filter", f"expected text, got {condition['filter']!r}")
            self.setting(condition["value"], f"{where}[{index}].value", nested=True)

    def finite(self, value: Any, where: str) -> None:
        """Every number of a setting (each gradient endpoint too, whether or not a tensor uses it) is finite:
        ``.nan`` would otherwise pass every range check (``min(1, nan)`` is 1: a NaN density merged as 1)."""
        number = _number(value) if isinstance(value, str) else value
        if isinstance(number, float) and not math.isfinite(number):
            raise self.fail(where, f"must be a finite number, got {value!r}")

    def path(self, value: Any, where: str) -> Path:
        """A local file or folder; a Hugging Face repo id or mergekit's ``MODEL+LORA`` is refused in one line."""
        if isinstance(value, str) and not (self.folder / Path(value).expanduser()).exists():
            if "+" in value:
                raise self.fail(where, f"{value!r}: mergekit's MODEL+LORA syntax is not supported; give the LoRA "
                                f"adapter folder as its own model, or merge it into its base first")
            if _REPO_ID.match(value) and not value.startswith("."):
                raise self.fail(where, f"{value!r} looks like a Hugging Face repo id; soupkit reads local files "
                                f"only (no hub): download it and give its folder")
        return super().path(value, where)

    def entries(self, data: Mapping[str, Any], method: _Method
                ) -> tuple[list[tuple[str, Path, dict[str, Any]]], Levels, Any]:
        """The listed models as (field, path, own parameters), the slice's parameter level and base_model."""
        if "models" in data:
            return [self.entry(e, f"models[{i}]", method, ("model", "parameters"))
                    for i, e in enumerate(self.listed(data["models"], "models"))], (), None
        slices = self.listed(data["slices"], "slices")
        if len(slices) != 1 or not isinstance(slices[0], Mapping) or set(slices[0]) - {"sources", "parameters",
                                                                                        "base_model"}:
            raise self.fail("slices", "only one slice of sources (with optional parameters and base_model) is "
                            "supported; soupkit does not stack or cut layers")
        entries = []
        for i, source in enumerate(self.listed(slices[0].get("sources"), "slices[0].sources")):
            where = f"slices[0].sources[{i}]"
            entries.append(self.entry(source, where, method, ("model", "layer_range", "parameters")))
            self.whole(source.get("layer_range"), entries[-1][1], f"{where}.layer_range")
        own = self.settings(slices[0].get("parameters"), "slices[0].parameters",
                            {**method.global_params, **method.model_params})
        return entries, (("slices[0].parameters", own),), slices[0].get("base_model")

    def one_whole_slice(self, slices: Any) -> bool:
        """One slice whose every source spans all of its model's layers: a plain merge, streamed as one."""
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping) \
                or not isinstance(slices[0].get("sources"), list):
            return False
        for source in slices[0]["sources"]:
            if not isinstance(source, Mapping) or not isinstance(source.get("model"), str):
                return False
            path = self.folder / Path(source["model"]).expanduser()
            if not path.exists() or source.get("layer_range") != [0, count_layers(_keys([path]))]:
                return False
        return True

    def frankenmerge(self, data: Mapping[str, Any], name: str, method: _Method) -> MergeConfig:
        """``slices`` stacking or interleaving layer ranges: a ``SlicePlan`` of every output tensor."""

        slices = self.listed(data["slices"], "slices")
        global_params = ("parameters", self.settings(data.get("parameters"), "parameters",
                                                     {**method.global_params, **method.model_params}))
        groups: list[SliceGroup] = []
        layers: list[tuple[Path, int]] = []  # each output layer's model and index there (for layer_types)
        pieces = [self.slice_of(piece, f"slices[{number}]", data, name, method, global_params)
                  for number, piece in enumerate(slices)]
        for number, piece in enumerate(pieces):
            groups += self.slice_groups(piece, f"slices[{number}]", name, layers)
        outside = [k for k in pieces[0].template if _layer_of(k) is None]
        pre, post = [k for k in outside if _PRE.search(k)], [k for k in outside if not _PRE.search(k)]

        def edge(piece: _Slice, names: list[str]) -> list[SliceGroup]:
            paths, base, recipe = piece.paths, piece.base, piece.recipe
            return [SliceGroup(tuple(paths), base, {k: (k,) * len(paths) for k in names},
                               {k: k for k in names} if base is not None else {},
                               {k: self.validated(name, recipe.values(k, 0.0), len(paths), k) for k in names})
                    ] if names else []

        groups = [*edge(pieces[0], pre), *groups, *edge(pieces[-1], post)]
        template_model = self.path(data["base_model"], "base_model") if data.get("base_model") else \
            self.path(slices[0]["sources"][0]["model"], "slices[0].sources[0].model")
        plan = SlicePlan(self.source, name, tuple(groups), template_model,
                         layer_count_updates(template_model, layers))
        return MergeConfig(source=self.source, method=name, models=plan.models, options=self.options(data),
                           slices=plan)

    def slice_of(self, piece: Any, where: str, data: Mapping[str, Any], name: str, method: _Method,
                 global_params: tuple[str, Any]) -> _Slice:
        """One slice checked: its sources' layer ranges (of one length), base, method and parameters."""
        if not isinstance(piece, Mapping):
            raise self.fail(where, f"expected a mapping with sources (and parameters, base_model), got {piece!r}")
        extra = [k for k in piece if k not in ("sources", "parameters", "base_model")]
        if extra:
            raise self.fail(f"{where}.{extra[0]}", "not supported; a slice takes sources, parameters and "
                            "base_model")
        own = self.settings(piece.get("parameters"), f"{where}.parameters",
                            {**method.global_params, **method.model_params})
        entries, ranges = [], {}
        for i, source in enumerate(self.listed(piece.get("sources"), f"{where}.sources")):
            entry = self.entry(source, f"{where}.sources[{i}]", method, ("model", "layer_range", "parameters"))
            ranges[entry[1].resolve()] = self.layer_range(source.get("layer_range"), entry[1],
                                                          f"{where}.sources[{i}].layer_range")
            entries.append(entry)
        lengths = {stop - start for start, stop in ranges.values()}
        if len(lengths) != 1:
            raise self.fail(f"{where}.sources", f"every source of a slice spans the same number of layers; got "
                            f"{sorted(lengths)}")
        levels_global = ((f"{where}.parameters", own), global_params)
        base_value = piece.get("base_model", data.get("base_model"))
        if base_value is not None and (method.base or method.optional_base):
            base_path = self.path(base_value, f"{where}.base_model" if "base_model" in piece else "base_model")
            if base_path.resolve() not in ranges:
                raise self.fail(where, f"base_model {base_path} is not one of its sources; list it under "
                                f"sources with the layer_range to take")
        paths, levels, base = self.roles(name, method, entries, base_value, levels_global)
        spec = get_method(name)
        if len(paths) < spec.min_models or (spec.max_models is not None and len(paths) > spec.max_models):
            wanted = spec.min_models if spec.max_models == spec.min_models else \
                f"{spec.min_models} to {spec.max_models or 'any number of'}"
            raise self.fail(f"{where}.sources", f"{name} merges {wanted} model(s) per slice (besides a base), "
                            f"got {len(paths)}; give each slice that many sources")
        recipe = _Recipe(self.source, name, method, levels, levels_global)
        keys = {p.resolve(): _keys([p]) for p in {*paths, *([base] if base else [])}}
        inputs = [*paths, *([base] if base is not None else [])]
        return _Slice(paths, base, recipe, inputs, {p: ranges[p.resolve()][0] for p in inputs}, lengths.pop(), keys)

    def slice_groups(self, piece: _Slice, where: str, name: str, layers: list[tuple[Path, int]]) -> list[Any]:
        """One group per output layer of a slice (the merge streams layer by layer); appends to ``layers``."""

        inputs, starts, paths, base = piece.inputs, piece.starts, piece.paths, piece.base
        groups = []
        for index in range(piece.length):
            sources: dict[str, tuple[str, ...]] = {}
            base_sources: dict[str, str] = {}
            params: dict[str, dict[str, Any]] = {}
            t = index / (piece.length - 1) if piece.length > 1 else 1.0
            out_layer = len(layers)
            layers.append((inputs[0], starts[inputs[0]] + index))
            for key in piece.template:
                if _layer_of(key) != starts[inputs[0]] + index:
                    continue
                out = _renumber(key, out_layer)
                names = [_renumber(key, starts[p] + index) for p in inputs]
                for p, source_key in zip(inputs, names):
                    if source_key not in piece.keys[p.resolve()]:
                        raise self.fail(f"{where}.sources", f"{p.name} has no tensor {source_key!r} (layer "
                                        f"{starts[p] + index} of its range)")
                sources[out] = tuple(names[:len(paths)])
                if base is not None:
                    base_sources[out] = names[-1]
                params[out] = self.validated(name, piece.recipe.values(out, t), len(paths), out)
            groups.append(SliceGroup(tuple(paths), base, sources, base_sources, params))
        return groups

    def layer_range(self, value: Any, path: Path, where: str) -> tuple[int, int]:
        """``[start, stop)`` within the model's layers."""
        n_layers = count_layers(_keys([path]))
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                      for v in value)):
            raise self.fail(where, f"expected [start, stop], two whole numbers, got {value!r}")
        start, stop = value
        if not 0 <= start < stop <= n_layers:
            raise self.fail(where, f"{value!r}: needs 0 <= start < stop <= {n_layers} ({path.name} has {n_layers} "
                            f"layers)")
        return start, stop

    def listed(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"expected a non-empty list, got {value!r}")
        return value

    def entry(self, value: Any, where: str, method: _Method, fields: tuple[str, ...]
              ) -> tuple[str, Path, dict[str, Any]]:
        if not isinstance(value, Mapping) or "model" not in value:
            raise self.fail(where, f"expected a mapping with {', '.join(fields)} (model required), got {value!r}")
        extra = [k for k in value if k not in fields]
        if extra:
            raise self.fail(f"{where}.{extra[0]}", f"unknown field.{suggest(str(extra[0]), fields)} Accepted: "
                            f"{', '.join(fields)}")
        path = self.path(value["model"], f"{where}.model")
        return where, path, self.settings(value.get("parameters"), f"{where}.parameters", method.model_params)

    def whole(self, layer_range: Any, path: Path, where: str) -> None:
        """A slice source must span every layer of its model (``[0, L]``): soupkit does not cut layers."""
        n_layers = count_layers(_keys([path]))
        if layer_range != [0, n_layers]:
            raise self.fail(where, f"{layer_range!r}: only whole models are supported ({path.name} has "
                            f"{n_layers} layers: [0, {n_layers}]); soupkit does not stack or cut layers")

    def roles(self, name: str, method: _Method, entries: list[tuple[str, Path, dict[str, Any]]], base_value: Any,
              global_levels: Levels) -> tuple[list[Path], list[Levels], Path | None]:
        """The merged models (the base model's own entry left out, as mergekit does), their parameter
        levels, and the base."""
        base = None if base_value is None else self.path(base_value, "base_model")
        listed = [path.resolve() for _, path, _ in entries]
        if method.base and base is None:
            raise self.fail("base_model", f"mergekit's {name} needs a base_model")
        if method.optional_base:
            merged = entries if base is None else [e for e in entries if e[1].resolve() != base.resolve()]
        elif not method.base:
            if base is not None and base.resolve() not in listed:
                raise self.fail("base_model", f"{name} does not use a base model unless it is one of the models; "
                                f"remove it or list it under models")
            base, merged = None, entries
        else:
            assert base is not None
            merged = [e for e in entries if e[1].resolve() != base.resolve()]
        levels: list[Levels] = [((f"{where}.parameters", own), *global_levels) for where, _, own in merged]
        if name != "slerp":
            return [path for _, path, _ in merged], levels, base
        if len(merged) != 1:
            raise self.fail("models", f"slerp interpolates two models, base_model and one other; got "
                            f"{len(merged) + 1}")
        return [base, merged[0][1]], [], None  # t = 0 gives base_model, as in mergekit

    def options(self, data: Mapping[str, Any]) -> OutputOptions:
        field = "out_dtype" if data.get("out_dtype") is not None else "dtype"
        dtype = data.get(field)
        try:
            return OutputOptions.build({} if dtype is None else {"dtype": dtype})
        except SoupkitError as error:
            raise self.fail(field, str(error)) from None

    def validated(self, name: str, params: dict[str, Any], n_models: int, key: str | None = None
                  ) -> dict[str, Any]:
        try:
            get_method(name).validate(params, n_models)
        except SoupkitError as error:
            raise RecipeError(f"{self.source}: {error}" + (f" (tensor {key})" if key else "")) from None
        return params


def _number(text: str) -> Any:
    """``text`` as a float where it spells one (``1e-3``, ``.nan``), else unchanged."""
    try:
        return float(text)
    except ValueError:
        return text


def _keys(paths: list[Path]) -> list[str]:
    """The tensor names of the first of ``paths`` (its header only)."""

    reader = open_checkpoint(paths[0])
    try:
        return reader.keys()
    finally:
        reader.close()


def from_mergekit(data: Mapping[str, Any], source: str, folder: Path) -> MergeConfig:
    """A mergekit config (already parsed) as a soupkit ``MergeConfig`` computing what mergekit computes."""
    return _Reader(source, folder).parse(data)
