"""PEFT LoRA adapters as merge inputs: every method acts on each adapted module's update dW = s*B*A.

- With a base (``--base``): each adapter reads as the adapted model's full weights W + dW
  (``soupkit.io.lora``), so any method works unchanged and the output is a full model: a uniform soup of
  adapters is W + mean dW, WiSE-FT of an adapter W + a*dW; methods that take a base (TIES, DARE, task arithmetic)
  get W as their base, so they act on the updates.
- Without a base: the inputs are the updates themselves, and the merge plan (``soupkit.merging.plan``) writes an
  adapter. Methods that declare themselves linear (``merge_method(linear=...)``: uniform, linear, wise, task
  arithmetic, DARE-linear without drops) give an exact adapter (ranks concatenated, as peft's ``cat``); any
  method with ``--rank R`` writes its merged updates re-factorised by truncated SVD; anything else is one line
  naming both ways out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from soupkit.io import CheckpointSource, lora


def adapter_positions(checkpoints: Sequence[CheckpointSource]) -> list[int]:
    """Which inputs are LoRA adapters (paths only: an in-memory state dict is a full model)."""
    return [i for i, c in enumerate(checkpoints) if isinstance(c, (str, Path)) and lora.is_adapter(c)]


def zero_updates(adapters: Sequence[CheckpointSource]) -> dict[str, torch.Tensor]:
    """The base of a merge over updates (TIES on updates has a zero base: updates are task vectors): zeros over
    every adapted module. A module some adapters leave alone is merged over those that adapt it (TIES/DARE
    ignore zero entries, so this equals zero-filling)."""
    base: dict[str, torch.Tensor] = {}
    for source in adapters:
        with lora.open_adapter(source) as reader:
            base.update({k: torch.zeros(reader.info(k).shape, dtype=reader.info(k).dtype)
                         for k in reader.keys() if k not in base})
    return base
