"""Arcee Fusion: keep the model's update only where it matters most, by |update| times the KL divergence
between the model's and the base's softmax along each row, above a dynamic (Tukey-fence) threshold (Arcee AI;
mergekit's ``arcee_fusion``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from soupkit._lazy import torch
from soupkit.merging.registry import merge_method

if TYPE_CHECKING:
    from torch import Tensor

#: mergekit adds this to both softmaxes before the log
SOFTMAX_EPS = 1e-8
#: the threshold: median + FENCE * (q3 - q1) of the importance scores
FENCE = 1.5


def quantile_at(values: Tensor, q: float) -> Tensor:
    """The value at sorted position ``int(q * (n - 1))`` (mergekit's index rule; mergekit samples 1M values of
    larger tensors with the global RNG, soupkit takes every value: exact and reproducible)."""
    flat = values.reshape(-1)
    return torch.kthvalue(flat, int(q * (flat.numel() - 1)) + 1).values


def importance(model: Tensor, base: Tensor) -> Tensor:
    """|model - base| * KL(softmax(model) || softmax(base)), the KL taken along the last dimension."""
    p = torch.softmax(model, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * divergence


@merge_method(
    "arcee_fusion",
    pretty_name="Arcee Fusion (the model's most important updates over the base)",
    reference="https://arcee.ai",  # mergekit cites no paper
    min_models=1,
    max_models=1,
    elementwise=False,
)
def arcee_fusion(tensors: Sequence[Tensor], *, base: Tensor) -> Tensor:
    """base + (theta - base) * [s >= median(s) + 1.5 (q3(s) - q1(s))], s = |theta - base| * KL(softmax(theta) ||
    softmax(base)) per row.

    Takes only the updates that are both large and in rows whose output distribution changed, leaving the rest
    of the base untouched; no parameters.
    """
    model = tensors[0]
    if model.numel() == 0:
        return base.clone()
    scores = importance(model, base)
    threshold = quantile_at(scores, 0.5) + FENCE * (quantile_at(scores, 0.75) - quantile_at(scores, 0.25))
    return base + (model - base) * (scores >= threshold)
