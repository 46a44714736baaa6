"""Sparsification and sign consensus over task vectors, composed into generalised task arithmetic: the one home
of the pieces mergekit combines into ``breadcrumbs``, ``breadcrumbs_ties``, ``della`` and ``della_linear``
(consensus x sparsification, ``mergekit/merge_methods/generalized_task_arithmetic.py``).

Conventions follow mergekit's, so a mergekit config gives mergekit's numbers: ``rescale`` matches the kept
entries' L1 norm to the task vector's; the sign consensus elects + where the weighted sum is 0; divisors that are
0 (~0 without consensus) divide by 1. Two deliberate differences: random masks come from the counter-based hash
DARE uses (one seed, one output on any device; mergekit draws from the global RNG), and ties in magnitude sort
stably (lowest index first; mergekit's ``sort`` order is unspecified).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from soupkit._lazy import torch
from soupkit.merging.methods.dare import SEED, stream_key, uniforms

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["SEED", "della_magprune", "generalized_task_arithmetic", "magnitude_outliers", "one_per_model",
           "rescale_l1", "sign_consensus"]

#: mergekit skips the L1 rescale when either norm is below this (a zero task vector stays zero)
RESCALE_EPS = 1e-7
#: without consensus, mergekit treats a weight sum below this as 0 and divides by 1
WEIGHT_SUM_EPS = 1e-8

Sparsifier = Callable[["Tensor", int], "Tensor"]


def one_per_model(value: float | Sequence[float], n_models: int) -> list[float]:
    """A ``float | list[float]`` parameter as one value per model."""
    if isinstance(value, (int, float)):
        return [float(value)] * n_models
    return [float(v) for v in value]


def rescale_l1(delta: Tensor, kept: Tensor) -> Tensor:
    """``kept`` (a masked ``delta``) scaled so that its L1 norm is ``delta``'s, as mergekit's ``rescale: true``
    does; unchanged when either norm is below ``RESCALE_EPS``."""
    before = float(delta.abs().sum(dtype=torch.float64))
    after = float(kept.abs().sum(dtype=torch.float64))
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept.mul_(before / after)


def magnitude_outliers(delta: Tensor, density: float, gamma: float, *, rescale: bool = False) -> Tensor:
    """Model Breadcrumbs' mask: drop the ``int(gamma * n)`` largest magnitudes (outliers) and the smallest, keeping
    ``int(density * n)`` entries; fewer outliers go when both do not fit. density >= 1 keeps everything (as in
    mergekit, gamma then removes nothing)."""
    if density >= 1:
        return delta
    numel = delta.numel()
    keep = int(density * numel)
    top = numel - keep - max(0, numel - keep - int(gamma * numel))  # outliers that fit beside the kept entries
    magnitude = delta.reshape(-1).abs()
    # the kept entries are positions [bottom, bottom + keep) of a stable ascending sort; two selections of the
    # cut values find them without sorting (3x faster than torch.sort on a 1M-entry task vector, same set)
    dropped = smallest(magnitude, numel - keep - top) | largest(magnitude, top)
    kept = torch.where(dropped.view_as(delta), 0.0, delta)
    return rescale_l1(delta, kept) if rescale else kept


def smallest(values: Tensor, count: int) -> Tensor:
    """Mask of the ``count`` smallest of flat ``values``, equal values taken lowest index first (the first
    ``count`` positions of a stable ascending sort)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count <= 0:
        return mask
    cut = torch.kthvalue(values, count).values
    mask = values < cut
    at_cut = torch.nonzero(values == cut).reshape(-1)[:count - int(mask.sum())]
    mask[at_cut] = True
    return mask


def largest(values: Tensor, count: int) -> Tensor:
    """Mask of the ``count`` largest of flat ``values``, equal values taken highest index first (the last
    ``count`` positions of a stable ascending sort)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count <= 0:
        return mask
    cut = torch.kthvalue(values, values.numel() - count + 1).values
    mask = values > cut
    need = count - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(values == cut).reshape(-1)[-need:]] = True
    return mask


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities: ``density - epsilon`` for the smallest magnitude of each row up to
    ``density + epsilon`` for the largest, linear in the magnitude's rank (rows along dim 1, as mergekit ranks
    them; a 1-D tensor is one row). A one-column row gets ``density``. float64."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    # each entry's rank: the inverse permutation of the sort, by one scatter (half the cost of a second argsort)
    positions = torch.arange(width, device=delta.device).view(1, width, *[1] * (rows.dim() - 2))
    ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
    ranks = ranks.to(torch.float64)
    position = ranks / (width - 1) if width > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + position * (2.0 * epsilon)).reshape(delta.shape)


def della_magprune(delta: Tensor, density: float, epsilon: float, *, rescale: bool, seed: int, key: str,
                   index: int) -> Tensor:
    """DELLA's MagPrune: keep each entry with its rank's probability (``della_probabilities``), drawn from the
    seeded hash of (seed, tensor, model, element); mergekit rescales the survivors to the task vector's L1 norm
    (``rescale``; the paper divides each by its keep probability: equal in expectation)."""
    if density >= 1:
        return delta
    probabilities = della_probabilities(delta, density, epsilon)
    draws = uniforms(stream_key(seed, key, index), 0, delta.numel(), delta.device).view_as(delta)
    kept = torch.where(draws < probabilities, delta, 0.0)
    return rescale_l1(delta, kept) if rescale else kept


def sign_consensus(weighted: Sequence[Tensor]) -> list[Tensor]:
    """TIES' sign election over weighted task vectors (mergekit's ``sum`` consensus): the elected sign is that of
    their sum, + where it is 0; each model's mask keeps its entries of that sign (zeros agree with nothing)."""
    votes = torch.stack(list(weighted)).sum(dim=0) if len(weighted) > 1 else weighted[0]
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return [torch.sign(w) == elected for w in weighted]


def generalized_task_arithmetic(tensors: Sequence[Tensor], base: Tensor, *, weights: Sequence[float],
                                sparsify: Sparsifier | None, consensus: bool, normalize: bool,
                                scaling: float) -> Tensor:
    """``base + scaling * mix(w_i * sparsify(theta_i - base))``, mergekit's generalised task arithmetic.

    ``mix`` is the plain sum (divided by ``sum_i w_i`` with ``normalize``, by 1 where that is ~0) or, with
    ``consensus``, the sum of the entries agreeing with the elected sign (divided by the agreeing models' summed
    weights with ``normalize``, by 1 where none agrees). ``sparsify(delta, model_index)`` may be None.
    """
    weighted = []
    for index, (weight, tensor) in enumerate(zip(weights, tensors)):
        delta = tensor - base
        if sparsify is not None:
            delta = sparsify(delta, index)
        weighted.append(delta.mul_(weight))  # delta is always a new tensor: theta_i - base
    if consensus:
        masks = sign_consensus(weighted)
        mixed = sum(torch.where(m, w, 0.0) for m, w in zip(masks, weighted))
        if normalize:
            divisor = sum(m * weight for m, weight in zip(masks, weights))
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = weighted[0].clone() if len(weighted) == 1 else torch.stack(weighted).sum(dim=0)
        total = sum(weights)
        if normalize and abs(total) >= WEIGHT_SUM_EPS:
            mixed = mixed / total
    assert isinstance(mixed, torch.Tensor)
    return base + mixed * scaling if scaling != 1.0 else base + mixed
