"""``kind: timm``: a timm model by name, randomly initialised (``pretrained=False`` always; give a local
``weights`` file instead), with timm's own evaluation transform for its data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError, unknown_choice
from soupkit.eval.models import BuildContext, BuiltModel, load_weights
from soupkit.eval.registry import model_adapter
from soupkit.io.foreign_code import refuse_source_prefix

#: create_model keyword arguments that make timm load configs or weights itself (from the hub or any file)
_LOADING_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


@model_adapter("timm")
def timm_model(name: str, num_classes: int = 1000, weights: Path | None = None, img_size: int | None = None,
               kwargs: dict[str, Any] | None = None, *, context: BuildContext) -> BuiltModel:
    """``timm.create_model(name, num_classes=..., pretrained=False)``; ``img_size`` for models that take one."""
    import timm
    from timm.data import create_transform, resolve_data_config

    refuse_source_prefix(name, f"{context.where}.name", "timm")
    loading = sorted(set(kwargs or {}) & set(_LOADING_KWARGS))
    if loading:
        raise RecipeError(f"{context.where}.kwargs: {loading[0]!r} makes timm load weights or configs itself; "
                          "soupkit builds timm models with pretrained=False: give a local `weights` file instead")
    if not timm.is_model(name):

        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:20] or timm.list_models()[:20]
        raise RecipeError(f"{context.where}.name: {unknown_choice('timm model', name, close)}")
    args = dict(kwargs or {})
    if img_size is not None:
        args["img_size"] = img_size
    try:
        module = timm.create_model(name, pretrained=False, num_classes=num_classes, **args)
    except TypeError as error:
        raise RecipeError(f"{context.where}: timm.create_model({name!r}, {args}) failed: {error}") from None
    if weights is not None:
        load_weights(module, weights, context.where)
    config = resolve_data_config({"input_size": (3, img_size, img_size)} if img_size else {}, model=module)
    return BuiltModel(module, transform=create_transform(**config), input_size=tuple(config["input_size"]),
                      mean=tuple(config["mean"]), std=tuple(config["std"]))
