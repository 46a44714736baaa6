"""Lightning ``.ckpt`` outputs: the checkpoint dict ``LightningModule.load_from_checkpoint`` accepts.

Lightning's ``Trainer.save_checkpoint`` writes ``{"epoch", "global_step", "pytorch-lightning_version",
"state_dict", "loops", "callbacks", "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters",
...}``. ``load_from_checkpoint`` needs only ``state_dict`` (keys as the module names them: ``model.`` for
``self.model``), the version (for its migrations) and ``hyper_parameters`` (the constructor's arguments). A soup
has no optimizer or loop state, so it carries those keys and the first input's plain-data hyperparameters; the
result loads with ``torch.load(weights_only=True)``, which Lightning uses on recent torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from soupkit.errors import CheckpointError
from soupkit.io.safe_pickle import open_lazy
from soupkit.io.torch_io import save_torch

__all__ = ["DEFAULT_VERSION", "lightning_template", "save_lightning_checkpoint"]

#: the version written when the inputs carry none (Lightning runs no migration on checkpoints this recent)
DEFAULT_VERSION = "2.5.0"
#: entries copied from an input Lightning checkpoint when they are plain data
_CARRIED = ("pytorch-lightning_version", "epoch", "global_step", "hparams_name", "hyper_parameters",
            "datamodule_hparams_name", "datamodule_hyper_parameters")


def _is_plain(value: Any, depth: int = 0) -> bool:
    """Data ``torch.load(weights_only=True)`` reads back: containers of str/int/float/bool/None."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def lightning_template(source: str | Path) -> dict[str, Any]:
    """What a soup of ``source`` (a Lightning ``.ckpt``) carries over besides the weights: version, epoch, step
    and the hyperparameters when they are plain data. ``{}`` for any other file. Hyperparameters holding
    objects (an Enum, a ``functools.partial``) are left out with a warning: they would need their classes
    imported to be written, and ``load_from_checkpoint(path, **hparams)`` can supply them."""

    path = Path(source)
    if not path.is_file() or path.suffix.lower() != ".ckpt":
        return {}
    try:
        lazy = open_lazy(path)
    except CheckpointError:
        return {}
    try:
        obj = lazy.obj
        if not isinstance(obj, Mapping) or "state_dict" not in obj:
            return {}
        template = {}
        for key in _CARRIED:
            if key not in obj:
                continue
            if _is_plain(obj[key]):
                template[key] = obj[key]
            else:
                warnings.warn(f"{path}: {key!r} holds objects other than plain data; the .ckpt output leaves it "
                              f"out (pass them to load_from_checkpoint)", stacklevel=2)
        return template
    finally:
        lazy.close()


def save_lightning_checkpoint(state_dict: Mapping[str, torch.Tensor], handle: BinaryIO,
                              template: Mapping[str, Any] | None = None, *, name: str) -> None:
    """Write ``state_dict`` as a Lightning checkpoint dict into ``handle`` (an ``OutputSet`` temporary).
    ``template`` (``lightning_template`` of an input) supplies the version, epoch, step and hyperparameters."""

    def container(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        checkpoint: dict[str, Any] = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": DEFAULT_VERSION}
        checkpoint.update({k: v for k, v in (template or {}).items() if k in _CARRIED})
        checkpoint["state_dict"] = tensors  # no optimizer/loop state: resuming training from a soup says so
        return checkpoint

    save_torch(state_dict, handle, name=name, container=container)
