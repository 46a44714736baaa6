"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023).

The helpers (``check_density``, ``trim``, ``disjoint_merge``) are shared with DARE-TIES.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from soupkit._lazy import torch
from soupkit.errors import ParameterError
from soupkit.merging.methods.task_arithmetic import SCALING
from soupkit.merging.registry import Param, merge_method

if TYPE_CHECKING:
    from torch import Tensor

#: the paper keeps the top 20% of each task vector (k = 20)
DEFAULT_DENSITY = 0.2


def per_model(value: float | Sequence[float] | None, default: float, n_models: int) -> list[float]:
    """A per-model parameter's values: the given list, one value for every model, or ``default`` for every model
    (the engine always passes a list; direct calls of a method function may pass one number)."""
    if value is None:
        value = default
    return list(value) if isinstance(value, Sequence) else [float(value)] * n_models


DENSITY = Param("Fraction of each task vector kept (top magnitudes), in (0, 1]; one per model or one for all.",
                gt=0, le=1)
#: TIES-style weights: the sign election needs them non-negative
TASK_WEIGHTS = Param("Per-model weights, comma-separated, >= 0 with at least one > 0.", ge=0)
#: whose arithmetic TIES-family methods follow (a mergekit config sets "mergekit"; docs/methods.md compares them)
Convention = Literal["soupkit", "mergekit"]
CONVENTIONS: tuple[str, ...] = typing.get_args(Convention)
CONVENTION = Param("Whose conventions: 'soupkit' (k = round(density*n) entries kept; where the weighted "
                   "sign sum is 0 no sign is elected and the entry stays 0) or 'mergekit' (k = max(1, "
                   "int(density*n)); a zero sum elects +), which mergekit configs use to reproduce mergekit.")
RESCALE = Param("Scale each trimmed task vector back to its L1 norm before trimming (mergekit's rescale: true).")
#: below this L1 norm (before or after the trim) a task vector is left unscaled, as mergekit does
RESCALE_EPS = 1e-7
DISJOINT_NORMALIZE = Param("Divide by the summed weights of the models agreeing with the elected sign (false: "
                           "their weighted sum, mergekit's normalize: false).")


def check_task_weights(params: Any) -> None:
    """Sign election: weights must not all be zero; a convention, where the method has one, must be known."""
    if not any(w > 0 for w in params.weights):
        raise ParameterError(f"weights must have at least one value > 0 (sign election needs them), got "
                             f"{', '.join(map(str, params.weights))}")


def kept_count(density: float, numel: int, convention: str = "soupkit") -> int:
    """How many entries a trim to ``density`` keeps: ``round(density * numel)``, or mergekit's
    ``max(1, int(density * numel))`` (all of them at density 1 either way)."""
    if convention == "mergekit":
        return numel if density >= 1 else max(1, int(density * numel))
    return round(density * numel)


def trim(delta: Tensor, density: float, convention: str = "soupkit") -> Tensor:
    """Keep the ``k = kept_count(density, numel)`` largest-magnitude entries of ``delta``; zero the rest. Among
    equal magnitudes at the cut, the lowest indices are kept (a stable sort's choice), so the result is unique."""
    numel = delta.numel()
    k = kept_count(density, numel, convention)
    if k >= numel:
        return delta
    flat = delta.reshape(-1)
    if k == 0:
        return torch.zeros_like(delta)
    magnitude = flat.abs()
    cut = kth_largest(magnitude, k)
    above = magnitude > cut
    kept = torch.where(above, flat, 0.0)
    ties_needed = k - int(above.sum())
    if ties_needed > 0:
        at_cut = torch.nonzero(magnitude == cut).reshape(-1)[:ties_needed]
        kept[at_cut] = flat[at_cut]
    return kept.view_as(delta)


def rescale_l1(kept: Tensor, delta: Tensor) -> Tensor:
    """``kept`` (a sparsified ``delta``) scaled so that its L1 norm is ``delta``'s: mergekit's ``rescale: true``
    (``RESCALE_EPS`` guards an all-zero tensor)."""
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def kth_largest(values: Tensor, k: int, *, sample: int = 1 << 16) -> Tensor:
    """The k-th largest of a flat tensor, exactly. Large tensors first bracket it with a fixed-seed sample, then
    select within the bracket (a few percent of the values): several times faster than ``topk`` or
    ``kthvalue`` over everything, with the same answer (falls back to ``kthvalue`` if the bracket misses)."""
    n = values.numel()
    if n < 16 * sample:
        return torch.kthvalue(values, n - k + 1).values
    generator = torch.Generator(device=values.device).manual_seed(0)
    probe = values[torch.randint(n, (sample,), generator=generator, device=values.device)].sort().values
    quantile = 1.0 - k / n
    margin = 6.0 / sample ** 0.5  # ~ 6 standard deviations of a sample quantile's position
    low = probe[max(0, int((quantile - margin) * sample))]
    high = probe[min(sample - 1, int((quantile + margin) * sample))]
    larger = int((values > high).sum())
    band = values[(values >= low) & (values <= high)]
    rank = k - larger  # the answer is the rank-th largest inside the band
    if not 1 <= rank <= band.numel():  # the answer lies outside [low, high]
        return torch.kthvalue(values, n - k + 1).values
    return torch.kthvalue(band, band.numel() - rank + 1).values


def disjoint_merge(deltas: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True,
                   convention: str = "soupkit") -> Tensor:
    """Elect each entry's sign as that of ``sum_i w_i delta_i`` (weights applied before the election), then
    average (weighted by ``w_i``) only the non-zero entries that agree with it; ``normalize=False``: their
    weighted sum. Entries where nothing agrees are 0. A zero sum elects no sign (``convention="soupkit"``) or
    + (``"mergekit"``)."""
    votes = sum(d * w for d, w in zip(deltas, weights))
    elected = torch.where(votes >= 0, 1.0, -1.0) if convention == "mergekit" else torch.sign(votes)
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        agree = (torch.sign(delta) == elected) & (delta != 0)
        total += torch.where(agree, delta * weight, 0.0)
        count += agree * weight
    if not normalize:
        return total
    return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), 0.0)


@merge_method(
    "ties",
    pretty_name="TIES-merging (trim, elect sign, merge)",
    reference="https://arxiv.org/abs/2306.01708",
    elementwise=False,
    check=check_task_weights,
)
def ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weights: Annotated[float | list[float], TASK_WEIGHTS] = 1.0,
    density: Annotated[float | list[float], DENSITY] = DEFAULT_DENSITY,
    scaling: Annotated[float, SCALING] = 1.0,
    normalize: Annotated[bool, DISJOINT_NORMALIZE] = True,
    convention: Annotated[Convention, CONVENTION] = "soupkit",
    rescale: Annotated[bool, RESCALE] = False,
) -> Tensor:
    """base + scaling * disjoint mean of the task vectors, each trimmed to its top-density magnitudes.

    Resolves interference between task vectors: small updates are dropped and, per parameter, only the
    models agreeing with the majority sign are averaged. density defaults to 0.2 (the paper's top 20%),
    weights to 1 each.
    """
    n = len(tensors)
    densities = per_model(density, DEFAULT_DENSITY, n)
    deltas = [tensor - base for tensor in tensors]
    deltas = [rescale_l1(trim(delta, d, convention), delta) if rescale else trim(delta, d, convention)
              for delta, d in zip(deltas, densities)]
    merged = disjoint_merge(deltas, per_model(weights, 1.0, n), normalize=normalize, convention=convention)
    return base + merged.mul_(scaling)
