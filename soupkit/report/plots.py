"""Plots of soup results, drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch, no display needed) and written atomically as PNG.

- ``plot_greedy_steps``: held-out accuracy per greedy step (candidates accepted / rejected / stopped early).
- ``plot_soup_scatter``: the model-soups paper's figure: in-distribution test accuracy vs mean accuracy under
  distribution shift, for every ingredient, the uniform soup and the greedy soup.
- ``plot_wise_curve``: the WiSE-FT curve over α (held-out accuracy vs α, and test vs shift when available).
- ``plot_learned_weights``: the learned soup's mixing weights.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _figure(width: float = 6.4, height: float = 4.8) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` as PNG to ``path`` atomically (soupkit.io.atomic: a temporary file renamed into place)."""
    from soupkit.io.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON atomically."""
    from soupkit.io.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_greedy_steps(result: Any, path: str | Path) -> Path:
    """Held-out accuracy at each greedy step: each ingredient's own score, its candidate soup's score, and the
    soup's best-so-far line. Early-stopped candidates are drawn at the bar they could not reach."""
    figure = _figure(7.5, 4.5)
    axes = figure.add_subplot()
    steps = [s for s in result.history if s.candidate is not None or s.stopped_early or s.score is not None]
    best: list[float] = []
    current = math.nan
    for step in result.history:
        if step.accepted and _finite(step.candidate):
            current = step.candidate
        best.append(current)
    xs = [s.step for s in result.history]
    axes.step(xs, best, where="post", color="tab:blue", label="greedy soup (best so far)")
    own = [(s.step, s.score) for s in steps if _finite(s.score)]
    if own:
        axes.scatter(*zip(*own), marker="o", facecolors="none", edgecolors="grey", label="ingredient alone")
    outcomes = ((True, "tab:green", "candidate accepted"), (False, "tab:red", "candidate rejected"))
    for accepted, colour, label in outcomes:
        points = [(s.step, s.candidate) for s in steps if s.accepted == accepted and _finite(s.candidate)]
        if points:
            axes.scatter(*zip(*points), marker="x" if not accepted else "o", color=colour, label=label, zorder=3)
    stopped = [(s.step, best[i - 1] if i else math.nan) for i, s in enumerate(result.history) if s.stopped_early]
    stopped = [(x, y) for x, y in stopped if _finite(y)]
    if stopped:
        axes.scatter(*zip(*stopped), marker="v", color="tab:orange", label="stopped early (below the bar)", zorder=3)
    axes.set_xlabel("greedy step (ingredients in order of held-out accuracy)")
    axes.set_ylabel("held-out accuracy")
    axes.set_title(f"Greedy soup: {len(result.ingredients)} of {len(result.names)} ingredients kept")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    return save_figure(figure, path)


_KIND_STYLE = {
    "ingredient": {"marker": "o", "color": "tab:grey", "s": 24, "label": "ingredients"},
    "uniform": {"marker": "D", "color": "tab:blue", "s": 70, "label": None},
    "greedy": {"marker": "*", "color": "tab:red", "s": 160, "label": None},
    "zeroshot": {"marker": "s", "color": "tab:purple", "s": 70, "label": None},
    "finetuned": {"marker": "^", "color": "tab:orange", "s": 70, "label": None},
}


def plot_soup_scatter(points: Sequence[Mapping[str, Any]], path: str | Path,
                      title: str = "Model soups: in-distribution vs distribution shift") -> Path:
    """Scatter of ``point["test"]`` (x) vs ``point["shift"]`` (y); ``point["kind"]`` picks the marker
    (ingredient, uniform, greedy) and non-ingredient points are labelled. Non-finite points are left out."""
    figure = _figure(6.4, 5.2)
    axes = figure.add_subplot()
    labelled = set()
    for point in points:
        if not (_finite(point.get("test")) and _finite(point.get("shift"))):
            continue
        style = dict(_KIND_STYLE.get(point.get("kind", "ingredient"), _KIND_STYLE["ingredient"]))
        label = style.pop("label") or point.get("label")
        if label in labelled:
            label = None
        labelled.add(label)
        axes.scatter([point["test"]], [point["shift"]], label=label, zorder=3 if point.get("kind") != "ingredient"
                     else 2, **style)
    axes.set_xlabel("in-distribution test accuracy")
    axes.set_ylabel("mean accuracy under distribution shift")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if labelled - {None}:
        axes.legend(loc="lower right", fontsize="small")
    return save_figure(figure, path)


def plot_wise_curve(points: Sequence[Any], path: str | Path) -> Path:
    """The WiSE-FT curve. ``points`` are ``SweepPoint``s. With test and shift accuracies: test (x) vs shift (y)
    through α, the zero-shot (α=0) and fine-tuned (α=1) endpoints marked and each α labelled; beside it,
    held-out accuracy against α with the chosen α marked."""
    curve = [p for p in points if _finite(p.test) and _finite(p.shift)]
    figure = _figure(11.0 if curve else 6.4, 4.8)
    if curve:
        left, right = figure.subplots(1, 2)
        xs, ys = [p.test for p in curve], [p.shift for p in curve]
        left.plot(xs, ys, "-o", color="tab:blue", markersize=4, label="WiSE-FT (weight interpolation)", zorder=2)
        for p in curve:
            left.annotate(f"α={p.alpha:g}", (p.test, p.shift), textcoords="offset points", xytext=(4, 4),
                          fontsize="x-small")
            if p.alpha == 0.0:
                left.scatter([p.test], [p.shift], zorder=3, **{**_KIND_STYLE["zeroshot"], "label": "zero-shot (α=0)"})
            elif p.alpha == 1.0:
                left.scatter([p.test], [p.shift], zorder=3,
                             **{**_KIND_STYLE["finetuned"], "label": "fine-tuned (α=1)"})
            if p.chosen:
                left.scatter([p.test], [p.shift], zorder=4,
                             **{**_KIND_STYLE["greedy"], "label": f"chosen α={p.alpha:g}"})
        left.set_xlabel("in-distribution test accuracy")
        left.set_ylabel("mean accuracy under distribution shift")
        left.set_title("WiSE-FT: robustness vs accuracy")
        left.grid(alpha=0.3)
        left.legend(loc="lower right", fontsize="small")
    else:
        right = figure.add_subplot()
    alphas = [p.alpha for p in points if _finite(p.heldout)]
    right.plot(alphas, [p.heldout for p in points if _finite(p.heldout)], "-o", color="tab:blue", markersize=4,
               label="held-out")
    if curve:
        right.plot([p.alpha for p in curve], xs, "--", color="tab:green", label="in-distribution test")
        right.plot([p.alpha for p in curve], ys, ":", color="tab:orange", label="mean shift")
    for p in points:
        if p.chosen and _finite(p.heldout):
            right.axvline(p.alpha, color="tab:red", alpha=0.4, label=f"chosen α={p.alpha:g}")
    right.set_xlabel("α (weight of the fine-tuned model)")
    right.set_ylabel("accuracy")
    right.set_title("accuracy along the interpolation")
    right.grid(alpha=0.3)
    right.legend(loc="lower center", fontsize="small")
    return save_figure(figure, path)


def plot_learned_weights(names: Sequence[str], weights: Sequence[float], path: str | Path,
                         title: str = "Learned soup: mixing weights") -> Path:
    """Bar chart of one weight per ingredient (the mean over tensors for a by-layer soup)."""
    figure = _figure(max(6.4, 0.5 * len(names) + 2), 4.2)
    axes = figure.add_subplot()
    labels = [Path(n).stem if len(n) > 24 else n for n in names]
    axes.bar(range(len(weights)), list(weights), color="tab:blue")
    axes.axhline(1.0 / max(len(weights), 1), color="grey", linestyle="--", label="uniform soup")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize="small")
    axes.set_ylabel("weight")
    axes.set_title(title)
    axes.legend(fontsize="small")
    return save_figure(figure, path)
