"""Parsing numeric option text shared by the library and the CLI (sizes, number lists). Free of torch, so the
CLI refuses a bad value before the heavy imports; every failure is one ``ParameterError`` naming the option."""

from __future__ import annotations

import math

from soupkit.errors import ParameterError

__all__ = ["MAX_SIZE", "parse_float_list", "parse_size"]

#: the largest size accepted (8 PiB): beyond it a float no longer holds every byte count exactly, and no disk
#: holds a shard that large; safetensors offsets (u64) would still fit, so this is the tighter bound
MAX_SIZE = 2**53
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_float_list(value: str, option: str) -> list[float]:
    """Parse ``"0.2,0.8"`` into finite floats, naming the option on error."""
    try:
        numbers = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ParameterError(f"{option}: expected comma-separated numbers, got {value!r}") from None
    if not all(math.isfinite(n) for n in numbers):
        raise ParameterError(f"{option}: values must be finite numbers, got {value!r}")
    return numbers


def parse_size(value: str | int, option: str) -> int:
    """Parse ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count into bytes: positive, finite, at most 8 PiB."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        text = value.strip().upper()
        number = text.rstrip("KMGTIB")
        unit = text[len(number):]
        try:  # an integer byte count stays exact (a float would round 2**53 + 1 down)
            amount = int(number) * _UNITS[unit] if number.strip().isdigit() else float(number) * _UNITS[unit]
        except (ValueError, KeyError):
            raise ParameterError(f"{option}: expected a size like 5GB or 500MB, got {value!r}") from None
        if not math.isfinite(amount):
            raise ParameterError(f"{option}: expected a finite size like 5GB, got {value!r}")
        size = int(amount) if amount <= MAX_SIZE else MAX_SIZE + 1
    else:
        raise ParameterError(f"{option}: expected a size like '5GB' or a byte count, got a {type(value).__name__}")
    if size <= 0:
        raise ParameterError(f"{option}: must be positive, got {value!r}")
    if size > MAX_SIZE:
        raise ParameterError(f"{option}: {value!r} is larger than the 8 PiB soupkit accepts")
    return size
