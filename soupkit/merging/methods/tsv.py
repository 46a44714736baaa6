"""TSV-M, Task Singular Vectors merging: keep each task matrix's top singular vectors, decorrelate the tasks'
subspaces by orthogonalising the stacked bases, and rebuild the sum (Gargiulo et al., CVPR 2025)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit._lazy import torch
from soupkit.merging.methods.task_arithmetic import SCALING
from soupkit.merging.registry import merge_method
from soupkit.merging.spectral import is_matrix, mean_task_vector, polar

if TYPE_CHECKING:
    from torch import Tensor


def tsv_update(deltas: Sequence[Tensor]) -> Tensor:
    """TSV-M's merged update of task matrices ``deltas`` (m x n each, T of them).

    Each Delta_i = U_i S_i V_i^T keeps its top k = rank // T singular triplets (at least 1: the paper's
    ``int(rank / T)`` keeps none when T > rank); the stacked U = [U_1k ... U_Tk] and V = [V_1k ... V_Tk] are replaced
    by their nearest orthonormal matrices U_perp, V_perp; the update is U_perp diag(S_1k ... S_Tk) V_perp^T.
    """
    rank = min(deltas[0].shape)
    k = max(1, rank // len(deltas))
    lefts, values, rights = [], [], []
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        lefts.append(u[:, :k])
        values.append(s[:k])
        rights.append(vh[:k])
    u_perp = polar(torch.cat(lefts, dim=1))
    vh_perp = polar(torch.cat(rights, dim=0))
    return (u_perp * torch.cat(values)) @ vh_perp


@merge_method(
    "tsv",
    pretty_name="TSV-M (Task Singular Vectors: low-rank, decorrelated task matrices)",
    reference="https://arxiv.org/abs/2412.00081",
    elementwise=False,
)
def tsv(tensors: Sequence[Tensor], *, base: Tensor, scaling: Annotated[float, SCALING] = 1.0) -> Tensor:
    """base + scaling * U_perp S V_perp^T per weight matrix: each task matrix cut to its top rank/T singular
    vectors, the tasks' stacked bases orthogonalised (TSV-M); other tensors: base + scaling * the mean task vector.

    Removes the interference between tasks that share singular directions while keeping what each task changed
    most. The paper merges with scaling 1. 2-D tensors follow the paper's rule (one SVD per model plus two for the
    orthogonalisation: the cost benchmarks/RESULTS.md reports); 1-D and other tensors average, as the paper does.
    """
    if not is_matrix(base):
        return base + mean_task_vector(tensors, base).mul_(scaling)
    return base + tsv_update([t - base for t in tensors]).mul_(scaling)
