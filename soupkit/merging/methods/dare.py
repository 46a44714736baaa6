"""DARE: drop a random fraction p of each task vector's entries and rescale the rest by 1 / (1 - p), then
merge linearly (``dare_linear``) or with TIES (``dare_ties``) (Yu et al., ICML 2024).

The drop mask is a pure function of ``(seed, tensor name, model index, flat element index)``: each element's
uniform number is a counter-based hash (the splitmix64 finaliser) of its index, keyed by a blake2b digest of
``(seed, name, model index)``. So the same seed gives the same output bit for bit whatever the chunk size,
tensor order, device or torch version.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from soupkit._lazy import torch
from soupkit.errors import ParameterError
from soupkit.merging.methods.linear import NORMALIZE, WEIGHTS, linear_combination
from soupkit.merging.methods.task_arithmetic import SCALING
from soupkit.merging.methods.ties import (
    CONVENTION,
    DENSITY,
    DISJOINT_NORMALIZE,
    TASK_WEIGHTS,
    Convention,
    check_task_weights,
    disjoint_merge,
    per_model,
    trim,
)
from soupkit.merging.registry import Param, merge_method

if TYPE_CHECKING:
    from torch import Tensor

#: the paper's typical drop rate (it reports that 90% of delta entries can go without loss)
DEFAULT_DROP_RATE = 0.9

_MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def stream_key(seed: int, key: str, index: int) -> int:
    """The 64-bit stream of model ``index``'s mask for tensor ``key`` (stable across runs and platforms)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{index}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return _int64(int.from_bytes(digest, "little"))


def random_bits(stream: int, start: int, stop: int, device: torch.device | str = "cpu") -> Tensor:
    """53 random bits (int64 in [0, 2**53)) for each flat element of ``[start, stop)``: the splitmix64 output
    function of ``stream + index * gamma``. In place on two buffers (each op is memory-bound)."""
    z = torch.arange(start, stop, dtype=torch.int64, device=device).mul_(_GAMMA).add_(stream)  # wraps mod 2**64
    scratch = torch.empty_like(z)
    for shift, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        # z ^= z >>> shift (a logical shift: torch shifts int64 arithmetically, so mask the sign copies off)
        torch.bitwise_right_shift(z, shift, out=scratch).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(scratch)
        if multiplier is not None:
            z.mul_(multiplier)
    return z.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1)


def uniforms(stream: int, start: int, stop: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform float64 numbers in [0, 1) for flat elements ``[start, stop)`` of one stream."""
    return random_bits(stream, start, stop, device).to(torch.float64).mul_(2.0**-53)


def drop_and_rescale(delta: Tensor, drop_rate: float, *, seed: int, key: str, index: int, offset: int) -> Tensor:
    """Zero each entry of the flat range ``[offset, offset + numel)`` of ``delta`` with probability
    ``drop_rate`` and scale the survivors by ``1 / (1 - drop_rate)``."""
    if drop_rate == 0.0:
        return delta
    # keep where uniform >= p, compared exactly in integers: bits * 2**-53 >= p  <=>  bits >= ceil(p * 2**53)
    threshold = math.ceil(drop_rate * 2.0**53)
    keep = random_bits(stream_key(seed, key, index), offset, offset + delta.numel(), delta.device) >= threshold
    return torch.where(keep.view_as(delta), delta / (1.0 - drop_rate), 0.0)


DROP_RATE = Param("DARE drop probability p of each task-vector entry, in [0, 1); one per model or one for all.",
                  ge=0, lt=1)
SEED = Param("Seed of the random drop masks (the same seed gives the same output on any device).", ge=0,
             lt=2**63)


def _check_dare_linear(params: Any) -> None:
    if params.normalize and abs(sum(params.weights)) < 1e-12:
        raise ParameterError("dare_linear: weights sum to 0 and cannot be normalised; pass normalize=false")


@merge_method(
    "dare_linear",
    pretty_name="DARE + linear (drop and rescale task vectors, then average)",
    reference="https://arxiv.org/abs/2311.03099",
    check=_check_dare_linear,
    # without drops (drop_rate 0 for every model) it is task arithmetic with normalised weights
    linear=lambda params, n_models: (linear_combination(params["weights"], params["normalize"], params["scaling"])
                                     if not any(params["drop_rate"]) else None),
)
def dare_linear(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    key: str,
    offset: int,
    weights: Annotated[float | list[float], WEIGHTS] = 1.0,
    normalize: Annotated[bool, NORMALIZE] = True,
    drop_rate: Annotated[float | list[float], DROP_RATE] = DEFAULT_DROP_RATE,
    scaling: Annotated[float, SCALING] = 1.0,
    seed: Annotated[int, SEED] = 0,
) -> Tensor:
    """base + scaling * sum_i w_i DARE(theta_i - base), weights 1/N by default (normalised like linear).

    Sparsifies each task vector at random before averaging, which reduces interference when merging
    several fine-tuned models; drop_rate=0 is the linear merge with the same weights. Seeded by seed.
    """
    n = len(tensors)
    weights = per_model(weights, 1.0, n)
    if normalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    merged: Tensor | None = None
    drop_rates = per_model(drop_rate, DEFAULT_DROP_RATE, n)
    for index, (weight, tensor) in enumerate(zip(weights, tensors)):
        delta = drop_and_rescale(tensor - base, drop_rates[index], seed=seed, key=key, index=index, offset=offset)
        if merged is None:
            merged = delta * weight
        elif weight:
            merged.add_(delta, alpha=weight)
    assert merged is not None
    return base + merged.mul_(scaling)


@merge_method(
    "dare_ties",
    pretty_name="DARE + TIES (drop and rescale task vectors, then TIES)",
    reference="https://arxiv.org/abs/2311.03099",
    elementwise=False,
    check=check_task_weights,
)
def dare_ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    key: str,
    weights: Annotated[float | list[float], TASK_WEIGHTS] = 1.0,
    density: Annotated[float | list[float], DENSITY] = 1.0,
    drop_rate: Annotated[float | list[float], DROP_RATE] = DEFAULT_DROP_RATE,
    scaling: Annotated[float, SCALING] = 1.0,
    seed: Annotated[int, SEED] = 0,
    normalize: Annotated[bool, DISJOINT_NORMALIZE] = True,
    convention: Annotated[Convention, CONVENTION] = "soupkit",
) -> Tensor:
    """base + scaling * TIES(DARE(theta_i - base)): random drop-and-rescale, then trim, sign election and
    disjoint mean (the agreeing entries' weighted sum with normalize=false).

    density (TIES trim after the drop) defaults to 1, i.e. only DARE sparsifies; drop_rate=0 is TIES.
    """
    n = len(tensors)
    drop_rates = per_model(drop_rate, DEFAULT_DROP_RATE, n)
    deltas = [
        trim(drop_and_rescale(tensor - base, p, seed=seed, key=key, index=i, offset=0), d, convention)
        for i, (tensor, p, d) in enumerate(zip(tensors, drop_rates, per_model(density, 1.0, n)))
    ]
    merged = disjoint_merge(deltas, per_model(weights, 1.0, n), normalize=normalize, convention=convention)
    return base + merged.mul_(scaling)
