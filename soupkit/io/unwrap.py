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
#: (timm's CheckpointSaver and ``load_checkpoint(use_ema=True)``: state_dict_ema, then model_ema; ``_v2``: timm
#: runs that kept both a ModelEma and a ModelEmaV2)
EMA_CONTAINERS = ("state_dict_ema", "model_ema", "state_dict_ema_v2", "model_ema_v2", "ema_state_dict", "ema",
                  "ema_model", "model_ema_state_dict")
#: wrappers that prefix keys: DDP/DataParallel (``module.``) and torch.compile (``_orig_mod.``), nested in any order
_DDP_COMPONENT = "module"
_COMPILE_COMPONENT = "_orig_mod"


def _describe(obj: Any) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:6]]
        return f"a mapping with keys {keys}" if keys else "an empty mapping"
    return f"a {type(obj).__name__}"


def _unwrapped_name(key: str, strip_module: int) -> str:
    """``key`` without its first ``strip_module`` DDP ``module`` components (counted among the leading wrapper
    components) and without any whole ``_orig_mod`` component (``torch.compile`` of the model or a submodule)."""
    parts = key.split(".")
    kept, dropped_modules, leading = [], 0, True
    for part in parts[:-1]:
        if part == _COMPILE_COMPONENT:
            continue
        if leading and part == _DDP_COMPONENT and dropped_modules < strip_module:
            dropped_modules += 1
            continue
        leading = False
        kept.append(part)
    kept.append(parts[-1])
    return ".".join(kept)


def _leading_modules(key: str) -> int:
    count = 0
    for part in key.split(".")[:-1]:
        if part == _DDP_COMPONENT:
            count += 1
        elif part != _COMPILE_COMPONENT:
            break
    return count


def strip_prefixes(state: dict[str, T], *, source: str = "checkpoint") -> dict[str, T]:
    """Drop the wrappers' key components: DDP's ``module.`` when every key starts with it (after any
    ``_orig_mod.``), and every whole ``_orig_mod`` component (``torch.compile(DDP(m))`` saves
    ``_orig_mod.module.*``, ``DDP(torch.compile(m))`` ``module._orig_mod.*``). ``x_orig_mod.w`` is left alone.
    Two keys that become one raise an error naming both."""
    if not state:
        return state
    strip_module = min(_leading_modules(k) for k in state)
    if not strip_module and not any(_COMPILE_COMPONENT in k for k in state):
        return state  # the common case: one pass over the keys, no renaming
    renamed: dict[str, T] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        name = _unwrapped_name(key, strip_module)
        if name in renamed:
            raise CheckpointError(f"{source}: keys {origin[name]!r} and {key!r} both become {name!r} once the "
                                  f"DDP/torch.compile wrappers (module., _orig_mod.) are stripped")
        renamed[name], origin[name] = value, key
    return renamed


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
    return strip_prefixes({k: v for k, v in mapping.items() if is_tensor(v)}, source=source)
