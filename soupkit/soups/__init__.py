"""Soup algorithms that need an evaluator: greedy soup, WiSE-FT α sweep and learned soup.

Each accepts an ``Evaluator`` (``soupkit.eval``), a recipe path, or any callable ``state_dict -> float |
EvalResult``, and returns a ``SoupResult``. Imported lazily (PEP 562): ``soupkit.soups.alphas`` is usable by the
CLI without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from soupkit._lazy import lazy_exports

_LAZY = {
    "greedy_soup": "soupkit.soups.greedy",
    "learned_soup": "soupkit.soups.learned",
    "wise_sweep": "soupkit.soups.sweep",
    "search": "soupkit.soups.merge_search",
    "SearchResult": "soupkit.soups.merge_search",
    "parse_alphas": "soupkit.soups.alphas",
    "GreedyStep": "soupkit.soups.result",
    "LearnedWeights": "soupkit.soups.result",
    "SoupResult": "soupkit.soups.result",
    "SweepPoint": "soupkit.soups.result",
}

__all__ = ["GreedyStep", "LearnedWeights", "SearchResult", "SoupResult", "SweepPoint", "greedy_soup", "learned_soup",
           "parse_alphas", "search", "wise_sweep"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


if TYPE_CHECKING:  # pragma: no cover
    from soupkit.soups.alphas import parse_alphas
    from soupkit.soups.greedy import greedy_soup
    from soupkit.soups.learned import learned_soup
    from soupkit.soups.merge_search import SearchResult, search
    from soupkit.soups.result import GreedyStep, LearnedWeights, SoupResult, SweepPoint
    from soupkit.soups.sweep import wise_sweep
