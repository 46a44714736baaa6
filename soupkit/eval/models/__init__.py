"""Model adapters: each builds the ``nn.Module`` a recipe's ``model:`` section describes.

An adapter is a function registered with ``@model_adapter("kind")`` whose signature is the recipe schema; it
returns a ``BuiltModel`` (the module, randomly initialised unless a local ``weights`` file is given, plus the
model's own evaluation preprocessing so data adapters can match it). Nothing is ever downloaded.

Adding a kind is adding a file: every module in this package is imported (and so registers its kinds) when the
registry is first used, as merge methods are (``soupkit.merging.methods``); other packages register through the
``soupkit.models`` entry-point group. ``docs/kinds.md`` lists the kinds and their recipe keys (generated).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError
from soupkit.eval.registry import model_adapter, models
from soupkit.io import load_checkpoint


@dataclass
class BuiltModel:
    """A model plus what data preparation needs to know about its input.

    ``text``: set by text models (``kind: transformers``): the task and tokenizer data preparation uses.
    ``transform``: the model's own evaluation transform (PIL image -> normalised tensor), when it has one.
    ``input_size``: (channels, height, width) when known. ``mean``/``std``: normalisation applied to raw [0, 1]
    pixels when there is no transform (``None`` = feed [0, 1] pixels as they are).
    """

    module: Any
    transform: Any = None
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    text: Any = None  # text models: what tokenisation needs (``transformers_models.TextInfo``); None = images
    fingerprint: str | None = None  # content of files the adapter read besides the checkpoint (score-cache key)
    base_weights: Any = None  # a checkpoint LoRA adapters are applied to (a transformers folder's own weights)


@dataclass
class BuildContext:
    """What an adapter may need from the evaluator: the recipe's folder (for its own relative paths) and the
    device the model will run on (for one-off computations such as a zero-shot head)."""

    folder: Path
    device: Any = None
    where: str = "model"


def load_weights(module: Any, path: Path, where: str) -> None:
    """Load a local weights file into ``module`` (strict), with a one-line error naming the recipe field."""
    if not path.exists():
        raise RecipeError(f"{where}.weights: {path} does not exist")
    state = load_checkpoint(path)
    result = module.load_state_dict(state, strict=False)
    bad = [*result.missing_keys, *result.unexpected_keys]
    if bad:
        raise RecipeError(f"{where}.weights: {path} does not fit the model: missing {result.missing_keys[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}")


# every module of the package registers its kinds (after the classes above, which they import)
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BuildContext", "BuiltModel", "load_weights", "model_adapter", "models"]
