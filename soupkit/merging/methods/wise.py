"""WiSE-FT: interpolate a zero-shot and a fine-tuned model (Wortsman et al., CVPR 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit._lazy import torch
from soupkit.merging.registry import Param, merge_method

if TYPE_CHECKING:
    from torch import Tensor


@merge_method(
    "wise",
    pretty_name="WiSE-FT (weight-space ensemble)",
    reference="https://arxiv.org/abs/2109.01903",
    min_models=2,
    max_models=2,
    linear=lambda params, n_models: [1.0 - params["alpha"], params["alpha"]],
)
def wise(tensors: Sequence[Tensor], *,
         alpha: Annotated[float, Param("WiSE-FT α, the fine-tuned model's weight: 0 gives the zero-shot model, 1 "
                                       "the fine-tuned one.")] = 0.5) -> Tensor:
    """(1 - alpha) * zeroshot + alpha * finetuned; the inputs are (zeroshot, finetuned).

    alpha=0 gives the zero-shot model and alpha=1 the fine-tuned one, both exactly; alpha outside [0, 1]
    extrapolates. alpha ~ 0.5 keeps fine-tuned accuracy and recovers most of the zero-shot robustness.
    """
    zeroshot, finetuned = tensors[0], tensors[1]
    if alpha == 0.0:
        return zeroshot.clone()
    if alpha == 1.0:
        return finetuned.clone()
    return torch.lerp(zeroshot, finetuned, alpha)  # one fused pass: z + alpha * (f - z)
