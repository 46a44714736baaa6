"""SCE: select the task-vector entries the models disagree on most, weight each model by its task vector's
energy, erase sign conflicts, average (FuseChat-2.0's Select-Calculate-Erase; Wan et al., 2024). mergekit's
``sce`` with its defaults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit._lazy import torch
from soupkit.merging.registry import Param, merge_method
from soupkit.merging.sparsify import sign_consensus

if TYPE_CHECKING:
    from torch import Tensor

#: mergekit: below this, the models' energies count as all zero (then each weighs 1/N) ...
ENERGY_EPS = 1e-6
#: ... and the erased weights' sum is clamped to at least this
DIVISOR_EPS = 1e-6


def variance_mask(deltas: Tensor, fraction: float) -> Tensor:
    """SCE's selection: the ``int(fraction * nonzero)`` entries of largest variance across the models (population
    variance; ``nonzero`` counts entries of non-zero variance); among equal variances the lowest indices."""
    variance = torch.var(deltas, dim=0, unbiased=False).reshape(-1)
    k = int(int(torch.count_nonzero(variance)) * fraction)
    mask = torch.zeros(variance.numel(), dtype=torch.bool, device=deltas.device)
    if k:
        order = torch.sort(variance, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.view(deltas.shape[1:])


@merge_method(
    "sce",
    pretty_name="SCE (select high-variance entries, energy weights, erase sign conflicts)",
    reference="https://arxiv.org/abs/2408.07990",
    elementwise=False,
)
def sce(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    select_topk: Annotated[float, Param(
        "Fraction of entries kept, those of largest variance across the task vectors, in (0, 1] (1: all).",
        gt=0, le=1)] = 1.0,
) -> Tensor:
    """base + sum_i c_i m_i tau_i / sum_i c_i m_i per entry: tau_i = theta_i - base restricted to the top
    select_topk variance entries, c_i = mean(tau_i^2) / sum_j mean(tau_j^2), m_i keeps the entries that agree with
    the elected sign of sum_i tau_i.

    Needs no weights: each model's say is its task vector's energy, and only where the models differ most is
    merged. mergekit's default select_topk 1 keeps every entry.
    """
    deltas = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        deltas.mul_(variance_mask(deltas, select_topk))
    masks = torch.stack(sign_consensus(list(deltas)))
    energy = deltas.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    coefficients = energy / total if abs(total) >= ENERGY_EPS else torch.full_like(energy, 1.0 / len(tensors))
    erased = coefficients.view(-1, *([1] * base.dim())) * masks
    merged = (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=DIVISOR_EPS)
    return base + merged
