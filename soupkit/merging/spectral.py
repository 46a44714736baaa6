"""SVD pieces shared by the subspace merge methods (``tsv``, ``iso_c``, ``iso_cts``): the papers' rule for which
tensors are matrices, their fallback for the rest, and the nearest orthonormal basis. Everything runs on the
tensors' own device (``--device cuda`` moves them there) in their dtype (float32, float64 with ``--precise``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from soupkit._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


def is_matrix(tensor: Tensor) -> bool:
    """The papers merge 2-D weights by their SVD; everything else (biases, norms, convolutions) by averaging."""
    return tensor.dim() == 2 and min(tensor.shape) > 0


def mean_task_vector(tensors: Sequence[Tensor], base: Tensor) -> Tensor:
    """``mean_i (theta_i - base)``: TSV-M's and Iso's treatment of tensors that are not matrices."""
    total = tensors[0] - base
    for tensor in tensors[1:]:
        total.add_(tensor).sub_(base)
    return total.div_(len(tensors))


def polar(matrix: Tensor) -> Tensor:
    """The orthonormal (semi-orthogonal) matrix nearest ``matrix`` in Frobenius norm (orthogonal Procrustes):
    ``P Q^T`` for the thin SVD ``matrix = P S Q^T``."""
    left, _, right = torch.linalg.svd(matrix, full_matrices=False)
    return left @ right
