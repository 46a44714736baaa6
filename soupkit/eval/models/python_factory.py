"""``kind: python``: any ``package.module:function`` returning an ``nn.Module`` (keyword arguments allowed)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError
from soupkit.eval.models import BuildContext, BuiltModel, load_weights
from soupkit.eval.registry import model_adapter


def import_object(spec: str, where: str, folder: Path | None = None) -> Any:
    """``"pkg.mod:attr"`` -> the attribute, with one-line errors naming the recipe field. A module that is not
    importable as installed is looked for in ``folder`` (the recipe's), so a factory file can sit beside its
    recipe without PYTHONPATH."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RecipeError(f"{where}: expected 'package.module:function', got {spec!r}")
    try:
        module = _import(module_name, folder)
    except ImportError as error:
        beside = f" (looked in the recipe's folder {folder} too)" if folder is not None else ""
        raise RecipeError(f"{where}: cannot import {module_name!r}{beside}: {error}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RecipeError(f"{where}: module {module_name!r} has no attribute {attr!r}") from None


def _import(module_name: str, folder: Path | None) -> Any:
    """Import ``module_name`` as installed first (a file beside the recipe never shadows an installed module);
    only if its top-level package is missing, import it with ``folder`` at the front of ``sys.path`` for that
    one import, then restore ``sys.path``."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        top = module_name.split(".")[0]
        if folder is None or error.name != top:
            raise
        if not ((folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()):
            raise
    entry = str(folder.absolute())
    sys.path.insert(0, entry)
    try:
        return importlib.import_module(module_name)
    finally:
        try:
            sys.path.remove(entry)
        except ValueError:  # the module itself removed it
            pass


@model_adapter("python")
def python_model(factory: str, kwargs: dict[str, Any] | None = None, num_classes: int | None = None,
                 weights: Path | None = None, input_size: int | None = None, channels: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, *,
                 context: BuildContext) -> BuiltModel:
    """A model from your own code: ``factory(**kwargs, num_classes=...)``. ``input_size``/``channels`` tell data
    adapters the image size; ``mean``/``std`` normalise [0, 1] pixels (raw images only)."""
    import torch.nn as nn

    fn = import_object(factory, f"{context.where}.factory", context.folder)
    args = dict(kwargs or {})
    if num_classes is not None:
        args["num_classes"] = num_classes
    try:
        module = fn(**args)
    except TypeError as error:
        call = ", ".join(f"{k}={v!r}" for k, v in args.items())
        raise RecipeError(f"{context.where}.factory: {factory}({call}) failed: {error}") from None
    if not isinstance(module, nn.Module):
        raise RecipeError(f"{context.where}.factory: {factory} returned a {type(module).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(module, weights, context.where)
    size = None
    if input_size is not None:
        size = (channels or 3, input_size, input_size)
    return BuiltModel(module, input_size=size, mean=None if mean is None else tuple(mean),
                      std=None if std is None else tuple(std))
