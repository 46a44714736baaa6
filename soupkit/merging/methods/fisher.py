"""Fisher merging: a per-parameter weighted average, weighted by each model's diagonal Fisher information
(Matena & Raffel, NeurIPS 2022). ``soupkit fisher`` (``soupkit.merging.fisher_info``) computes the Fisher files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit._lazy import torch
from soupkit.merging.methods.linear import weighted_mean
from soupkit.merging.methods.ties import TASK_WEIGHTS, check_task_weights
from soupkit.merging.registry import Param, TensorFiles, merge_method

if TYPE_CHECKING:
    from torch import Tensor

#: Fisher values below this are raised to it (as in the WiSE-FT code), so entries no example's gradient
#: touched still get a (tiny, equal) weight instead of a 0/0
DEFAULT_FLOOR = 1e-8


@merge_method(
    "fisher",
    pretty_name="Fisher merging (Fisher-weighted average)",
    reference="https://arxiv.org/abs/2111.09832",
    min_models=2,
    check=check_task_weights,
)
def fisher(
    tensors: Sequence[Tensor],
    *,
    fishers: Annotated[Sequence[Tensor | None], TensorFiles("Fisher"),
                       Param("Fisher files, comma-separated, one per model (`soupkit fisher` writes them).")],
    weights: Annotated[float | list[float], TASK_WEIGHTS] = 1.0,
    floor: Annotated[float, Param("Fisher values below this are raised to it (keeps the average defined).",
                                  gt=0)] = DEFAULT_FLOOR,
) -> Tensor:
    """sum_i w_i F_i theta_i / sum_i w_i F_i per parameter, F_i = max(Fisher_i, floor); weights default to 1.

    Each model keeps most say over the parameters it is most certain about. fishers names one Fisher file per
    model (``soupkit fisher`` writes them); tensors a Fisher file lacks (buffers, frozen parameters) are the
    plain weighted mean.
    """
    weights = list(weights) if isinstance(weights, Sequence) else [float(weights)] * len(tensors)
    chunks = fishers
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
