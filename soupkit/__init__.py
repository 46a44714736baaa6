"""soupkit: model soups and weight merging on checkpoint files.

The public API is imported lazily (PEP 562) so that ``import soupkit`` and ``soupkit --help`` stay fast:
torch, open_clip and timm load only when a function that needs them is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from soupkit._lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    # lazy too: importlib.metadata takes ~50 ms, and the CLI's start-up Ctrl-C handler is installed only once
    # this package has been imported
    "__version__": "soupkit._version",
    # checkpoint I/O
    "open_checkpoint": "soupkit.io",
    "load_checkpoint": "soupkit.io",
    "save_checkpoint": "soupkit.io",
    "CheckpointReader": "soupkit.io",
    "fingerprint": "soupkit.io",
    # merge engine
    "merge": "soupkit.merging",
    "uniform_soup": "soupkit.merging",
    "wise_ft": "soupkit.merging",
    "list_methods": "soupkit.merging",
    "get_method": "soupkit.merging",
    "merge_method": "soupkit.merging",
    "Param": "soupkit.merging",
    "TensorFiles": "soupkit.merging",
    "OutputOptions": "soupkit.options",
    # evaluator
    "Evaluator": "soupkit.eval",
    "EvalResult": "soupkit.eval",
    # soup algorithms
    "greedy_soup": "soupkit.soups",
    "wise_sweep": "soupkit.soups",
    "learned_soup": "soupkit.soups",
    "SoupResult": "soupkit.soups",
    "search": "soupkit.soups",
    # pre-flight check
    "doctor": "soupkit.diagnosis",
    "DoctorReport": "soupkit.diagnosis",
    # errors (cheap, but keep one mechanism)
    "SoupkitError": "soupkit.errors",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from soupkit._version import __version__
    from soupkit.diagnosis import DoctorReport, doctor
    from soupkit.errors import SoupkitError
    from soupkit.eval import EvalResult, Evaluator
    from soupkit.io import CheckpointReader, fingerprint, load_checkpoint, open_checkpoint, save_checkpoint
    from soupkit.merging import Param, TensorFiles, get_method, list_methods, merge, merge_method, uniform_soup, wise_ft
    from soupkit.options import OutputOptions
    from soupkit.soups import SoupResult, greedy_soup, learned_soup, search, wise_sweep
