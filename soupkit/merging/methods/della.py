"""DELLA: MagPrune drops each task-vector entry at random with a probability that falls with its magnitude's
rank, then the rest are merged with TIES' sign consensus (``della``) or summed (``della_linear``) (Deep et al.,
2024). mergekit's generalised task arithmetic with ``della_magprune`` sparsification, with its defaults; the masks
come from the seeded hash DARE uses, so one seed gives one output on any device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from soupkit.errors import ParameterError
from soupkit.merging.methods.breadcrumbs import RESCALE
from soupkit.merging.methods.linear import NORMALIZE, WEIGHTS
from soupkit.merging.methods.task_arithmetic import SCALING
from soupkit.merging.methods.ties import DENSITY, DISJOINT_NORMALIZE
from soupkit.merging.registry import Param, merge_method
from soupkit.merging.sparsify import SEED, della_magprune, generalized_task_arithmetic, one_per_model

if TYPE_CHECKING:
    from torch import Tensor

EPSILON = Param("Spread of DELLA's keep probabilities: density - epsilon for a row's smallest magnitude up to "
                "density + epsilon for its largest; one per model or one for all.", ge=0, lt=0.5)


def check_della(params: Any) -> None:
    """Where an entry may be dropped (density < 1), density +/- epsilon must lie in (0, 1), as mergekit asks."""
    n = params.n_models
    for i, (d, e) in enumerate(zip(one_per_model(params.density, n), one_per_model(params.epsilon, n))):
        if d < 1 and not (d - e > 0 and d + e < 1):
            raise ParameterError(f"density[{i}] +/- epsilon[{i}] must lie in (0, 1), got density {d:g}, "
                                 f"epsilon {e:g}; lower --epsilon below {min(d, 1 - d):g}")


def _della(tensors: Sequence[Tensor], base: Tensor, key: str, *, weights: float | list[float],
           density: float | list[float], epsilon: float | list[float], scaling: float, normalize: bool,
           rescale: bool, seed: int, consensus: bool) -> Tensor:
    n = len(tensors)
    densities, epsilons = one_per_model(density, n), one_per_model(epsilon, n)
    return generalized_task_arithmetic(
        tensors, base, weights=one_per_model(weights, n), consensus=consensus, normalize=normalize,
        scaling=scaling,
        sparsify=lambda delta, i: della_magprune(delta, densities[i], epsilons[i], rescale=rescale, seed=seed,
                                                 key=key, index=i))


@merge_method(
    "della",
    pretty_name="DELLA (magnitude-ranked random drop, then TIES)",
    reference="https://arxiv.org/abs/2406.11617",
    elementwise=False,
    check=check_della,
)
def della(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    key: str,
    weights: Annotated[float | list[float], WEIGHTS] = 1.0,
    density: Annotated[float | list[float], DENSITY] = 1.0,
    epsilon: Annotated[float | list[float], EPSILON] = 0.15,
    scaling: Annotated[float, SCALING] = 1.0,
    normalize: Annotated[bool, DISJOINT_NORMALIZE] = True,
    rescale: Annotated[bool, RESCALE] = True,
    seed: Annotated[int, SEED] = 0,
) -> Tensor:
    """base + scaling * disjoint mean of w_i MagPrune(theta_i - base): entries kept with probability density
    -/+ epsilon by magnitude rank, rescaled to the task vector's L1 norm, then TIES' sign election.

    Drops small updates more often than large ones (DARE drops uniformly), which keeps more of each task. mergekit's
    defaults: density 1 (nothing dropped), epsilon 0.15, normalize and rescale on. Seeded by seed.
    """
    return _della(tensors, base, key, weights=weights, density=density, epsilon=epsilon, scaling=scaling,
                  normalize=normalize, rescale=rescale, seed=seed, consensus=True)


@merge_method(
    "della_linear",
    pretty_name="DELLA + linear (magnitude-ranked random drop, then add)",
    reference="https://arxiv.org/abs/2406.11617",
    elementwise=False,
    check=check_della,
)
def della_linear(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    key: str,
    weights: Annotated[float | list[float], WEIGHTS] = 1.0,
    density: Annotated[float | list[float], DENSITY] = 1.0,
    epsilon: Annotated[float | list[float], EPSILON] = 0.15,
    scaling: Annotated[float, SCALING] = 1.0,
    normalize: Annotated[bool, NORMALIZE] = False,
    rescale: Annotated[bool, RESCALE] = True,
    seed: Annotated[int, SEED] = 0,
) -> Tensor:
    """base + scaling * sum_i w_i MagPrune(theta_i - base) (normalize=true: divided by sum_i w_i).

    DELLA's magnitude-ranked drop without the sign election; mergekit's defaults (density 1, epsilon 0.15,
    rescale on, normalize off). Seeded by seed.
    """
    return _della(tensors, base, key, weights=weights, density=density, epsilon=epsilon, scaling=scaling,
                  normalize=normalize, rescale=rescale, seed=seed, consensus=False)
