"""Decode and preprocess a dataset once into tensors the evaluator keeps for every later evaluation.

The model's evaluation transform is split at its ``ToTensor``: the PIL part (resize, crop, mode conversion) runs
once per image while decoding and yields uint8 pixels (4x smaller than float); the ``Normalize`` after it runs on
the device, per batch. Transforms that do more after ``ToTensor`` are applied whole, and stored as float.
Text records (for ``kind: transformers`` models) are tokenised once instead, by ``soupkit.eval.text``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import RecipeError
from soupkit.eval.data import Source
from soupkit.eval.models import BuiltModel
from soupkit.eval.recipe import DatasetSpec
from soupkit.eval.text import prepare_text


@dataclass
class Prepared:
    """A dataset ready for batching: this process's shard, stored once (on the device if it fits)."""

    name: str
    images: torch.Tensor  # (n_local, C, H, W): uint8 raw pixels or float model-ready
    labels: torch.Tensor  # (n_local,) int64, on the device
    total: int  # examples over all processes
    start: int  # index of this shard's first example in the whole dataset
    mean: torch.Tensor | None  # (1, C, 1, 1) on the device, for uint8 images
    std: torch.Tensor | None
    class_subset: torch.Tensor | None  # logit columns, on the device
    metric: str = "accuracy"

    @property
    def n(self) -> int:
        return len(self.labels)

    def order_for(self, batch_size: int, order: torch.Tensor | None) -> torch.Tensor | None:
        """The example order batches take: dataset order (None) unless one is given."""
        return order


def split_transform(transform: Any) -> tuple[list[Any], tuple[float, ...] | None, tuple[float, ...] | None] | None:
    """(PIL-stage transforms, mean, std) when ``transform`` is ``[PIL ops..., ToTensor, Normalize?]``, else None."""
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return None
    names = [type(t).__name__ for t in steps]
    cut = next((i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor")), None)
    if cut is None:
        return None
    after = steps[cut + 1:]
    if not after:
        return list(steps[:cut]), None, None
    if len(after) == 1 and type(after[0]).__name__ == "Normalize":
        mean = tuple(float(v) for v in torch.as_tensor(after[0].mean).flatten())
        std = tuple(float(v) for v in torch.as_tensor(after[0].std).flatten())
        return list(steps[:cut]), mean, std
    return None


class _Decoded(torch.utils.data.Dataset):
    """Items of ``dataset`` at ``indices``, decoded to tensors (uint8 after the PIL stage, or the full transform)."""

    def __init__(self, dataset: Any, indices: list[int], pil_stage: list[Any] | None, full: Any, channels: int):
        self.dataset, self.indices, self.channels = dataset, indices, channels
        self.pil_stage, self.full = pil_stage, full

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        image, label = self.dataset[self.indices[i]]
        if isinstance(image, Image.Image):
            if self.pil_stage is not None:
                if self.channels == 3 and image.mode != "RGB":
                    image = image.convert("RGB")
                for step in self.pil_stage:
                    image = step(image)
                return pil_to_tensor(image), int(label)
            return self.full(image), int(label)
        return torch.as_tensor(image), int(label)


def select(n: int, spec: DatasetSpec) -> torch.Tensor | None:
    """Indices kept by ``holdout_fraction`` (a seeded random fraction) and ``limit``; None = all."""
    index = None
    if spec.holdout_fraction is not None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.holdout_seed))
        index = order[: max(1, round(spec.holdout_fraction * n))].sort().values
    if spec.limit is not None:
        index = (index if index is not None else torch.arange(n))[: spec.limit]
    return index


def prepare(spec: DatasetSpec, source: Source, model: BuiltModel, device: torch.device, rank: int, world: int,
            num_workers: int | None, batch_size: int, token_cache: Path | None = None) -> Any:
    """Turn ``source`` into this process's shard of ready tensors, stored on ``device`` if they fit: a
    ``Prepared`` for images, a ``soupkit.eval.text.TextData`` for text (``token_cache``: see ``prepare_text``)."""
    if (source.text is None) != (model.text is None):
        given, wanted = ("text", "images") if source.text is not None else ("images", "text")
        kinds = "imagefolder, tensors, digits or python" if wanted == "images" else "jsonl, csv or hf_disk"
        raise RecipeError(f"{spec.where}.kind: {spec.kind} gives {given} but the recipe's model takes {wanted} "
                          f"(use kind {kinds})")
    if source.text is not None:

        return prepare_text(spec, source.text, model.text, device, rank, world, token_cache)
    index = select(len(source), spec)
    total = len(source) if index is None else len(index)
    if total == 0:
        raise RecipeError(f"{spec.where}: the dataset has no examples")
    start, stop = total * rank // world, total * (rank + 1) // world
    chosen = (torch.arange(len(source)) if index is None else index)[start:stop]
    mean = std = None
    if source.images is not None:
        images, labels = source.images[chosen], source.labels[chosen]
        if images.dtype == torch.uint8 and model.mean is not None:
            mean, std = model.mean, model.std
    else:
        images, labels, mean, std = _decode(spec, source.dataset, chosen.tolist(), model, num_workers, batch_size)
    if len(labels) and (int(labels.min()) < 0):
        raise RecipeError(f"{spec.where}: labels must be non-negative class ids")
    if spec.class_subset is not None and len(labels) and int(labels.max()) >= len(spec.class_subset):
        raise RecipeError(f"{spec.where}.class_subset: lists {len(spec.class_subset)} classes but a label is "
                          f"{int(labels.max())}")
    stored = place(images, device)
    as_tensor = (lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1))  # noqa: E731
    subset = None if spec.class_subset is None else torch.tensor(spec.class_subset, device=device)
    return Prepared(spec.name, stored, labels.to(device), total, start,
                    None if mean is None else as_tensor(mean), None if std is None else as_tensor(std), subset)


def _decode(spec: DatasetSpec, dataset: Any, indices: list[int], model: BuiltModel, num_workers: int | None,
            batch_size: int) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    transform = model.transform
    if transform is None:
        transform = _default_transform(spec, model)
    parts = split_transform(transform)
    pil_stage, mean, std = parts if parts is not None else (None, None, None)
    channels = model.input_size[0] if model.input_size else 3
    decoded = _Decoded(dataset, indices, pil_stage, transform, channels)
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    workers = 0 if len(indices) < 256 else workers
    loader = torch.utils.data.DataLoader(decoded, batch_size=min(batch_size, 256), num_workers=workers,
                                         shuffle=False)
    images, labels = [], []
    try:
        for x, y in loader:
            images.append(x)
            labels.append(y)
    except RuntimeError as error:  # mismatched image sizes from a dataset without a fixed-size transform
        raise RecipeError(f"{spec.where}: cannot batch the decoded images ({str(error).splitlines()[0]})") from None
    if not images:
        empty = torch.zeros(0, *(model.input_size or (3, 1, 1)), dtype=torch.uint8)
        return empty, torch.zeros(0, dtype=torch.int64), mean, std
    return torch.cat(images), torch.cat(labels).to(torch.int64), mean, std


def _default_transform(spec: DatasetSpec, model: BuiltModel) -> Any:
    """For models that bring no transform (``kind: python``): resize + centre crop to ``input_size``."""
    from torchvision import transforms

    if model.input_size is None:
        raise RecipeError(f"{spec.where}: the model brings no image transform; give model.input_size (and "
                          "model.mean / model.std) so images can be resized and normalised")
    _, h, w = model.input_size
    steps = [transforms.Resize(min(h, w)), transforms.CenterCrop((h, w)), transforms.ToTensor()]
    if model.mean is not None:
        steps.append(transforms.Normalize(model.mean, model.std or (1.0,) * len(model.mean)))
    return transforms.Compose(steps)


def place(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On a GPU: on the device when the set takes under a third of its free memory, else pinned host memory
    (the batches then copy asynchronously). On the CPU: contiguous host memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes < free / 3:
            return images.to(device)
        return images.contiguous().pin_memory()
    return images.contiguous()
