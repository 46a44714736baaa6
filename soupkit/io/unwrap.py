"""Find the state dict inside the containers training codebases save.

Checkpoints rarely hold a bare ``{name: tensor}``: timm saves ``{"state_dict": ..., "state_dict_ema": ...}``,
Lightning ``{"state_dict": ...}``, many scripts ``{"model": ..., "optimizer": ...}``; DDP prefixes every key with
``module.`` and ``torch.compile`` inserts ``_orig_mod.``. This module turns any of those into a flat mapping.
Values stay opaque (real tensors or lazy stand-ins): ``is_tensor`` decides what counts as a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from soupkit.errors import CheckpointError

T = TypeVar("T")

#: containers that hold the model weights, tried in this order
WEIGHT_CONTAINERS = ("state_dict", "model", "module", "model_state_dict", "model_state", "net", "network")
#: containers that hold EMA weights (picked by ``ema=True`` / ``--ema``)
EMA_CONTAINERS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema", "model_ema_state_dict")
#: wrappers whose key prefix we strip: DDP/DataParallel and torch.compile
_DDP_PREFIX = "module."
_COMPILE_SEGMENT = "_orig_mod."


def _describe(obj: Any) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:6]]
        return f"a mapping with keys {keys}" if keys else "an empty mapping"
    return f"a {type(obj).__name__}"


def strip_prefixes(state: dict[str, T]) -> dict[str, T]:
    """Drop ``module.`` when every key has it, and every ``_orig_mod.`` path segment."""
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        state = {k[len(_DDP_PREFIX) :]: v for k, v in state.items()}
    if any(_COMPILE_SEGMENT in k for k in state):
        state = {k.replace(_COMPILE_SEGMENT, ""): v for k, v in state.items()}
    return state


def unwrap_state_dict(
    obj: Any,
    *,
    source: str,
    is_tensor: Callable[[Any], bool],
    flatten_object: Callable[[Any], Mapping[str, Any] | None] | None = None,
    ema: bool = False,
) -> dict[str, Any]:
    """Return the flat ``{key: tensor}`` mapping held by ``obj``.

    ``flatten_object`` turns a non-mapping object (e.g. a pickled ``nn.Module`` stand-in) into a mapping, or
    returns None if it cannot. Non-tensor entries of a state dict (epoch counters, ``_metadata``) are dropped.
    """
    if flatten_object is not None and not isinstance(obj, Mapping):
        flat = flatten_object(obj)
        if flat is not None:
            obj = flat
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: not a state dict: the file holds {_describe(obj)}")

    names = EMA_CONTAINERS if ema else WEIGHT_CONTAINERS
    for name in names:
        inner = obj.get(name)
        if inner is None or inner is obj:
            continue
        if flatten_object is not None and not isinstance(inner, Mapping):
            inner = flatten_object(inner)
        if isinstance(inner, Mapping) and any(is_tensor(v) for v in inner.values()):
            return _tensors_only(inner, source, is_tensor)
        if isinstance(inner, Mapping):  # one more level: {"model": {"state_dict": ...}}
            try:
                return unwrap_state_dict(
                    inner, source=source, is_tensor=is_tensor, flatten_object=flatten_object, ema=ema
                )
            except CheckpointError:
                pass
    if ema:
        raise CheckpointError(
            f"{source}: no EMA weights found (looked for {', '.join(EMA_CONTAINERS)}); "
            f"top-level keys: {[str(k) for k in list(obj)[:10]]}"
        )
    if any(is_tensor(v) for v in obj.values()):
        return _tensors_only(obj, source, is_tensor)
    raise CheckpointError(f"{source}: not a state dict: no tensors found in {_describe(obj)}")


def _tensors_only(mapping: Mapping[Any, Any], source: str, is_tensor: Callable[[Any], bool]) -> dict[str, Any]:
    bad_keys = [k for k in mapping if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{source}: not a state dict: key {bad_keys[0]!r} is not a string")
    return strip_prefixes({k: v for k, v in mapping.items() if is_tensor(v)})
