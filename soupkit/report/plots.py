"""Plots of soup results, drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch, no display needed) and written atomically as PNG.

- ``plot_greedy_steps``: held-out accuracy per greedy step (candidates kept / rejected / stopped early, the
  last drawn as what an early stop proves: an upper bound at the soup's accuracy).
- ``plot_soup_scatter``: the model-soups paper's figure: in-distribution test accuracy vs mean accuracy under
  distribution shift, for every ingredient (the best one labelled), the soups, the zero-shot model and the
  chosen WiSE-FT point when given.
- ``plot_wise_curve``: the WiSE-FT curve over α (test vs shift, and accuracy against α).
- ``plot_learned_weights``: the learned soup's mixing weights.

Accuracies are drawn in % like the tables; legends sit below the axes so they never hide data, and point
labels are placed where they overlap no other label and no marker (``place_labels``), or left out.
"""

from __future__ import annotations

import io
import itertools
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


def _percent(axes: Any, which: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter

    for axis in ((axes.xaxis,) if which == "x" else (axes.yaxis,) if which == "y" else (axes.xaxis, axes.yaxis)):
        axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))


def _legend_below(axes: Any, columns: int = 2) -> Any:
    """A legend under the axes (outside the data area): it can never hide a point or a label."""
    return axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=columns, fontsize="small",
                       frameon=False)


#: where a label may go around its point, in points: (dx, dy, horizontal alignment, vertical alignment)
_OFFSETS = ((6, 5, "left", "bottom"), (6, -5, "left", "top"), (-6, 5, "right", "bottom"),
            (-6, -5, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
            (9, 0, "left", "center"), (-9, 0, "right", "center"), (14, 12, "left", "bottom"),
            (-14, -12, "right", "top"), (14, -12, "left", "top"), (-14, 12, "right", "bottom"))


def place_labels(axes: Any, labels: Sequence[tuple[float, float, str, bool]],
                 markers: Sequence[tuple[float, float, float]] = (),
                 lines: Sequence[tuple[float, float]] = ()) -> list[Any]:
    """Annotate points without overlaps: each ``(x, y, text, required)`` label (data coordinates) goes at the
    first offset around its point where its box stays inside the axes, overlaps no placed label and no
    marker (``(x, y, radius in points)``) and is nearer its own point than any other marker (so it cannot be
    read as another point's); crossing the polyline ``lines`` is allowed but avoided. A required label that
    fits nowhere near is set farther off with a leader line;
    other labels that fit nowhere are left out. Required labels are placed first. Freezes the figure's
    layout, so what was checked is what is saved. Returns the placed ``Text`` artists."""
    from matplotlib.transforms import Bbox

    figure = axes.figure
    figure.draw_without_rendering()  # run the layout engine now, then keep it
    figure.set_layout_engine("none")
    renderer = figure.canvas.get_renderer()
    scale = figure.dpi / 72.0
    centres = [tuple(axes.transData.transform((x, y))) for x, y, _ in markers]
    taken = [Bbox([[px - r * scale, py - r * scale], [px + r * scale, py + r * scale]])
             for (px, py), (_, _, r) in zip(centres, markers)]
    frame = axes.get_window_extent(renderer)
    path = _sample_polyline([tuple(axes.transData.transform(xy)) for xy in lines], step=3.0)
    placed = []
    for x, y, text, required in sorted(labels, key=lambda item: not item[3]):
        own = tuple(axes.transData.transform((x, y)))
        far = [(dx * k, dy * k, ha, va, True) for k in (3, 5) for dx, dy, ha, va in _OFFSETS] if required else []
        best: tuple[Any, Any] | None = None
        best_score = None
        for dx, dy, ha, va, leader in [(*o, False) for o in _OFFSETS] + far:
            artist = axes.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                                   fontsize="x-small", annotation_clip=False,
                                   arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6} if leader else None)
            box = artist.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            score = sum(box.overlaps(other) for other in taken) + (0 if inside else 100)
            score += 0.01 * sum(box.contains(px, py) for px, py in path)  # a preference, never a reason to drop
            if not leader:
                mine = _gap(box, own)
                score += sum(_gap(box, c) < mine for c in centres if c != own)
            if best_score is None or score < best_score:
                if best is not None:
                    best[0].remove()
                best, best_score = (artist, box), score
            else:
                artist.remove()
            if score == 0:
                break
        if best is None:
            continue
        if best_score >= 1 and not required:
            best[0].remove()
            continue
        taken.append(best[1])
        placed.append(best[0])
    return placed


def _sample_polyline(points: Sequence[tuple[float, float]], step: float) -> list[tuple[float, float]]:
    """Points every ``step`` pixels along a polyline in display space."""
    samples = []
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        count = max(int(math.hypot(x1 - x0, y1 - y0) / step), 1)
        samples += [(x0 + (x1 - x0) * i / count, y0 + (y1 - y0) * i / count) for i in range(count)]
    return samples


def _gap(box: Any, point: tuple[float, float]) -> float:
    """Distance from a display-space box to a point (0 inside)."""
    dx = max(box.x0 - point[0], 0.0, point[0] - box.x1)
    dy = max(box.y0 - point[1], 0.0, point[1] - box.y1)
    return math.hypot(dx, dy)


def plot_greedy_steps(result: Any, path: str | Path) -> Path:
    """Held-out accuracy at each greedy step: each ingredient alone, the soup with it (kept or rejected) and
    the soup so far. A candidate whose evaluation stopped early was proven unable to beat the soup: it is
    drawn as that upper bound, an arrow down from the soup's accuracy, not as a measured point."""
    from matplotlib.lines import Line2D

    from soupkit.report.layout import common_parts, shorten_middle

    history = list(result.history)
    figure = _figure(max(7.5, 0.45 * len(history) + 3), 5.0)
    axes = figure.add_subplot()
    best: list[float] = []
    current = math.nan
    for step in history:
        if step.accepted and _finite(step.candidate):
            current = step.candidate
        best.append(current)
    xs = [s.step for s in history]
    axes.step(xs, best, where="post", color="tab:blue", label="the soup so far")
    own = [(s.step, s.score) for s in history if _finite(s.score)]
    if own:
        axes.scatter(*zip(*own), marker="o", facecolors="none", edgecolors="grey", label="the ingredient alone")
    for accepted, colour, marker, label in ((True, "tab:green", "o", "soup + ingredient: kept"),
                                            (False, "tab:red", "x", "soup + ingredient: rejected")):
        points = [(s.step, s.candidate) for s in history if s.accepted == accepted and _finite(s.candidate)]
        if points:
            axes.scatter(*zip(*points), marker=marker, color=colour, label=label, zorder=3)
    extra: list[Any] = []
    bounds = [(s.step, best[i - 1]) for i, s in enumerate(history) if s.stopped_early and i and _finite(best[i - 1])]
    if bounds:
        values = [y for _, y in (*own, *bounds) if _finite(y)]
        drop = max((max(values) - min(values)) * 0.12, 0.002)
        axes.errorbar([x for x, _ in bounds], [y for _, y in bounds], yerr=[[drop] * len(bounds), [0] * len(bounds)],
                      uplims=True, fmt="none", ecolor="tab:orange", elinewidth=1.5, zorder=3)
        extra = [Line2D([], [], color="tab:orange", marker="$\\downarrow$", linestyle="none",
                                            markersize=10, label="soup + ingredient: stopped early, "
                                            "proven no better than the soup (upper bound)")]
    labels, _, _ = common_parts(result.names)
    axes.set_xticks(xs, [shorten_middle(labels[s.index], 18) for s in history], rotation=40, ha="right",
                    fontsize="small")
    axes.set_xlabel("ingredients in order of held-out accuracy (greedy steps)")
    axes.set_ylabel("held-out accuracy")
    _percent(axes)
    axes.set_title(f"Greedy soup: {len(result.ingredients)} of {len(result.names)} ingredients kept")
    axes.grid(alpha=0.3)
    handles, names = axes.get_legend_handles_labels()
    axes.legend(handles + extra, names + [h.get_label() for h in extra], loc="upper center",
                bbox_to_anchor=(0.5, -0.32), ncol=2, fontsize="small", frameon=False)
    return save_figure(figure, path)


#: marker style and legend entry of each kind of point in the soup scatter
_KIND_STYLE = {
    "ingredient": {"marker": "o", "color": "tab:grey", "s": 24, "label": "fine-tuned ingredients"},
    "zeroshot": {"marker": "s", "color": "tab:purple", "s": 70, "label": "zero-shot"},
    "uniform": {"marker": "D", "color": "tab:blue", "s": 70, "label": None},
    "greedy": {"marker": "*", "color": "tab:red", "s": 180, "label": None},
    "learned": {"marker": "P", "color": "tab:green", "s": 90, "label": None},
    "wise": {"marker": "h", "color": "tab:cyan", "s": 90, "label": None},
    "finetuned": {"marker": "^", "color": "tab:orange", "s": 70, "label": None},
}


def plot_soup_scatter(points: Sequence[Mapping[str, Any]], path: str | Path,
                      title: str = "Model soups: in-distribution vs distribution shift") -> Path:
    """Scatter of ``point["test"]`` (x) vs ``point["shift"]`` (y). ``point["kind"]`` picks the marker:
    ingredient, zeroshot, uniform, greedy, learned, wise (a WiSE-FT point), finetuned. Every point but the
    ingredients is in the legend under its own label, and so is the best ingredient (``point["best"]``, else
    the highest ``point["heldout"]``), drawn as a ringed dot. Non-finite points are left out."""
    figure = _figure(6.8, 5.8)
    axes = figure.add_subplot()
    shown = [p for p in points if _finite(p.get("test")) and _finite(p.get("shift"))]
    ingredients = [p for p in shown if p.get("kind", "ingredient") == "ingredient"]
    best = next((p for p in ingredients if p.get("best")), None)
    if best is None and any(_finite(p.get("heldout")) for p in ingredients):
        best = max((p for p in ingredients if _finite(p.get("heldout"))), key=lambda p: p["heldout"])
    labelled: set[str] = set()
    for point in shown:
        style = dict(_KIND_STYLE.get(point.get("kind", "ingredient"), _KIND_STYLE["ingredient"]))
        label = style.pop("label") or point.get("label")
        if point is best:  # its own legend entry: a label on the plot could hide a neighbour
            label = f"best ingredient on held-out: {Path(str(point.get('label', '?'))).name}"
            style.update(color="black", s=50, marker="o", facecolors="white", linewidths=1.5)
            style.pop("color")
            style["edgecolors"] = "black"
        if label in labelled:
            label = None
        labelled.add(label)
        axes.scatter([point["test"]], [point["shift"]], label=label,
                     zorder=2 if point.get("kind", "ingredient") == "ingredient" and point is not best else 3, **style)
    axes.set_xlabel("in-distribution test accuracy")
    axes.set_ylabel("mean accuracy under distribution shift")
    _percent(axes, "both")
    axes.margins(0.12)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if labelled - {None}:
        _legend_below(axes)
    return save_figure(figure, path)


def plot_wise_curve(points: Sequence[Any], path: str | Path) -> Path:
    """The WiSE-FT curve. ``points`` are ``SweepPoint``s. With test and shift accuracies: test (x) vs shift (y)
    through α, the endpoints labelled "zero-shot" and "fine-tuned", the chosen α starred, the other α labels
    placed where they overlap nothing (or left out); beside it, accuracy against α with the chosen α marked."""
    curve = [p for p in points if _finite(p.test) and _finite(p.shift)]
    figure = _figure(11.5 if curve else 6.4, 5.4)
    left = None
    if curve:
        left, right = figure.subplots(1, 2)
        xs, ys = [p.test for p in curve], [p.shift for p in curve]
        left.plot(xs, ys, "-o", color="tab:blue", markersize=4, label="WiSE-FT: (1-α)·zero-shot + α·fine-tuned",
                  zorder=2)
        for p in curve:
            if p.chosen:
                left.scatter([p.test], [p.shift], zorder=4, marker="*", color="tab:red", s=180,
                             label=f"chosen on held-out: α={p.alpha:g}")
        left.set_xlabel("in-distribution test accuracy")
        left.set_ylabel("mean accuracy under distribution shift")
        _percent(left, "both")
        left.margins(0.15)
        left.set_title("WiSE-FT: robustness vs accuracy")
        left.grid(alpha=0.3)
        _legend_below(left, 1)
    else:
        right = figure.add_subplot()
    held = [p for p in points if _finite(p.heldout)]
    right.plot([p.alpha for p in held], [p.heldout for p in held], "-o", color="tab:blue", markersize=4,
               label="held-out")
    if curve:
        right.plot([p.alpha for p in curve], xs, "--", color="tab:green", label="in-distribution test")
        right.plot([p.alpha for p in curve], ys, ":", color="tab:orange", label="mean under shift")
    for p in points:
        if p.chosen and _finite(p.heldout):
            right.axvline(p.alpha, color="tab:red", alpha=0.4, label=f"chosen α={p.alpha:g}")
    right.set_xlabel("α (0 = zero-shot, 1 = fine-tuned)")
    right.set_ylabel("accuracy")
    _percent(right)
    right.set_title("accuracy along the interpolation")
    right.grid(alpha=0.3)
    _legend_below(right)
    if left is not None:
        _label_alphas(left, curve)
    return save_figure(figure, path)


def _label_alphas(axes: Any, curve: Sequence[Any]) -> None:
    """Endpoints named (required), then every other α where it fits; α values at the same point (equal
    accuracies) share one label."""
    groups: dict[tuple[float, float], list[Any]] = {}
    for p in curve:
        groups.setdefault((round(p.test, 9), round(p.shift, 9)), []).append(p)
    labels = []
    for (x, y), group in groups.items():
        parts = []
        for p in group:
            parts.append("zero-shot (α=0)" if p.alpha == 0.0 else "fine-tuned (α=1)" if p.alpha == 1.0
                         else f"α={p.alpha:g}")
        required = any(p.alpha in (0.0, 1.0) or p.chosen for p in group)
        labels.append((x, y, ", ".join(parts), required))
    markers = [(x, y, 9 if any(p.chosen for p in group) else 3) for (x, y), group in groups.items()]
    place_labels(axes, labels, markers, lines=[(p.test, p.shift) for p in curve])


def plot_learned_weights(names: Sequence[str], weights: Sequence[float], path: str | Path,
                         title: str = "Learned soup: mixing weights") -> Path:
    """Bar chart of one weight per ingredient (the mean over tensors for a by-layer soup)."""
    from soupkit.report.layout import common_parts, shorten_middle

    figure = _figure(max(6.4, 0.5 * len(names) + 2), 4.4)
    axes = figure.add_subplot()
    labels, _, _ = common_parts([str(n) for n in names])
    axes.bar(range(len(weights)), list(weights), color="tab:blue")
    axes.axhline(1.0 / max(len(weights), 1), color="grey", linestyle="--", label="uniform soup")
    axes.set_xticks(range(len(labels)), [shorten_middle(label, 18) for label in labels], rotation=40, ha="right",
                    fontsize="small")
    axes.set_ylabel("weight")
    axes.set_title(title)
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def plot_search(result: Any, path: str | Path) -> Path:
    """A merge search: each candidate's held-out score (a candidate stopped early drawn at its proven upper
    bound, which lies below the best so far) and the best so far, against candidates scored."""
    candidates = list(result.candidates)
    figure = _figure(7.0, 4.5)
    axes = figure.add_subplot()
    counted = any(c.correct is not None for c in candidates)
    best, current = [], math.nan
    for c in candidates:
        if c.score is not None and not c.stopped_early and not (_finite(current) and c.score <= current):
            current = c.score
        best.append(current)
    xs = [c.index for c in candidates]
    axes.step(xs, best, where="post", color="tab:blue", label="best so far", zorder=3)
    full = [(c.index, c.score) for c in candidates if c.score is not None and not c.stopped_early]
    if full:
        axes.scatter(*zip(*full), s=14, color="tab:grey", label="candidate (full evaluation)")
    bounds = [(c.index, -c.fitness) for c in candidates if c.stopped_early and math.isfinite(c.fitness)]
    if bounds:
        axes.scatter(*zip(*bounds), s=14, marker="v", color="tab:orange",
                     label="stopped early (proven upper bound)")
    defaults = candidates[0] if candidates and candidates[0].point is None else None
    if defaults is not None and defaults.score is not None:
        axes.axhline(defaults.score, color="tab:purple", linestyle="--", linewidth=1, label="method at its defaults")
    axes.set_xlabel("candidates scored")
    axes.set_ylabel("held-out accuracy" if counted else "held-out score")
    if counted:
        _percent(axes)
    axes.set_title(f"Merge search ({result.method}, CMA-ES): {len(candidates)} candidates")
    axes.grid(alpha=0.3)
    _legend_below(axes)
    return save_figure(figure, path)
