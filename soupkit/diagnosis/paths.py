"""The doctor's evaluated checks: held-out scores, the straight paths from the best ingredient to each other one,
and the uniform soup against the best ingredient.

Endpoints (α = 0 and 1) are the ingredients' own evaluations, answered by the evaluator's score cache when it has
them. A path point is evaluated with the evaluator's early stop set at the barrier threshold: a point that
provably falls more than ``BARRIER_MAX`` below the line stops there, and its barrier is then the lower bound it
proved (listed in ``report.stats["barrier_lower_bound"]``); every other barrier is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from soupkit.diagnosis import rules
from soupkit.diagnosis.report import DoctorReport
from soupkit.merging.api import uniform_soup, wise_ft

ALPHAS = (0.25, 0.5, 0.75)


def score_all(report: DoctorReport, judge: Any, sources: Sequence[Any], rows: Sequence[int]) -> None:
    """Each compatible ingredient's own held-out accuracy (cached by the evaluator)."""
    report.heldout = judge.heldout
    for source, row in zip(sources, rows):
        report.scores[report.names[row]] = judge.accuracy(source)[0]


def check_paths(report: DoctorReport, judge: Any, sources: Sequence[Any], rows: Sequence[int]) -> None:
    """Barriers from the best ingredient (``different_basin`` above ``BARRIER_MAX``) and the uniform soup's score."""
    names = report.names
    candidates = [r for r in rows if report.verdict[names[r]] in ("soupable", "different_init")]
    soupable = [r for r in candidates if report.verdict[names[r]] == "soupable"] or candidates
    best = max(soupable, key=lambda r: report.scores[names[r]])  # the best of the main group
    report.best = names[best]
    n = judge.examples()
    lower_bounds = []
    for row in candidates:
        if row == best:
            continue
        start, end = report.scores[names[best]], report.scores[names[row]]
        states = wise_ft(sources[best], sources[row], list(ALPHAS))
        path, exact = [(0.0, start)], True
        for alpha, state in zip(ALPHAS, states):
            line = (1 - alpha) * start + alpha * end
            need = math.ceil((line - rules.BARRIER_MAX) * n - 1e-9) if n else None
            accuracy, point_exact = judge.accuracy(state, need_correct=need if need and need > 0 else None)
            path.append((alpha, accuracy))
            exact &= point_exact
        path.append((1.0, end))
        value = rules.barrier(start, end, path[1:-1])
        report.barrier[names[row]] = value
        report.path[names[row]] = [[a, acc] for a, acc in path]
        if not exact:
            lower_bounds.append(names[row])
        if value > rules.BARRIER_MAX and report.verdict[names[row]] == "soupable":
            report.verdict[names[row]] = "different_basin"
            report.reason[names[row]] = (f"held-out accuracy dips {'≥ ' if not exact else ''}{100 * value:.1f} points "
                                         f"below the line from {_stem(names[best])} (> {100 * rules.BARRIER_MAX:g})")
    report.stats["barrier_lower_bound"] = lower_bounds
    compatible = [sources[r] for r in rows if report.verdict[names[r]] != "incompatible"]
    report.uniform_score = judge.accuracy(uniform_soup(compatible))[0]
    report.stats["uniform_of"] = len(compatible)


def _stem(name: str) -> str:
    from pathlib import Path

    return Path(name).name.removesuffix(".safetensors")
