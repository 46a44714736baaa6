"""NearSwap: take the second model's value where it is close to the base's, the base's where they differ
(interpolating in between) (alchemonaut, QuartetAnemoi-70B; mergekit's ``nearswap``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit._lazy import torch
from soupkit.merging.registry import Param, merge_method

if TYPE_CHECKING:
    from torch import Tensor

#: mergekit floors |base - model| at this before dividing
MIN_DIFFERENCE = 1e-6


@merge_method(
    "nearswap",
    pretty_name="NearSwap (the model's values where they are near the base's)",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    min_models=1,
    max_models=1,
)
def nearswap(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    t: Annotated[float, Param("NearSwap similarity threshold: entries closer than t to the base's take the "
                              "model's value (mergekit requires it; ~1e-4 is typical).", ge=0)],
) -> Tensor:
    """w * theta + (1 - w) * base per entry, w = clamp(t / max(|base - theta|, 1e-6), 0, 1).

    Keeps the base model except where the other model barely moved, so it blends two models of the same family
    conservatively. Elementwise (streams in chunks).
    """
    model = tensors[0]
    weight = torch.clamp(t / torch.clamp((base - model).abs(), min=MIN_DIFFERENCE), 0.0, 1.0)
    return weight * model + (1.0 - weight) * base
