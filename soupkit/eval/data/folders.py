"""``kind: imagefolder`` (a torchvision ImageFolder tree: one sub-folder per class) and ``kind: tensors`` (a
``.safetensors``/``.pt`` file holding ``images`` (N, C, H, W) and ``labels`` (N,))."""

from __future__ import annotations

from pathlib import Path

from soupkit.errors import RecipeError, SoupkitError
from soupkit.eval.data import Source
from soupkit.eval.registry import data_adapter
from soupkit.io import open_checkpoint


@data_adapter("imagefolder")
def imagefolder(path: Path, numeric_classes: bool = False, *, context: object = None) -> Source:
    """Images in ``path/<class>/*.jpg``; classes sorted by folder name (torchvision's ImageFolder order), or with
    ``numeric_classes: true`` the folder names are the class ids themselves (ImageNet-V2's ``0`` ... ``999``)."""
    where = getattr(context, "where", "data")
    if not path.is_dir():
        raise RecipeError(f"{where}.path: {path} is not a folder")
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(path))
    except (FileNotFoundError, OSError) as error:
        raise RecipeError(f"{where}.path: {path}: {error}") from None
    if numeric_classes:
        try:
            ids = [int(name) for name in dataset.classes]
        except ValueError:
            bad = next(n for n in dataset.classes if not n.isdigit())
            raise RecipeError(f"{where}.numeric_classes: folder {bad!r} in {path} is not a class id") from None
        dataset.samples = [(file, ids[label]) for file, label in dataset.samples]
        dataset.targets = [label for _, label in dataset.samples]
    return Source(dataset=dataset)


@data_adapter("tensors")
def tensors(path: Path, images: str = "images", labels: str = "labels", *, context: object = None) -> Source:
    """Ready tensors from one file (uint8 = raw pixels, float = model-ready)."""
    import torch


    where = getattr(context, "where", "data")
    if not path.is_file():
        raise RecipeError(f"{where}.path: {path} does not exist")
    try:
        with open_checkpoint(path) as reader:
            missing = [k for k in (images, labels) if k not in reader]
            if missing:
                raise RecipeError(f"{where}.path: {path} has no tensor {missing[0]!r} (it has {reader.keys()[:6]})")
            x, y = reader.get(images), reader.get(labels)
    except RecipeError:
        raise
    except SoupkitError as error:
        raise RecipeError(f"{where}.path: {error}") from None
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
        raise RecipeError(f"{where}.path: {path}: expected {images} (N, C, H, W) and {labels} (N,), got "
                          f"{tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype.is_floating_point:
        raise RecipeError(f"{where}.path: {path}: {labels} must be integer class ids, got {y.dtype}")
    return Source(images=x, labels=y.to(torch.int64))
