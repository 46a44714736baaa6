"""Data adapters: each turns a recipe's dataset entry into images and labels, or text records.

An adapter is a function registered with ``@data_adapter("kind")`` whose signature is the recipe schema. It
returns a ``Source``: either ready tensors (``images`` uint8 raw pixels or float model-ready, ``labels``) or a
map-style dataset of ``(PIL image or tensor, label)`` that the evaluator decodes once, with the model's own
evaluation transform, into tensors it keeps for every later evaluation. Text kinds (``soupkit.eval.data.text``)
return records that the evaluator tokenises once with the model's tokenizer.

Adding a kind is adding a file: every module in this package is imported (and so registers its kinds) when the
registry is first used; other packages register through the ``soupkit.data`` entry-point group.
``docs/kinds.md`` lists the kinds and their recipe keys (generated).

Convention for tensors: **uint8 images are raw pixels** (the evaluator scales them to [0, 1] and applies the
model's normalisation on the device, batch by batch); **float images are model-ready** and used as they are.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.eval.registry import data, data_adapter


@dataclass
class Source:
    """What a data adapter returns (exactly one of ``images`` / ``dataset`` / ``text`` is set)."""

    images: Any = None  # Tensor (N, C, H, W)
    labels: Any = None  # Tensor (N,) int64
    dataset: Any = None  # map-style: item -> (PIL image | Tensor, int)
    text: Any = None  # soupkit.eval.data.text.TextRecords

    def __len__(self) -> int:
        if self.text is not None:
            return len(self.text)
        return len(self.labels) if self.images is not None else len(self.dataset)


@dataclass
class DataContext:
    """What a data adapter may need: the recipe folder, the built model (its input size and transform) and the
    recipe location for error messages."""

    folder: Path
    model: Any = None
    where: str = "data"


# every module of the package registers its kinds (after the classes above, which they import)
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DataContext", "Source", "data", "data_adapter"]
