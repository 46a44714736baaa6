"""Model Breadcrumbs: drop each task vector's largest (outlier) and smallest magnitudes, then add the rest to the
base (``breadcrumbs``) or merge them with TIES' sign consensus (``breadcrumbs_ties``) (Davari & Belilovsky, ECCV
2024). mergekit's generalised task arithmetic with ``magnitude_outliers`` sparsification, with its defaults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from soupkit.merging.methods.linear import NORMALIZE, WEIGHTS
from soupkit.merging.methods.task_arithmetic import SCALING
from soupkit.merging.methods.ties import DENSITY, DISJOINT_NORMALIZE
from soupkit.merging.registry import Param, merge_method
from soupkit.merging.sparsify import generalized_task_arithmetic, magnitude_outliers, one_per_model

if TYPE_CHECKING:
    from torch import Tensor

GAMMA = Param("Fraction of each task vector's largest magnitudes dropped as outliers, in [0, 1]; one per model "
              "or one for all (the paper's 0.01).", ge=0, le=1)
RESCALE = Param("Scale the kept entries so that each task vector keeps its L1 norm (mergekit's rescale).")


def _breadcrumbs(tensors: Sequence[Tensor], base: Tensor, *, weights: float | list[float],
                 density: float | list[float], gamma: float | list[float], scaling: float, normalize: bool,
                 rescale: bool, consensus: bool) -> Tensor:
    n = len(tensors)
    densities, gammas = one_per_model(density, n), one_per_model(gamma, n)
    return generalized_task_arithmetic(
        tensors, base, weights=one_per_model(weights, n), consensus=consensus, normalize=normalize,
        scaling=scaling,
        sparsify=lambda delta, i: magnitude_outliers(delta, densities[i], gammas[i], rescale=rescale))


@merge_method(
    "breadcrumbs",
    pretty_name="Model Breadcrumbs (drop outliers and small entries, then add)",
    reference="https://arxiv.org/abs/2312.06795",
    elementwise=False,
)
def breadcrumbs(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weights: Annotated[float | list[float], WEIGHTS] = 1.0,
    density: Annotated[float | list[float], DENSITY] = 1.0,
    gamma: Annotated[float | list[float], GAMMA] = 0.01,
    scaling: Annotated[float, SCALING] = 1.0,
    normalize: Annotated[bool, NORMALIZE] = False,
    rescale: Annotated[bool, RESCALE] = False,
) -> Tensor:
    """base + scaling * sum_i w_i mask_i(theta_i - base), the mask dropping the int(gamma n) largest and the
    smallest magnitudes so that int(density n) entries stay.

    Removes both the noise of tiny updates and the few huge ones that dominate a sum of task vectors. mergekit's
    defaults: density 1 keeps everything (gamma then drops nothing); the paper uses density ~0.9, gamma 0.01.
    """
    return _breadcrumbs(tensors, base, weights=weights, density=density, gamma=gamma, scaling=scaling,
                        normalize=normalize, rescale=rescale, consensus=False)


@merge_method(
    "breadcrumbs_ties",
    pretty_name="Model Breadcrumbs + TIES sign consensus",
    reference="https://arxiv.org/abs/2312.06795",
    elementwise=False,
)
def breadcrumbs_ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weights: Annotated[float | list[float], WEIGHTS] = 1.0,
    density: Annotated[float | list[float], DENSITY] = 1.0,
    gamma: Annotated[float | list[float], GAMMA] = 0.01,
    scaling: Annotated[float, SCALING] = 1.0,
    normalize: Annotated[bool, DISJOINT_NORMALIZE] = False,
    rescale: Annotated[bool, RESCALE] = False,
) -> Tensor:
    """base + scaling * the entries of w_i mask_i(theta_i - base) that agree with the elected sign, summed
    (normalize=true: divided by the agreeing models' summed weights), masks as in breadcrumbs.

    Breadcrumbs' outlier-and-noise mask, then TIES' sign election against interference; mergekit's defaults
    (density 1, gamma 0.01, normalize false).
    """
    return _breadcrumbs(tensors, base, weights=weights, density=density, gamma=gamma, scaling=scaling,
                        normalize=normalize, rescale=rescale, consensus=True)
