"""The one place the engine calls a merge method, and what it checks about the call (issue 26, class 11).

A method is a pure function over tensors, and a plugin's is code soupkit did not write: it may return a list,
None, a complex or integer tensor, the wrong shape, NaN from finite inputs, write into the tensors it was given,
or raise. Any of those is one line naming the method and the tensor, never a garbage output with exit 0.

- Every method's result is checked: a real floating tensor of the expected shape (O(1) checks). Finiteness is
  the engine's ``_check_output``, which runs for every method already.
- Built-in methods (registered by ``soupkit.merging.methods``) are called as they are: they are tested against
  float64 references and never write into their inputs, and cloning every input would cost a full copy per
  input per chunk (``benchmarks/merge_bench.py``: built-ins are unchanged by this module).
- Plugin methods get clones of their inputs (and of the base and auxiliary tensors), compared with the
  originals after the call: a method that writes into them is named, and the originals, which may be shared
  with other variants of the same step, are never touched. Their exceptions become one line naming them;
  NaN/Inf they return from finite inputs is said to be theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from soupkit.errors import NonFiniteError, SoupkitError
from soupkit.merging.registry import METHODS

#: the package whose methods are trusted (tested against references; see the module docstring)
BUILTIN_PACKAGE = "soupkit.merging.methods"


def is_builtin(method: Any) -> bool:
    """True for the methods soupkit ships (their registering module is inside ``BUILTIN_PACKAGE``)."""

    try:
        owner = METHODS.owner(method.name)
    except KeyError:
        return False
    return owner == BUILTIN_PACKAGE or owner.startswith(BUILTIN_PACKAGE + ".")


def call_method(method: Any, inputs: Sequence[torch.Tensor], params: Mapping[str, Any],
                context: Mapping[str, Any], *, key: str, shape: tuple[int, ...],
                allow_nonfinite: bool = False) -> torch.Tensor:
    """``method.fn(inputs, **params, **context)`` for tensor ``key`` (expected result shape ``shape``), checked
    as the module docstring says; raises a one-line ``SoupkitError`` naming the method and ``key``."""
    if is_builtin(method):
        result = method.fn(inputs, **params, **context)
        check_result(method.name, result, key, shape)
        return result
    originals = list(inputs)
    given = [t.clone() for t in originals]
    params, context = _cloned(params), _cloned(context)
    try:
        result = method.fn(given, **params, **context)
    except SoupkitError:
        raise
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise SoupkitError(f"merge method {method.name!r} failed on tensor {key!r}: {type(error).__name__}"
                           f"{': ' + first[:200] if first else ''}") from None
    for index, (original, copy) in enumerate(zip(originals, given)):
        if not _same(original, copy):
            raise SoupkitError(f"merge method {method.name!r} wrote into its input {index} (tensor {key!r}); a "
                               "method must leave its inputs unchanged and return a new tensor")
    check_result(method.name, result, key, shape)
    if not allow_nonfinite and not _finite(result) and all(_finite(t) for t in originals):
        raise NonFiniteError(f"merge method {method.name!r} returned NaN or Inf for tensor {key!r} from finite "
                             "inputs")
    return result


def check_result(name: str, result: Any, key: str, shape: tuple[int, ...]) -> None:
    """A method's result must be a real floating tensor of ``shape`` (one line naming the method otherwise)."""
    where = f"merge method {name!r} returned"
    if not isinstance(result, torch.Tensor):
        raise SoupkitError(f"{where} {_kind(result)} for tensor {key!r}; a method returns one tensor of shape "
                           f"{tuple(shape)}")
    if result.is_complex() or not result.is_floating_point():
        raise SoupkitError(f"{where} a tensor of dtype {str(result.dtype).removeprefix('torch.')} for {key!r}; "
                           "a method returns a real floating tensor")
    if tuple(result.shape) != tuple(shape):
        raise SoupkitError(f"{where} shape {tuple(result.shape)} for tensor {key!r}; expected {tuple(shape)}")


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _cloned(values: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors (and lists of tensors: auxiliary chunks) cloned, other values as they are."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.clone()
        elif isinstance(value, list) and any(isinstance(v, torch.Tensor) for v in value):
            out[name] = [v.clone() if isinstance(v, torch.Tensor) else v for v in value]
        else:
            out[name] = value
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and bits (NaN equals NaN: an input holding NaN under --allow-nonfinite is unchanged)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(torch.equal(a.view(_bits(a.dtype)), b.view(_bits(b.dtype))))
    return bool(torch.equal(a, b))


def _bits(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(dtype.itemsize, torch.uint8)


def _finite(tensor: torch.Tensor) -> bool:
    # a sum is ~50x cheaper than isfinite().all() (engine._all_finite); exact only when the sum overflows
    return math.isfinite(tensor.sum()) or bool(torch.isfinite(tensor).all())
