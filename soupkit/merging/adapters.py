"""PEFT LoRA adapters as merge inputs: every method acts on each adapted module's update dW = s*B*A.

- With a base (``--base``): each adapter reads as the adapted model's full weights W + dW
  (``soupkit.io.lora``), so any method works unchanged and the output is a full model: a uniform soup of
  adapters is W + mean dW, WiSE-FT of an adapter W + a*dW; methods that take a base (TIES, DARE, task arithmetic)
  get W as their base, so they act on the updates.
- Without a base: the inputs are the updates themselves. Methods linear in their inputs (uniform, linear, wise,
  task arithmetic) write an exact adapter (ranks concatenated, as peft's ``cat``); any method with ``rank``
  (``--rank R``) writes its merged updates re-factorised by truncated SVD; anything else is one line naming
  both ways out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soupkit.errors import ParameterError
from soupkit.io import CheckpointSource, lora
from soupkit.options import OutputOptions


def adapter_positions(checkpoints: Sequence[CheckpointSource]) -> list[int]:
    """Which inputs are LoRA adapters (paths only: an in-memory state dict is a full model)."""
    return [i for i, c in enumerate(checkpoints) if isinstance(c, (str, Path)) and lora.is_adapter(c)]


def merge_adapters_without_base(checkpoints: Sequence[CheckpointSource], method: str, params: Mapping[str, Any],
                                output: str | Path | None, options: OutputOptions, *, progress: bool = False,
                                metadata: Mapping[str, Any] | None = None) -> Path:
    """A soup of adapters written as an adapter folder (module docstring)."""
    from soupkit.merging.registry import get_method

    if output is None:
        raise ParameterError("a soup of LoRA adapters without --base is written as an adapter folder: give an "
                             "output (or --base BASE for the merged full weights in memory)")
    options.refuse(["dtype", "shard_size", "include", "exclude", "strip_prefix", "add_prefix", "ema"],
                   "a soup of LoRA adapters written as an adapter", "the adapter keeps its own layout")
    spec = get_method(method)
    bound = spec.bind(dict(params), len(checkpoints))
    meta = {k: v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
    try:  # linear in the updates: exact (or the exact sum re-factorised, with --rank)
        weights = lora.adapter_weights(method, bound, len(checkpoints))
    except ParameterError:
        if options.rank is None:
            raise  # names both ways out: --base, --rank
        result = _refactored(checkpoints, spec, bound, output, options, progress, meta)
    else:
        result = lora.merge_adapters(checkpoints, weights, output, rank=options.rank, force=options.force,
                                     metadata=meta)
    if options.rank is not None:
        import warnings

        from soupkit.merging.engine import SoupkitWarning

        warnings.warn(f"rank-{options.rank} adapter written to {result.folder}: relative reconstruction error "
                      f"{result.relative_error:.2e}", SoupkitWarning, stacklevel=3)
    return result.folder


def _refactored(checkpoints: Sequence[CheckpointSource], spec: Any, params: Mapping[str, Any], output: str | Path,
                options: OutputOptions, progress: bool, metadata: Mapping[str, str]) -> lora.AdapterResult:
    """Any method over the updates (TIES on updates has a zero base: updates are task vectors), then each merged
    update re-factorised to rank ``options.rank``."""
    import torch

    from soupkit.merging.api import merge_variants

    lora.check_dense_merge(checkpoints, spec.name, rank=options.rank, output=output)  # before the dense work
    base = None
    if spec.needs_base:  # zeros over every adapted module; a module some adapters leave alone is merged over
        base = {}        # those that adapt it (TIES/DARE ignore zero entries, so this equals zero-filling)
        for source in checkpoints:
            with lora.open_adapter(source) as reader:
                base.update({k: torch.zeros(reader.info(k).shape, dtype=reader.info(k).dtype)
                             for k in reader.keys() if k not in base})
    deltas = merge_variants(checkpoints, spec.name, [(params, None)], base=base, progress=progress,
                            options=options.model_copy(update={"rank": None, "force": False,
                                                               "allow_missing": True}))[0]
    assert isinstance(deltas, dict)
    return lora.save_adapter(deltas, list(checkpoints), output, options.rank, force=options.force,
                             metadata=metadata)
