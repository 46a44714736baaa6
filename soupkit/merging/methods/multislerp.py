"""Multi-SLERP: the weighted barycentre of any number of models on the hypersphere, through the tangent space
at their weighted mean direction (Goddard; mergekit's ``multislerp``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from soupkit._lazy import torch
from soupkit.errors import ParameterError
from soupkit.merging.methods.linear import WEIGHTS
from soupkit.merging.registry import Param, merge_method
from soupkit.merging.sparsify import one_per_model

if TYPE_CHECKING:
    from torch import Tensor


def _check(params: Any) -> None:
    if params.normalize_weights and abs(sum(one_per_model(params.weights, params.n_models))) < 1e-12:
        raise ParameterError("weights sum to 0 and cannot be normalised; pass normalize_weights=false")


@merge_method(
    "multislerp",
    pretty_name="Multi-SLERP (spherical barycentre of several models)",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    elementwise=False,
    check=_check,
)
def multislerp(
    tensors: Sequence[Tensor],
    *,
    key: str,
    base: Tensor | None = None,
    weights: Annotated[float | list[float], WEIGHTS] = 1.0,
    normalize_weights: Annotated[bool, Param("Divide the weights by their sum.")] = True,
    eps: Annotated[float, Param("Added to norms before dividing by them (mergekit's eps).", gt=0)] = 1e-8,
) -> Tensor:
    """exp_m(sum_i w_i P_m(u_i)) * sum_i w_i |theta_i|: u_i the unit directions, m their normalised weighted
    mean, P_m the projection onto the tangent space at m, exp_m the exponential map back to the sphere; with
    --base, of the task vectors theta_i - base (the result added to the base).

    SLERP for more than two models: interpolates directions on the sphere and norms linearly. Two antipodal
    inputs with balancing weights interpolate linearly; more such inputs are refused (their mean direction is
    undefined).
    """
    n = len(tensors)
    if n == 1 or all(torch.equal(tensors[0], other) for other in tensors[1:]):
        return tensors[0].clone()
    if base is not None:
        return base + multislerp([t - base for t in tensors], key=key, weights=weights,
                                 normalize_weights=normalize_weights, eps=eps)
    w = one_per_model(weights, n)
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    flat = [t.reshape(-1) for t in tensors]
    norms = [torch.linalg.vector_norm(f) for f in flat]
    units = [f / (norm + eps) for f, norm in zip(flat, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < eps:
        if n == 2:
            return (tensors[0] * w[0] + tensors[1] * w[1]).view_as(tensors[0])
        raise ParameterError(f"multislerp: {key!r}: the weighted mean of the models' directions is zero "
                             f"(antipodal tensors with balancing weights); change --weights")
    mean = mean / mean_norm
    tangent = sum(wi * (u - torch.dot(u, mean) * mean) for wi, u in zip(w, units))
    length = torch.linalg.vector_norm(tangent) + eps
    point = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    scale = sum(wi * norm for wi, norm in zip(w, norms))
    return (point * scale).view_as(tensors[0])
