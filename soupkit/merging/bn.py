"""BatchNorm recalibration after merging: averaged weights no longer match averaged running statistics, so
recompute them on data (as SWA does, Izmailov et al. 2018: ``torch.optim.swa_utils.update_bn``).

Also the small glue shared with ``fisher_info``: taking the evaluator given (this layer sits below
``soupkit.eval``, so callers build it: ``soupkit.Evaluator.from_recipe(...)``; the CLI does it from ``--eval``), and
matching the evaluator model's tensor names to the checkpoint's.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from soupkit.errors import ParameterError
from soupkit.merging.engine import SoupkitWarning

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def resolve_evaluator(evaluator: Any) -> Any:
    """The evaluator given (anything with ``model``, ``batches(name)`` and ``heldout_name``, as
    ``soupkit.eval.Evaluator``), or built by a zero-argument factory (called only when needed, so that cheap
    checks such as the output path come first). A recipe is refused by name: the merging layer does not build
    evaluators."""
    if isinstance(evaluator, (str, Path, Mapping)):
        raise ParameterError(f"expected an evaluator, got the recipe {str(evaluator)[:80]!r}: pass "
                             f"soupkit.Evaluator.from_recipe(recipe) (or a function returning one)")
    if callable(evaluator) and not hasattr(evaluator, "batches"):
        return evaluator()
    return evaluator


def checkpoint_keys(model_keys: Iterable[str], checkpoint: Iterable[str]) -> dict[str, str]:
    """Model tensor name -> checkpoint key: the same name, or the name with one prefix added or removed
    (``model.`` / ``module.`` wrappers on either side), whichever matches most names. Unmatched names are
    left out."""
    model_keys, available = list(model_keys), set(checkpoint)
    if not model_keys:
        return {}
    probe = model_keys[0]
    renames: list[Callable[[str], str]] = [lambda k: k]
    for key in available:
        if key.endswith(probe) and key != probe:  # the checkpoint's names carry a prefix
            renames.append(lambda k, prefix=key[: -len(probe)]: prefix + k)
        elif probe.endswith(key) and key != probe:  # the model's names carry one
            renames.append(lambda k, cut=len(probe) - len(key): k[cut:])
    matches = ({k: rename(k) for k in model_keys if rename(k) in available} for rename in renames)
    return max(matches, key=len)


def recalibrate_bn(state_dict: Mapping[str, torch.Tensor], evaluator: Any,
                   max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Recompute the BatchNorm running statistics of ``state_dict`` over the evaluator's held-out data.

    Loads the weights into the evaluator's model, resets every BatchNorm layer's statistics and re-estimates
    them as a cumulative average over the batches (train mode, no gradients), then returns a copy of
    ``state_dict`` with the new running mean / variance / batch counts (in the input's dtypes). ``evaluator``:
    an ``Evaluator`` (or a function returning one), see ``resolve_evaluator``.
    """
    if max_batches is not None and max_batches < 1:
        raise ParameterError(f"recalibrate_bn: max_batches must be >= 1, got {max_batches}")
    ev = resolve_evaluator(evaluator)
    ev.load_state(dict(state_dict))
    model = ev.model
    norms = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    if not norms:
        warnings.warn("recalibrate_bn: the model has no BatchNorm layers with running statistics; nothing to do",
                      SoupkitWarning, stacklevel=2)
        return dict(state_dict)
    batches = iter(ev.batches(ev.heldout_name))
    first = next(batches, None)
    if first is None:
        raise ParameterError(f"recalibrate_bn: the held-out data {ev.heldout_name!r} has no batches")
    images = (batch[0] for batch in itertools.islice(itertools.chain([first], batches), max_batches))
    update_bn(images, model)
    names = [f"{name}.{buffer}" for name, module in norms.items() for buffer in _BN_BUFFERS
             if getattr(module, buffer, None) is not None]
    mapping = checkpoint_keys(names, state_dict)
    if not mapping:
        raise ParameterError("recalibrate_bn: none of the model's BatchNorm statistics match a key of the merged "
                             f"state dict (model names like {names[0]!r}); is the recipe for this architecture?")
    fresh = model.state_dict()
    result = dict(state_dict)
    for name, key in mapping.items():
        result[key] = fresh[name].detach().to(device="cpu", dtype=state_dict[key].dtype).clone()
    return result


def merge_and_recalibrate(checkpoints: Any, method: str, output: str | Path | None, base: Any,
                          params: dict[str, Any], options: Any, evaluator: Any, *,
                          metadata: Mapping[str, Any] | None = None, progress: bool = False) -> Any:
    """Merge in memory, recompute BatchNorm statistics over the recipe's held-out data, then write the result
    through the merge plan's writer for ``output`` (every output form and option, checked before any work). The
    fix for soups of convnets: averaged weights no longer match the averaged running stats."""
    # cycle (api imports this module): merge_and_recalibrate is api's orchestration and moves there with api's
    # output-plan rewrite; until then the import waits for the call
    from soupkit.merging.api import merge_variants

    recipe = evaluator if isinstance(evaluator, (str, Path)) else type(evaluator).__name__
    return merge_variants(checkpoints, method, [(params, output)], base=base, options=options, progress=progress,
                          metadata={**(metadata or {}), "soupkit.recalibrate_bn": str(recipe)},
                          transform=lambda state: recalibrate_bn(state, evaluator))[0]
