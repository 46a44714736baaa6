"""``kind: digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download), upsampled to the model's
input size, with a fixed train / held-out / test split and named, deterministic distribution shifts.

Split (for a given ``seed``): a seeded permutation puts 25% of the images in ``test``; of the rest, the fraction
``holdout`` (default 0.2) is ``heldout`` and the remainder is ``train``. The three never overlap, so a model
trained on ``train`` can be selected on ``heldout`` and reported on ``test``.

Shifts (applied after upsampling, pixels in [0, 1], same corruption for the same seed): ``noise`` (gaussian,
sigma 0.35), ``rotation`` (+-25 to 45 degrees), ``blur`` (gaussian, sigma = size/10), ``inversion`` (1 - x),
``occlusion`` (a black square of 40% of the side at a random place).
"""

from __future__ import annotations

from typing import Any, Literal

from soupkit.errors import ParameterError, RecipeError, unknown_choice
from soupkit.eval.data import Source
from soupkit.eval.registry import data_adapter

SPLITS = ("train", "heldout", "test")
SHIFTS = ("noise", "rotation", "blur", "inversion", "occlusion")
TEST_FRACTION = 0.25


def _partition(n: int, seed: int, holdout: float) -> dict[str, Any]:
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(TEST_FRACTION * n)
    rest = order[n_test:]
    n_held = round(holdout * len(rest))
    return {"test": order[:n_test].sort().values, "heldout": rest[:n_held].sort().values,
            "train": rest[n_held:].sort().values}


def load_digits_split(split: str, shift: str | None = None, size: int = 16, seed: int = 0, channels: int = 1,
                      holdout: float = 0.2) -> tuple[Any, Any]:
    """(images float32 (N, channels, size, size) in [0, 1], labels int64 (N,)) of one split, optionally shifted.

    Deterministic: the same arguments give bit-identical tensors.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ParameterError(f"digits split must be one of {', '.join(SPLITS)}, got {split!r}")
    if shift is not None and shift not in SHIFTS:

        raise ParameterError(unknown_choice("digits shift", shift, SHIFTS))
    if not (isinstance(size, int) and size >= 8) or channels not in (1, 3) or not 0 < holdout < 1:
        raise ParameterError(f"digits: need size >= 8, channels 1 or 3 and 0 < holdout < 1 (got size={size}, "
                             f"channels={channels}, holdout={holdout})")
    bunch = load_digits()
    index = _partition(len(bunch.target), seed, holdout)[split]
    images = torch.from_numpy(bunch.images).float()[index].unsqueeze(1) / 16.0
    labels = torch.from_numpy(bunch.target).long()[index]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    if shift is not None:
        generator = torch.Generator().manual_seed(seed * 1009 + 17 * (SHIFTS.index(shift) + 1) + SPLITS.index(split))
        images = _SHIFT_FNS[shift](images, generator).clamp_(0, 1)
    if channels == 3:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous(), labels


def _noise(x: Any, g: Any) -> Any:
    import torch

    return x + 0.35 * torch.randn(x.shape, generator=g)


def _rotation(x: Any, g: Any) -> Any:
    import math

    import torch
    import torch.nn.functional as F

    n = len(x)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    angle = sign * (25 + 20 * torch.rand(n, generator=g)) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(x: Any, g: Any) -> Any:
    import torch
    import torch.nn.functional as F

    sigma = x.shape[-1] / 10
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def _inversion(x: Any, g: Any) -> Any:
    return 1.0 - x


def _occlusion(x: Any, g: Any) -> Any:
    import torch

    n, _, h, w = x.shape
    side = max(1, round(0.4 * h))
    top = torch.randint(0, h - side + 1, (n,), generator=g)
    left = torch.randint(0, w - side + 1, (n,), generator=g)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + side).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + side).view(n, 1, 1)))
    return x.masked_fill(inside.unsqueeze(1), 0.0)


_SHIFT_FNS = {"noise": _noise, "rotation": _rotation, "blur": _blur, "inversion": _inversion,
              "occlusion": _occlusion}


@data_adapter("digits")
def digits(split: Literal["train", "heldout", "test"] = "test",
           shift: Literal["noise", "rotation", "blur", "inversion", "occlusion"] | None = None,
           size: int | None = None, channels: int | None = None, seed: int = 0, holdout: float = 0.2, *,
           context: object = None) -> Source:
    """Bundled digits; ``size``/``channels`` default to the model's input (else 16 x 16, 1 channel)."""

    model = getattr(context, "model", None)
    known = getattr(model, "input_size", None)
    size = size or (known[1] if known else 16)
    channels = channels or (known[0] if known else 1)
    try:
        images, labels = load_digits_split(split, shift, size=size, seed=seed, channels=channels, holdout=holdout)
    except ParameterError as error:
        raise RecipeError(f"{getattr(context, 'where', 'data')}: {error}") from None
    return Source(images=images, labels=labels)
