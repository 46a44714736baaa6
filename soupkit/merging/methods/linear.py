"""Weighted averages: ``linear`` (any weights) and ``uniform`` (the uniform model soup)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

from soupkit._lazy import torch
from soupkit.errors import ParameterError
from soupkit.merging.registry import Param, merge_method

if TYPE_CHECKING:
    from torch import Tensor


def mean_step(mean: Tensor, tensor: Tensor, weight: float, total: float, *, out: Tensor | None = None) -> Tensor:
    """One step of the running weighted mean: ``lerp(mean, tensor, weight / total)``, where ``mean`` is the mean
    of the inputs so far and ``total`` their weight including ``tensor``'s. ``out`` receives it (it may be
    ``mean``: in place). The single home of this arithmetic: ``weighted_mean`` and the greedy soup's incremental
    candidates both call it, so a greedy soup equals ``linear`` of its members bit for bit."""
    if out is None:
        return torch.lerp(mean, tensor, weight / total)
    return torch.lerp(mean, tensor, weight / total, out=out)


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Running weighted mean ``m = lerp(m, x_i, w_i / W_i)``: reads each input once, holds one at a time, makes
    one fused pass per input, and returns exactly ``x`` when every input equals ``x`` (a plain sum-then-divide
    does not, in fp32). Zero-weight inputs are skipped."""
    mean: Tensor | None = None
    first: Tensor | None = None
    total = 0.0
    for weight, tensor in zip(weights, tensors):
        total += weight
        if mean is None and first is None:
            first = tensor  # not copied: the first lerp writes a new tensor
        elif weight:
            if mean is None:
                assert first is not None
                mean, first = mean_step(first, tensor, weight, total), None
            else:
                mean_step(mean, tensor, weight, total, out=mean)
    if mean is None:  # one input (or only zero weights after the first)
        assert first is not None
        mean = first.clone()
    return mean


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i x_i``, one input in memory at a time."""
    result: Tensor | None = None
    for weight, tensor in zip(weights, tensors):
        if result is None:
            result = tensor * weight
        else:
            result.add_(tensor, alpha=weight)
    assert result is not None
    return result


#: help texts shared by every method that takes these parameters
WEIGHTS = Param("Per-model weights, comma-separated (one number applies to every model).")
NORMALIZE = Param("Divide by the sum of the weights (false: a plain weighted sum).")


def _check_linear(params: Any) -> None:
    if params.normalize and abs(sum(params.weights)) < 1e-12:
        raise ParameterError("linear: weights sum to 0 and cannot be normalised; pass normalize=false")


def linear_combination(weights: Sequence[float], normalize: bool, scaling: float = 1.0) -> list[float]:
    """The coefficients of a weighted sum: ``scaling * w_i`` (``/ sum_i w_i`` with ``normalize``)."""
    total = sum(weights) if normalize else 1.0
    return [scaling * w / total for w in weights]


def _linear_weights(params: Mapping[str, Any], n_models: int) -> list[float]:
    return linear_combination(params["weights"], params["normalize"])


@merge_method(
    "linear",
    pretty_name="Linear (weighted average)",
    reference="https://arxiv.org/abs/2203.05482",
    check=_check_linear,
    linear=_linear_weights,
)
def linear(tensors: Sequence[Tensor], *, weights: Annotated[float | list[float], WEIGHTS] = 1.0,
           normalize: Annotated[bool, NORMALIZE] = True) -> Tensor:
    """Weighted average of the models: sum_i w_i theta_i / sum_i w_i (plain weighted sum with normalize=false).

    The general form of a model soup; equal weights give the uniform soup.
    """
    n = len(tensors)
    weights = list(weights) if isinstance(weights, Sequence) else [float(weights)] * n
    if not normalize:
        return weighted_sum(tensors, weights)
    if all(w >= 0 for w in weights):
        return weighted_mean(tensors, weights)
    total = sum(weights)  # mixed signs: a running mean's partial sums could hit zero
    return weighted_sum(tensors, [w / total for w in weights])


@merge_method("uniform", pretty_name="Uniform soup (plain mean)", reference="https://arxiv.org/abs/2203.05482",
              propagates_nonfinite=True, linear=lambda params, n_models: [1.0 / n_models] * n_models)
def uniform(tensors: Sequence[Tensor]) -> Tensor:
    """The uniform soup: the plain mean of models fine-tuned from the same start (Wortsman et al., 2022)."""
    return weighted_mean(tensors, [1.0] * len(tensors))
