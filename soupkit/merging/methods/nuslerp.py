"""NuSLERP: SLERP between two models with mergekit's newer options: weights instead of t, the whole tensor or
each row/column as the vector (mergekit's ``nuslerp``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit._lazy import torch
from soupkit.merging.methods.linear import WEIGHTS
from soupkit.merging.registry import Param, merge_method
from soupkit.merging.sparsify import one_per_model

if TYPE_CHECKING:
    from torch import Tensor

#: mergekit's floor on a vector's norm before normalising it ...
NORM_EPS = 1e-7
#: ... and directions with 1 - cos^2 <= COLINEAR_EPS**2 interpolate linearly
COLINEAR_EPS = 1e-8
#: weights summing to less than this give t = 0.5
WEIGHT_SUM_EPS = 1e-6


def slerp_along_last(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """SLERP of each vector along the last dimension: (sin((1-t)a) v0 + sin(t a) v1) / sin(a), a the angle between
    them (linear where they are colinear). The vectors keep their own norms, as in mergekit."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1.0 - cos.square()) <= COLINEAR_EPS**2
    angle = torch.acos(torch.where(colinear, 0.0, cos))
    spherical = (torch.sin((1.0 - t) * angle) * v0 + torch.sin(t * angle) * v1) / torch.sin(angle)
    return torch.where(colinear, (1.0 - t) * v0 + t * v1, spherical)


@merge_method(
    "nuslerp",
    pretty_name="NuSLERP (weighted SLERP of two models, whole tensors or rows)",
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    min_models=2,
    max_models=2,
    elementwise=False,
)
def nuslerp(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weights: Annotated[float | list[float], WEIGHTS] = 1.0,
    nuslerp_flatten: Annotated[bool, Param("Treat each tensor as one vector (false: interpolate each row, or "
                                           "with nuslerp_row_wise each column, separately).")] = True,
    nuslerp_row_wise: Annotated[bool, Param("Without nuslerp_flatten: the vectors run along dim 0 (mergekit's "
                                            "name) instead of the last dim.")] = False,
) -> Tensor:
    """SLERP between the two models at t = w_2 / (w_1 + w_2) (0.5 when the weights sum to ~0): of whole
    tensors, or of each row or column; with --base, of the task vectors (base + SLERP(theta_1 - base, theta_2 -
    base)).

    mergekit's successor of slerp: relative weights instead of t, and row-wise interpolation for tensors whose
    rows are independent directions. Equal weights (the default) give the spherical midpoint.
    """
    first, second = tensors[0], tensors[1]
    if torch.equal(first, second):
        return first.clone()
    w = one_per_model(weights, 2)
    total = w[0] + w[1]
    t = 0.5 if abs(total) < WEIGHT_SUM_EPS else w[1] / total
    if base is not None:
        first, second = first - base, second - base
    if nuslerp_flatten:
        merged = slerp_along_last(t, first.reshape(-1), second.reshape(-1)).view_as(first)
    elif nuslerp_row_wise and first.dim() > 1:
        merged = slerp_along_last(t, first.transpose(0, -1), second.transpose(0, -1)).transpose(0, -1).contiguous()
    else:
        merged = slerp_along_last(t, first, second)
    return merged if base is None else merged.add_(base)
