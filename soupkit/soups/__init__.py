"""Soup algorithms that need an evaluator: greedy soup, WiSE-FT α sweep and learned soup.

Each accepts an ``Evaluator`` (``soupkit.eval``), a recipe path, or any callable ``state_dict -> float |
EvalResult``, and returns a ``SoupResult``.
"""

from __future__ import annotations

from soupkit.soups.greedy import greedy_soup
from soupkit.soups.learned import learned_soup
from soupkit.soups.result import GreedyStep, LearnedWeights, SoupResult, SweepPoint
from soupkit.soups.sweep import parse_alphas, wise_sweep

__all__ = ["GreedyStep", "LearnedWeights", "SoupResult", "SweepPoint", "greedy_soup", "learned_soup", "parse_alphas",
           "wise_sweep"]
