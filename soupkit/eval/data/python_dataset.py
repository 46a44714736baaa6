"""``kind: python``: any ``package.module:function`` returning a map-style dataset of (image, label)."""

from __future__ import annotations

from typing import Any

from soupkit.errors import RecipeError
from soupkit.eval.data import Source
from soupkit.eval.models.python_factory import import_object
from soupkit.eval.registry import data_adapter


@data_adapter("python")
def python_dataset(factory: str, kwargs: dict[str, Any] | None = None, *, context: object = None) -> Source:
    """``factory(**kwargs)`` -> a Dataset whose items are (PIL image or tensor, int label)."""

    where = f"{getattr(context, 'where', 'data')}.factory"
    fn = import_object(factory, where, getattr(context, "folder", None))
    try:
        dataset = fn(**(kwargs or {}))
    except TypeError as error:
        raise RecipeError(f"{where}: {factory}(**{kwargs or {}}) failed: {error}") from None
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise RecipeError(f"{where}: {factory} returned a {type(dataset).__name__}, not a map-style dataset")
    return Source(dataset=dataset)
