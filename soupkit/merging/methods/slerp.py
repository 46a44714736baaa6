"""SLERP: spherical linear interpolation between two models, tensor by tensor (Shoemake, 1985; popularised for
LLM merging by mergekit)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from soupkit._lazy import torch
from soupkit.errors import ParameterError
from soupkit.merging.methods.ties import CONVENTIONS, Convention
from soupkit.merging.registry import Param, merge_method
from soupkit.options import user_name

if TYPE_CHECKING:
    from torch import Tensor

#: above this |cos| the two directions are (anti-)parallel: sin(angle) ~ 0, so interpolate linearly
PARALLEL_COS = 0.9995
#: mergekit leaves a direction of norm at most this unnormalised (and still takes the angle)
MERGEKIT_EPS = 1e-8


def _check(params: Any) -> None:
    if params.convention != "mergekit" and not 0.0 <= params.t <= 1.0:  # mergekit extrapolates
        raise ParameterError(f"slerp: {user_name('t')} must be in [0, 1], got {params.t} (outside, it extrapolates "
                             f"along the arc: convention 'mergekit' allows it)")


@merge_method(
    "slerp",
    pretty_name="SLERP (spherical interpolation of two models)",
    reference="https://dl.acm.org/doi/10.1145/325165.325242",
    min_models=2,
    max_models=2,
    elementwise=False,
    check=_check,
)
def slerp(tensors: Sequence[Tensor], *,
          t: Annotated[float, Param("SLERP interpolation factor in [0, 1]: 0 gives the first model, 1 the second "
                                    "(outside it extrapolates, with convention 'mergekit' only).")] = 0.5,
          convention: Annotated[Convention, Param(
              f"{' or '.join(map(repr, CONVENTIONS))}: a zero tensor makes the interpolation linear (soupkit) or, "
              f"as in mergekit, stays unnormalised in the angle's computation.")] = "soupkit") -> Tensor:
    """Interpolate each tensor along the great circle between the two models: sin((1-t)a)/sin(a) x0 +
    sin(t a)/sin(a) x1, a the angle between them.

    Keeps the interpolated weights' norm closer to the inputs' than a straight average does. Falls back to
    linear interpolation for (anti-)parallel or all-zero tensors; t=0 and t=1 give the inputs exactly.
    """
    first, second = tensors[0], tensors[1]
    if t == 0.0:
        return first.clone()
    if t == 1.0:
        return second.clone()
    a, b = first.reshape(-1), second.reshape(-1)
    norm_a = float(torch.linalg.vector_norm(a, dtype=torch.float64))
    norm_b = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    if convention == "mergekit":
        cos = float(torch.dot(a / norm_a if norm_a > MERGEKIT_EPS else a, b / norm_b if norm_b > MERGEKIT_EPS else b))
    else:
        cos = float(torch.dot(a / norm_a, b / norm_b)) if norm_a > 0.0 and norm_b > 0.0 else 1.0  # zero: linear
    if abs(cos) <= PARALLEL_COS:
        angle = math.acos(max(-1.0, min(1.0, cos)))
        sin = math.sin(angle)
        return first * (math.sin((1.0 - t) * angle) / sin) + second * (math.sin(t * angle) / sin)
    return first + (second - first) * t  # exactly the input when both are equal
