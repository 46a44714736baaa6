"""Isotropic merging: flatten the singular-value spectrum of the summed task matrices (``iso_c``, the common
subspace), optionally after swapping its weakest directions for each task's own (``iso_cts``, common and
task-specific subspaces) (Marczak et al., "No Task Left Behind", ICML 2025)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit._lazy import torch
from soupkit.merging.registry import Param, merge_method
from soupkit.merging.spectral import is_matrix, mean_task_vector, polar

if TYPE_CHECKING:
    from torch import Tensor

ISO_SCALING = Param("Scaling α of the merged update (0 gives the base model); the paper tunes it on held-out "
                    "data.")


def iso_c_update(deltas: Sequence[Tensor]) -> Tensor:
    """Iso-C: ``mean(S) U V^T`` for the SVD ``U S V^T`` of ``sum_i Delta_i`` (every direction of the task
    arithmetic sum gets the same, average, singular value)."""
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (u @ vh).mul_(s.mean())


def iso_cts_dimensions(rank: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions k, directions per task s) with k + T s = rank: s = round((rank - int(rank f)) / T),
    capped at rank // T, as in the paper's code."""
    per_task = min(rank // n_tasks, round((rank - int(rank * common_fraction)) / n_tasks))
    return rank - n_tasks * per_task, per_task


def iso_cts_update(deltas: Sequence[Tensor], common_fraction: float) -> Tensor:
    """Iso-CTS: the top k singular directions of ``sum_i Delta_i`` (the common subspace), plus each task's top s
    directions of ``Delta_i`` with the common subspace projected out; the stacked bases orthogonalised, every
    direction given the mean of the kept singular values."""
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    common, per_task = iso_cts_dimensions(s.numel(), len(deltas), common_fraction)
    lefts, values, rights = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task:
        basis = u[:, :common]
        for delta in deltas:
            own = delta - basis @ (basis.T @ delta)
            u_i, s_i, vh_i = torch.linalg.svd(own, full_matrices=False)
            lefts.append(u_i[:, :per_task])
            values.append(s_i[:per_task])
            rights.append(vh_i[:per_task])
    return (polar(torch.cat(lefts, dim=1)) @ polar(torch.cat(rights, dim=0))).mul_(torch.cat(values).mean())


@merge_method(
    "iso_c",
    pretty_name="Iso-C (isotropic merging in the common subspace)",
    reference="https://arxiv.org/abs/2502.04959",
    elementwise=False,
)
def iso_c(tensors: Sequence[Tensor], *, base: Tensor, scaling: Annotated[float, ISO_SCALING] = 1.0) -> Tensor:
    """base + scaling * mean(S) U V^T per weight matrix, U S V^T the SVD of the summed task matrices; other
    tensors: base + scaling * the mean task vector.

    Task arithmetic's sum is dominated by a few directions; giving all of them the same singular value lets the
    tasks that own the weaker ones be heard. 2-D tensors follow the paper (one SVD each); 1-D and other tensors
    average, as the paper does.
    """
    if not is_matrix(base):
        return base + mean_task_vector(tensors, base).mul_(scaling)
    return base + iso_c_update([t - base for t in tensors]).mul_(scaling)


@merge_method(
    "iso_cts",
    pretty_name="Iso-CTS (isotropic merging in common and task-specific subspaces)",
    reference="https://arxiv.org/abs/2502.04959",
    elementwise=False,
)
def iso_cts(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    scaling: Annotated[float, ISO_SCALING] = 1.0,
    common_space_fraction: Annotated[float, Param(
        "Fraction of each matrix's rank given to the common subspace of the summed task matrices; the rest is "
        "shared out equally among the tasks' own subspaces, in [0, 1] (1: iso_c).", ge=0, le=1)] = 0.8,
) -> Tensor:
    """base + scaling * mean(S) U_perp V_perp^T per weight matrix: the top directions of the summed task
    matrices plus each task's strongest directions outside them, orthogonalised, with one isotropic singular
    value; other tensors: base + scaling * the mean task vector.

    Iso-C loses tasks whose directions are weak in the sum; reserving part of the rank for each task's own
    subspace keeps them (the paper's default common_space_fraction is 0.8). 2-D tensors follow the paper (1 + T
    SVDs plus two for the orthogonalisation); 1-D and other tensors average, as the paper does.
    """
    if not is_matrix(base):
        return base + mean_task_vector(tensors, base).mul_(scaling)
    return base + iso_cts_update([t - base for t in tensors], common_space_fraction).mul_(scaling)
