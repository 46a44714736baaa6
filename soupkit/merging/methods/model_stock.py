"""Model Stock: average the fine-tuned models, then pull the average towards the base by how much the
fine-tuned models agree (Jang et al., ECCV 2024)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit._lazy import torch
from soupkit.merging.methods.linear import weighted_mean
from soupkit.merging.methods.ties import CONVENTIONS, Convention
from soupkit.merging.registry import Param, merge_method

if TYPE_CHECKING:
    from torch import Tensor


def mean_pairwise_cosine(deltas: Sequence[Tensor]) -> float:
    """Mean cosine similarity over all pairs of flattened ``deltas``; a zero delta counts as cosine 0."""
    flat = [d.reshape(-1) for d in deltas]
    norms = [float(torch.linalg.vector_norm(d, dtype=torch.float64)) for d in flat]
    cosines = [
        float(torch.dot(flat[i], flat[j])) / (norms[i] * norms[j]) if norms[i] > 0 and norms[j] > 0 else 0.0
        for i, j in itertools.combinations(range(len(flat)), 2)
    ]
    return sum(cosines) / len(cosines)


@merge_method(
    "model_stock",
    pretty_name="Model Stock (agreement-weighted average towards the base)",
    reference="https://arxiv.org/abs/2403.19522",
    min_models=2,
    elementwise=False,
)
def model_stock(tensors: Sequence[Tensor], *, base: Tensor,
                convention: Annotated[Convention, Param(
                    f"{' or '.join(map(repr, CONVENTIONS))}: a negative mean cosine gives t = 0 (the base; "
                    f"soupkit) or is used as is, extrapolating (mergekit).")] = "soupkit") -> Tensor:
    """t * mean(theta_i) + (1 - t) * base per tensor, t = N cos / (1 + (N - 1) cos), cos the mean pairwise
    cosine between the task vectors theta_i - base.

    Gets most of a large soup's benefit from few fine-tuned models (the paper uses two). Layers where the
    models agree (cos ~ 1) take the average; where they are unrelated (cos ~ 0) the base. A negative mean
    cosine is clamped to 0 (t = 0: the base), where the formula would extrapolate away from the models
    (convention="mergekit" keeps it, as mergekit does).
    """
    n = len(tensors)
    if all(torch.equal(tensors[0], other) for other in tensors[1:]):
        return tensors[0].clone()  # identical models: the formula gives t = 1 up to rounding; make it exact
    cos = min(max(mean_pairwise_cosine([x - base for x in tensors]), 0.0 if convention == "soupkit" else -1.0), 1.0)
    t = n * cos / (1.0 + (n - 1) * cos)
    return weighted_mean(tensors, [1.0] * n).mul_(t).add_(base, alpha=1.0 - t)
