"""Parsing α lists for WiSE-FT (``0:1:0.1``, ``0.3,0.5,0.7``, ``0.5``). Kept free of torch so the CLI can
reject a bad ``--alpha`` before the heavy imports."""

from __future__ import annotations

import math
from collections.abc import Sequence

from soupkit.errors import ParameterError

#: at most this many alphas (each is a full merge and an evaluation): a range like 0:1:1e-9 is refused before
#: a single value is made, instead of allocating until memory runs out
MAX_ALPHAS = 1000


def parse_alphas(text: str | float | Sequence[float]) -> list[float]:
    """``"0:1:0.1"`` -> [0.0, 0.1, ..., 1.0] (stop included, values rounded to 10 decimals against float drift);
    ``"0.3,0.5,0.7"`` -> a list; ``"0.5"`` or 0.5 -> [0.5]. Duplicates are an error."""
    if isinstance(text, (int, float)):
        values = [float(text)]
    elif not isinstance(text, str):
        try:
            values = [float(v) for v in text]
        except (TypeError, ValueError):
            raise ParameterError(f"--alpha: expected numbers, got {text!r}") from None
    elif ":" in text:
        try:
            start, stop, step = (float(part) for part in text.split(":"))
        except ValueError:
            raise ParameterError(f"--alpha: a range is start:stop:step, e.g. 0:1:0.1; got {text!r}") from None
        if not all(math.isfinite(v) for v in (start, stop, step)):
            raise ParameterError(f"--alpha: start, stop and step must be finite; got {text!r}")
        if not step > 0 or stop < start:
            raise ParameterError(f"--alpha: a range needs step > 0 and stop >= start; got {text!r}")
        count = (stop - start) / step
        if not count < MAX_ALPHAS:  # also catches an overflow to inf (1e308 / 1e-308)
            raise ParameterError(f"--alpha: {text!r} gives more than {MAX_ALPHAS} values; use a larger step")
        count = math.floor(count + 1e-9) + 1
        values = [round(start + i * step, 10) for i in range(count)]
    else:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ParameterError(f"--alpha: expected numbers like 0.5, 0.3,0.5,0.7 or 0:1:0.1; got {text!r}") from None
    if not values:
        raise ParameterError("--alpha: give at least one value")
    if len(values) > MAX_ALPHAS:
        raise ParameterError(f"--alpha: {len(values)} values; at most {MAX_ALPHAS}")
    if any(not math.isfinite(v) for v in values):
        raise ParameterError(f"--alpha: values must be finite, got {values}")
    if len(set(values)) != len(values):
        raise ParameterError(f"--alpha: duplicate values in {values}")
    return values
