"""Task arithmetic: add scaled task vectors (fine-tuned minus base) to the base model (Ilharco et al., ICLR 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit.merging.methods.linear import NORMALIZE, WEIGHTS, linear_combination
from soupkit.merging.registry import Param, merge_method

SCALING = Param("Task-vector scaling λ (0 gives the base model).")

if TYPE_CHECKING:
    from torch import Tensor


@merge_method(
    "task_arithmetic",
    pretty_name="Task arithmetic (sum of task vectors)",
    reference="https://arxiv.org/abs/2212.04089",
    # over a zero base (LoRA updates are task vectors): scaling * sum_i w_i x_i
    linear=lambda params, n_models: linear_combination(params["weights"], params["normalize"], params["scaling"]),
)
def task_arithmetic(
    tensors: Sequence[Tensor], *, base: Tensor, weights: Annotated[float | list[float], WEIGHTS] = 1.0,
    scaling: Annotated[float, SCALING] = 1.0, normalize: Annotated[bool, NORMALIZE] = False
) -> Tensor:
    """base + scaling * sum_i w_i (theta_i - base); weights default to 1 each and are not normalised
    (normalize=true divides the sum by sum_i w_i, as mergekit's task_arithmetic with normalize: true).

    Adds what each fine-tuning taught to one model. scaling ~0.3-0.5 is typical for several task vectors
    (the paper tunes it on held-out data); scaling=0 gives the base model exactly.
    """
    weights = list(weights) if isinstance(weights, Sequence) else [float(weights)] * len(tensors)
    if scaling == 0.0:
        return base.clone()
    total: Tensor | None = None
    for weight, tensor in zip(weights, tensors):
        if total is None:
            total = (tensor - base).mul_(weight)
        elif weight:
            total.add_(tensor - base, alpha=weight)
    assert total is not None
    divisor = sum(weights) if normalize else 1.0  # a ~zero sum divides by 1, as mergekit does
    return base + total.mul_(scaling / (divisor if abs(divisor) >= 1e-8 else 1.0))
