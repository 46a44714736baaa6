"""Passthrough: one model's tensors, copied (optionally scaled) -- mergekit's ``passthrough``, the method of layer
stacking ("frankenmerges": ``slices:`` in a mergekit config, ``soupkit.merging.slices``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit.merging.registry import Param, merge_method

if TYPE_CHECKING:
    from torch import Tensor


@merge_method(
    "passthrough",
    pretty_name="Passthrough (copy one model, optionally scaled)",
    reference="https://github.com/arcee-ai/mergekit",
    min_models=1,
    max_models=1,
)
def passthrough(tensors: Sequence[Tensor], *,
                scale: Annotated[float, Param("Factor every tensor is multiplied by (1 copies it bit for bit; "
                                              "mergekit configs scale e.g. o_proj per filter).")] = 1.0) -> Tensor:
    """The one input, times ``scale``: a copy at scale 1. Used per slice to stack layers of several models."""
    return tensors[0].clone() if scale == 1.0 else tensors[0] * scale
