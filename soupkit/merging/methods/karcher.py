"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit hypersphere, found by
fixed-point iteration, scaled by their mean norm (mergekit's ``karcher``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit._lazy import torch
from soupkit.merging.registry import Param, merge_method

if TYPE_CHECKING:
    from torch import Tensor


def karcher_mean(tensors: Sequence[Tensor], alphas: Sequence[float], *, max_iter: int, tol: float) -> Tensor:
    """The weighted Karcher mean of the unit directions (inputs of norm <= tol left out), times sum_i a_i |x_i|.

    Each step maps the inputs to the tangent space at the current mean (log map), averages them there and maps
    back (exp map); it stops when the step is shorter than tol or after max_iter steps.
    """
    norms = [float(torch.linalg.vector_norm(t, dtype=torch.float64)) for t in tensors]
    valid = [i for i, norm in enumerate(norms) if norm > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [tensors[i].reshape(-1) / norms[i] for i in valid]
    mean = sum(w * u for w, u in zip(weights, units))
    assert isinstance(mean, torch.Tensor)
    mean_norm = float(torch.linalg.vector_norm(mean, dtype=torch.float64))
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, unit in zip(weights, units):
            cos = torch.clamp(torch.dot(mean, unit), -1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < tol:
                continue
            tangent += w * (angle / torch.sin(angle)) * (unit - cos * mean)
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        length = float(torch.linalg.vector_norm(mean, dtype=torch.float64))
        if length > tol:
            mean = mean / length
    scale = sum(a * norm for a, norm in zip(alphas, norms))
    return (mean * scale).view_as(tensors[0])


@merge_method(
    "karcher",
    pretty_name="Karcher mean (Riemannian mean of directions on the sphere)",
    reference="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    elementwise=False,
)
def karcher(
    tensors: Sequence[Tensor],
    *,
    max_iter: Annotated[int, Param("Most fixed-point iterations of the Karcher mean.", ge=1)] = 10,
    tol: Annotated[float, Param("Stop when the step is shorter than this; inputs of norm <= tol are left out.",
                                gt=0)] = 1e-5,
) -> Tensor:
    """The uniform Karcher mean of the models' unit directions (each tensor one vector), scaled by their mean norm.

    The geometric generalisation of SLERP to any number of models: interpolates on the sphere, where a plain
    average shrinks the norm. mergekit's defaults: 10 iterations, tolerance 1e-5; no weights.
    """
    n = len(tensors)
    if n == 1 or all(torch.equal(tensors[0], other) for other in tensors[1:]):
        return tensors[0].clone()
    return karcher_mean(tensors, [1.0 / n] * n, max_iter=max_iter, tol=tol)
