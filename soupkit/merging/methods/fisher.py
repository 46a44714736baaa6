"""Fisher merging: a per-parameter weighted average, weighted by each model's diagonal Fisher information
(Matena & Raffel, NeurIPS 2022). ``soupkit fisher`` (``soupkit.merging.fisher_info``) computes the Fisher files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from soupkit.errors import ParameterError
from soupkit.merging.engine import TensorFiles
from soupkit.merging.methods.linear import weighted_mean
from soupkit.merging.registry import merge_method

#: Fisher values below this are raised to it (as in the WiSE-FT code), so entries no example's gradient
#: touched still get a (tiny, equal) weight instead of a 0/0
DEFAULT_FLOOR = 1e-8


def _check_fisher(*, n_models: int, weights: list[float] | None, fishers: list[str], floor: float) -> None:
    if weights is not None and (any(w < 0 for w in weights) or not any(w > 0 for w in weights)):
        raise ParameterError(f"fisher: weights must be >= 0 with at least one > 0, got {weights}")
    if not floor > 0.0:
        raise ParameterError(f"fisher: floor must be > 0 (it keeps the weighted average defined), got {floor}")


@merge_method(
    "fisher",
    pretty_name="Fisher merging (Fisher-weighted average)",
    reference="https://arxiv.org/abs/2111.09832",
    min_models=2,
    check=_check_fisher,
)
def fisher(
    tensors: Sequence[Tensor],
    *,
    fishers: Annotated[list[str], TensorFiles("Fisher")],
    weights: list[float] | None = None,
    floor: float = DEFAULT_FLOOR,
) -> Tensor:
    """sum_i w_i F_i theta_i / sum_i w_i F_i per parameter, F_i = max(Fisher_i, floor); weights default to 1.

    Each model keeps most say over the parameters it is most certain about. fishers names one Fisher file per
    model (``soupkit fisher`` writes them); tensors a Fisher file lacks (buffers, frozen parameters) are the
    plain weighted mean.
    """
    weights = list(weights) if weights is not None else [1.0] * len(tensors)
    chunks: Sequence[Tensor | None] = fishers  # type: ignore[assignment]  # the engine passes tensor chunks
    if any(f is None for f in chunks):
        return weighted_mean(tensors, weights)
    # running mean m += (c_i / C_i) (theta_i - m) with per-entry weights c_i: one input at a time, and exactly
    # theta when every input is theta
    mean: Tensor | None = None
    total: Tensor | None = None
    for weight, tensor, info in zip(weights, tensors, chunks):
        assert info is not None
        coefficient = torch.clamp(info, min=floor).mul_(weight)
        if mean is None or total is None:
            mean, total = tensor.clone(), coefficient
        elif weight:
            total.add_(coefficient)
            mean.addcmul_(coefficient.div_(total), tensor - mean)
    assert mean is not None
    return mean
