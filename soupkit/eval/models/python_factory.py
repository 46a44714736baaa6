"""``kind: python``: any ``package.module:function`` returning an ``nn.Module`` (keyword arguments allowed)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError
from soupkit.eval.models import BuildContext, BuiltModel, load_weights
from soupkit.eval.registry import model_adapter


def import_object(spec: str, where: str) -> Any:
    """``"pkg.mod:attr"`` -> the attribute, with one-line errors naming the recipe field."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RecipeError(f"{where}: expected 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(f"{where}: cannot import {module_name!r}: {error}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RecipeError(f"{where}: module {module_name!r} has no attribute {attr!r}") from None


@model_adapter("python")
def python_model(factory: str, kwargs: dict[str, Any] | None = None, num_classes: int | None = None,
                 weights: Path | None = None, input_size: int | None = None, channels: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, *,
                 context: BuildContext) -> BuiltModel:
    """A model from your own code: ``factory(**kwargs, num_classes=...)``. ``input_size``/``channels`` tell data
    adapters the image size; ``mean``/``std`` normalise [0, 1] pixels (raw images only)."""
    import torch.nn as nn

    fn = import_object(factory, f"{context.where}.factory")
    args = dict(kwargs or {})
    if num_classes is not None:
        args["num_classes"] = num_classes
    try:
        module = fn(**args)
    except TypeError as error:
        raise RecipeError(f"{context.where}.factory: {factory}(**{args}) failed: {error}") from None
    if not isinstance(module, nn.Module):
        raise RecipeError(f"{context.where}.factory: {factory} returned a {type(module).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(module, weights, context.where)
    size = None
    if input_size is not None:
        size = (channels or 3, input_size, input_size)
    return BuiltModel(module, input_size=size, mean=None if mean is None else tuple(mean),
                      std=None if std is None else tuple(std))
