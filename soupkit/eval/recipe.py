"""Evaluation recipes: one YAML file says which model to build and which data to score it on.

```yaml
model: {kind: timm, name: resnet18, num_classes: 10}      # or open_clip / python / transformers
data:
  heldout: {kind: digits, split: heldout}                  # always named "heldout": what soups select on
  test:                                                    # in recipe order; the FIRST is in-distribution,
    clean: {kind: imagefolder, path: /data/val}            # the others are distribution shifts, unless a
    noise: {kind: digits, split: test, shift: noise}       # set says `role: in_distribution` / `role: shift`
batch_size: 256
device: auto          # auto | cpu | cuda | cuda:1
precision: auto       # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
memory_format: auto   # auto (channels_last on CUDA, and for convnets on CPU) | channels_last | contiguous
```

Text models (``kind: transformers``, with ``task: sequence-classification`` or ``causal-lm``) take text data
(``kind: jsonl``, ``csv``, ``hf_disk``; see ``soupkit.eval.data.text``).

Every dataset also takes these keys, handled by the evaluator whatever the kind: ``class_subset`` (class ids,
or a file of them, one per line, for sets labelled with a subset of the model's classes, ImageNet-R/A style:
logits are restricted to those columns and label ``i`` means class ``class_subset[i]``), ``holdout_fraction`` +
``holdout_seed`` (score only a fixed random fraction, e.g. a held-out split of a training folder), ``limit``
(the first N examples) and ``role``.

Relative paths resolve against the recipe's folder; ``$VARS`` and ``~`` are expanded (an unset variable is an
error, which is how shipped recipes mark placeholders). A recipe is named by path or by bare name (``digits``),
looked up in the folders of ``SOUPKIT_RECIPE_PATH`` and then in the recipes shipped inside the package
(``soupkit/recipes/*.yaml``, the single source of truth; the repository's top-level ``recipes/*.yaml`` are links
to them). Every error names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from soupkit._version import __version__
from soupkit.errors import RecipeError, suggest
from soupkit.eval import registry
from soupkit.eval.registry import resolve_path
from soupkit.io import fingerprint
from soupkit.options import device_name
from soupkit.yaml_file import read_yaml

HELDOUT = "heldout"
#: keys every dataset takes, whatever its kind
COMMON_DATA_KEYS = ("class_subset", "holdout_fraction", "holdout_seed", "limit", "role")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: bump when the meaning of a cached score changes
CACHE_SCHEMA = 2


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    params: dict[str, Any]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a recipe: its adapter kind and parameters plus the evaluator-level options."""

    name: str
    kind: str
    params: dict[str, Any]
    role: str  # "heldout" | "in_distribution" | "shift"
    class_subset: tuple[int, ...] | None = None
    holdout_fraction: float | None = None
    holdout_seed: int = 0
    limit: int | None = None
    where: str = ""  # "recipe.yaml: data.test.clean", for errors raised while building


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``datasets`` holds the held-out set first, then the test sets in recipe order."""

    source: str
    folder: Path
    model: ModelSpec
    datasets: dict[str, DatasetSpec]
    batch_size: int = 256
    device: str = "auto"
    precision: str = "auto"
    memory_format: str = "auto"
    num_workers: int | None = None
    name: str | None = None
    description: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def heldout_name(self) -> str:
        return HELDOUT

    @property
    def test_names(self) -> list[str]:
        return [n for n, s in self.datasets.items() if s.role != "heldout"]

    @property
    def shift_names(self) -> list[str]:
        return [n for n, s in self.datasets.items() if s.role == "shift"]

    def dataset_key(self, name: str, *, precision: str, device_type: str, memory_format: str = "contiguous",
                    model_fingerprint: str | None = None) -> str:
        """What a cached score of ``name`` depends on besides the checkpoint: the model's architecture, the
        dataset definition (and the content of its files: ``_stable``), the numeric precision, the device type,
        the memory format (channels_last convolutions may round differently), ``model_fingerprint`` (the content
        of files the model adapter read: a transformers folder's config and tokenizer) and the versions of
        soupkit and torch (the code that scores)."""
        spec = self.datasets[name]
        payload = {
            "schema": CACHE_SCHEMA,
            "model": {"kind": self.model.kind, **_stable(self.model.params)},
            "data": {"kind": spec.kind, **_stable(spec.params), "class_subset": spec.class_subset,
                     "holdout": [spec.holdout_fraction, spec.holdout_seed], "limit": spec.limit},
            "precision": precision,
            "device": device_type,
            "memory_format": memory_format,
            "code": _code_version(),
        }
        if model_fingerprint is not None:  # absent for image models: their existing cache entries stay valid
            payload["model_files"] = model_fingerprint
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _stable(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as JSON-able values; a path carries its content so that edited data is rescored."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        out[key] = path_content(value) if isinstance(value, Path) else value
        if key == "factory" and isinstance(value, str) and ":" in value:
            source = _module_file(value.partition(":")[0])  # kind: python: the code that builds model or data
            if source is not None:
                out["factory_source"] = path_content(source)
    return out


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` (already imported, or found without importing it), else None."""
    import importlib.util
    import sys

    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None)
    return Path(origin) if origin and os.path.isfile(origin) else None


def path_content(path: Path) -> list[Any]:
    """[path, what it holds]: a file's sha256 (streamed, memoised by soupkit.io.fingerprint on its device,
    inode, size, mtime and ctime); for a folder (an image folder: hashing 6 GB of ImageNet on every start would
    cost more than scoring) each file's relative name, size, mtime and ctime, which a rewrite in place changes
    even when it keeps size and mtime (no user can set ctime back)."""

    try:
        if path.is_file():
            if path.stat().st_size == 0:  # empty, or a /proc file (size 0, endless): never read here
                return [str(path.resolve()), "empty"]
            return [str(path.resolve()), fingerprint(path)]
        if path.is_dir():
            digest = hashlib.blake2b(digest_size=20)
            for folder, subfolders, files in os.walk(path):
                subfolders.sort()
                for name in sorted(files):
                    file = os.path.join(folder, name)
                    try:
                        st = os.stat(file)
                        stamp = f"|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n"
                    except OSError:  # a dangling link
                        stamp = "|missing\n"
                    digest.update(os.fsencode(os.path.relpath(file, path)) + stamp.encode())
            return [str(path.resolve()), "tree:" + digest.hexdigest()]
    except OSError:
        pass
    return [str(path), None]


def _code_version() -> str:
    import torch

    return f"soupkit {__version__}, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------- finding recipes


def builtin_folder() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"


def search_path() -> list[Path]:
    """Folders searched for a recipe named by bare name: ``SOUPKIT_RECIPE_PATH`` entries, then the built-ins."""
    extra = [Path(p).expanduser() for p in os.environ.get("SOUPKIT_RECIPE_PATH", "").split(os.pathsep) if p]
    return [*extra, builtin_folder()]


def available_recipes() -> list[str]:
    names: set[str] = set()
    for folder in search_path():
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def find_recipe(name: str | Path) -> Path:
    """A recipe file from a path or a bare name (``digits`` -> ``<search path>/digits.yaml``)."""
    path = Path(name)
    text = str(name)
    try:
        is_file = path.is_file()
    except OSError as err:  # a name too long for the file system, a symlink loop
        raise RecipeError(f"{text}: cannot read recipe: {err.strerror}") from None
    if is_file:
        return path
    looks_like_path = text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text
    if not looks_like_path:
        for folder in search_path():
            for suffix in (".yaml", ".yml"):
                if (folder / f"{text}{suffix}").is_file():
                    return folder / f"{text}{suffix}"
        names = available_recipes()
        raise RecipeError(f"recipe {text!r} not found (not a file, not on the recipe search path)."
                          f"{suggest(text, names)} Available: {', '.join(names) or 'none'}; "
                          "set SOUPKIT_RECIPE_PATH to add folders")
    if path.exists():  # a FIFO, a device, a folder: never opened (a FIFO would block)
        raise RecipeError(f"{text}: recipe is not a regular file")
    names = available_recipes()
    raise RecipeError(f"{text}: no such recipe file.{suggest(path.stem, names)} Recipes by name (--eval NAME): "
                      f"{', '.join(names) or 'none'}")


# ------------------------------------------------------------------------------------------------ loading


def load_recipe(source: str | Path | Mapping[str, Any] | Recipe) -> Recipe:
    """Read and validate a recipe: a YAML path, a bare recipe name, or an already-parsed mapping (its relative
    paths resolve against the working directory). No data is read and no model is built."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return _parse(dict(source), "<recipe>", Path.cwd())

    path = find_recipe(source)
    data = read_yaml(path, "recipe")
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: a recipe is a mapping with keys model, data, batch_size, device, precision, "
                          "memory_format")
    return _parse(dict(data), str(path), path.parent.absolute())


def _schemas() -> tuple[Any, Any]:
    from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt

    class DataSection(BaseModel):
        model_config = ConfigDict(extra="forbid")
        heldout: dict[str, Any]
        test: dict[str, dict[str, Any]] = {}

    class RecipeFile(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str | None = None
        description: str | None = None
        model: dict[str, Any]
        data: DataSection
        batch_size: PositiveInt = 256
        device: str = "auto"
        precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
        memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
        num_workers: NonNegativeInt | None = None

    return RecipeFile, DataSection


def _parse(data: dict[str, Any], source: str, folder: Path) -> Recipe:
    from pydantic import ValidationError


    recipe_file, data_section = _schemas()
    try:
        parsed = recipe_file.model_validate(data)
    except ValidationError as error:
        loc = error.errors()[0]["loc"]
        allowed = list(data_section.model_fields if loc[:1] == ("data",) and len(loc) == 2
                       else recipe_file.model_fields)
        raise RecipeError(registry.pydantic_message(error, source, allowed).replace(f"{source}.", f"{source}: ", 1)
                          ) from None
    try:
        device_name(parsed.device)
    except ValueError as error:
        raise RecipeError(f"{source}: device: {error}") from None

    model = dict(parsed.model)
    model_kind = _kind(model, f"{source}: model", registry.models)
    model_params = registry.models.validate(model_kind, model, where=f"{source}: model", folder=folder)
    datasets = {HELDOUT: _dataset(HELDOUT, parsed.data.heldout, "heldout", f"{source}: data.heldout", folder)}
    for position, (name, spec) in enumerate(parsed.data.test.items()):
        if name == HELDOUT:
            raise RecipeError(f"{source}: data.test.{name}: the name {HELDOUT!r} is reserved for data.heldout")
        default_role = "in_distribution" if position == 0 else "shift"
        datasets[name] = _dataset(name, spec, default_role, f"{source}: data.test.{name}", folder)
    return Recipe(source=source, folder=folder, model=ModelSpec(model_kind, model_params), datasets=datasets,
                  batch_size=parsed.batch_size, device=parsed.device, precision=parsed.precision,
                  memory_format=parsed.memory_format,
                  num_workers=parsed.num_workers, name=parsed.name, description=parsed.description, raw=data)


def _kind(spec: dict[str, Any], where: str, family: Any) -> str:
    kind = spec.pop("kind", None)
    if kind is None:
        raise RecipeError(f"{where}.kind: missing; one of {', '.join(family.names())}")
    family.get(str(kind), f"{where}.kind: ")
    return str(kind)


def _dataset(name: str, raw: dict[str, Any], default_role: str, where: str, folder: Path) -> DatasetSpec:

    spec = dict(raw)
    kind = _kind(spec, where, registry.data)
    common = {k: spec.pop(k) for k in COMMON_DATA_KEYS if k in spec}
    params = registry.data.validate(kind, spec, where=where, folder=folder, also_allowed=COMMON_DATA_KEYS)
    role = common.get("role", default_role)
    if default_role == "heldout":
        if "role" in common:
            raise RecipeError(f"{where}.role: the held-out set has no role (it is always 'heldout')")
    elif role not in ("in_distribution", "shift"):
        raise RecipeError(f"{where}.role: expected in_distribution or shift, got {role!r}")
    fraction = common.get("holdout_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise RecipeError(f"{where}.holdout_fraction: expected a number between 0 and 1, got {fraction!r}")
    seed = common.get("holdout_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"{where}.holdout_seed: expected an integer, got {seed!r}")
    limit = common.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise RecipeError(f"{where}.limit: expected a positive integer, got {limit!r}")
    subset = _class_subset(common.get("class_subset"), f"{where}.class_subset", folder)
    return DatasetSpec(name=name, kind=kind, params=params, role=role, class_subset=subset,
                       holdout_fraction=None if fraction is None else float(fraction), holdout_seed=seed,
                       limit=limit, where=where)


def _class_subset(value: Any, where: str, folder: Path) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):

        path = resolve_path(value, folder, where)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            raise RecipeError(f"{where}: cannot read class-subset file {path}") from None
        tokens = [t for line in text.splitlines() for t in line.split("#")[0].replace(",", " ").split()]
        try:
            ids = [int(t) for t in tokens]
        except ValueError:
            raise RecipeError(f"{where}: {path} must hold integer class ids, one per line") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        ids = list(value)
    else:
        raise RecipeError(f"{where}: expected a list of class ids or a file of them, got {value!r}")
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise RecipeError(f"{where}: expected distinct non-negative class ids, at least one")
    return tuple(ids)
