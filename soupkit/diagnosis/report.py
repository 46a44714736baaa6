"""What ``soupkit.doctor`` returns: every number behind the verdicts, as a rich table, a JSON object and a heatmap
of the pairwise angles between task vectors."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soupkit.io.atomic import write_small_file
from soupkit.report.layout import Wrapped, display_names, folder_name, name_cell, print_table
from soupkit.report.layout import console as make_console

#: JSON schema version of ``DoctorReport.to_dict()``
SCHEMA = 1


def _matrix(values: list[list[float | None]]) -> list[list[float | None]]:
    return [[None if v is None or not math.isfinite(v) else round(v, 10) for v in row] for row in values]


@dataclass
class DoctorReport:
    """Per-ingredient statistics and verdicts. Matrices are N×N over ``names`` (the inputs, in order), with None in
    the rows and columns of incompatible inputs. ``centred``: without a base the vectors compared are θᵢ − mean θ
    (their angles are not the paper's φ, which is measured from the pretrained initialisation)."""

    names: list[str]
    base: str | None
    centred: bool
    norm: list[float | None]  # ‖θᵢ − θ_base‖ (or ‖θᵢ − mean θ‖ when centred)
    weight_norm: list[float | None]  # ‖θᵢ‖
    to_uniform: list[float | None]  # ‖θᵢ − uniform soup‖ (the soup of the compatible inputs)
    distance: list[list[float | None]]
    cosine: list[list[float | None]]
    modules: dict[str, dict[str, Any]]  # module -> {"parameters", "cosine", "distance"}
    verdict: dict[str, str]
    reason: dict[str, str]
    overall: str
    overall_reason: str
    scores: dict[str, float] = field(default_factory=dict)  # held-out accuracy (with an evaluator)
    barrier: dict[str, float] = field(default_factory=dict)
    path: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [[α, accuracy], ...] from the best
    best: str | None = None
    uniform_score: float | None = None
    heldout: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def angle(self) -> list[list[float | None]]:
        """Pairwise angles in degrees (the paper's φ when a base is given)."""
        return [[None if c is None else math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in row]
                for row in self.cosine]

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema": SCHEMA, "names": self.names, "base": self.base, "centred": self.centred,
            "vectors": "theta_i - mean(theta)" if self.centred else "theta_i - theta_base",
            "cosine": _matrix(self.cosine), "distance": _matrix(self.distance), "angle": _matrix(self.angle),
            "norm": self.norm, "weight_norm": self.weight_norm, "distance_to_uniform": self.to_uniform,
            "modules": {m: {**v, "cosine": _matrix(v["cosine"]), "distance": _matrix(v["distance"])}
                        for m, v in self.modules.items()},
            "verdict": self.verdict, "reason": self.reason, "overall": self.overall,
            "overall_reason": self.overall_reason, "stats": self.stats,
        }
        if self.scores:
            data.update({"heldout": self.heldout, "scores": self.scores, "best": self.best,
                         "barrier": self.barrier, "path": self.path, "uniform_score": self.uniform_score})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DoctorReport:
        """The report ``to_dict()`` wrote (e.g. ``soupkit doctor --json``, ``demo.json``'s ``doctor``)."""
        return cls(names=data["names"], base=data["base"], centred=data["centred"], norm=data["norm"],
                   weight_norm=data["weight_norm"], to_uniform=data["distance_to_uniform"],
                   distance=data["distance"], cosine=data["cosine"], modules=data["modules"],
                   verdict=data["verdict"], reason=data["reason"], overall=data["overall"],
                   overall_reason=data["overall_reason"], scores=data.get("scores", {}),
                   barrier=data.get("barrier", {}), path=data.get("path", {}), best=data.get("best"),
                   uniform_score=data.get("uniform_score"), heldout=data.get("heldout"), stats=data["stats"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def order(self) -> list[int]:
        """Input positions for display: by held-out score (best first) when known, else input order."""
        if not self.scores:
            return list(range(len(self.names)))
        return sorted(range(len(self.names)), key=lambda i: -self.scores.get(self.names[i], -math.inf))

    @property
    def angles_by_construction(self) -> bool:
        """True when the angles carry no information: two inputs without a base give θ₁ − m = −(θ₂ − m), so
        their angle is 180° whatever the checkpoints are."""
        compared = [i for i in range(len(self.names)) if self.cosine[i][i] is not None]
        return self.centred and len(compared) <= 2

    def table(self) -> Any:
        """A rich table: one row per ingredient, its numbers and its verdict (accuracies in %, barriers in
        points). Why each flagged ingredient got its verdict is in ``notes()``, wrapped under the table, so it is
        never cropped at any width."""
        from rich.table import Table

        table = Table(title=f"soupkit doctor: {self.overall}")
        # without a base the vector compared *is* the distance to the uniform soup: one column, not two equal ones
        columns = ["ingredient", "to uniform" if self.centred else "‖τ‖"]
        if not self.centred:
            columns.append("to uniform")
        if not self.angles_by_construction:
            columns.append("median angle" if self.centred else "median φ")
        if self.scores:
            columns += ["held-out %", "barrier pts"]
        for column in [*columns, "verdict"]:
            table.add_column(column, justify="left" if column in ("ingredient", "verdict") else "right")
        labels, caption = display_names(self.names, "ingredients")
        angles = self.angle
        for i in self.order():
            name = self.names[i]
            others = [j for j in range(len(self.names)) if j != i]
            row: list[Any] = [name_cell(labels[i]), _num(self.norm[i])]
            if not self.centred:
                row.append(_num(self.to_uniform[i]))
            if not self.angles_by_construction:
                row.append(_num(_median([angles[i][j] for j in others]), "°"))
            if self.scores:
                bound = "≥" if name in self.stats.get("barrier_lower_bound", ()) else ""  # the early stop proved it
                row += [_pct(self.scores.get(name)),
                        "best" if name == self.best else bound + _points(self.barrier.get(name))]
            word = self.verdict[name]
            colour = {"soupable": "green", "duplicate": "yellow"}.get(word, "red")
            row.append(Wrapped(word, colour, separators="_"))
            table.add_row(*row)
        table.caption = caption
        table.caption_justify = "left"
        return table

    def notes(self) -> list[str]:
        """What to print under the table, one paragraph each: why each flagged ingredient got its verdict, the
        overall reason, what the vectors are, the per-module angles."""

        labels = dict(zip(self.names, display_names(self.names)[0]))
        notes = [f"{labels[n]}: {self.verdict[n]}, {why}" for n in (self.names[i] for i in self.order())
                 if (why := self.reason.get(n))]
        notes.append(f"{self.overall}: {self.overall_reason}.")
        if self.angles_by_construction:
            notes.append("Vectors: θᵢ − mean θ (no --base). With two inputs they are opposite by construction "
                         "(180°), so no angle is shown; give --base for the paper's angle φ.")
        else:
            notes.append("Vectors: θᵢ − mean θ (no --base; angles from the mean, not the paper's φ)."
                         if self.centred else "Vectors: θᵢ − θ_base; φ is the angle between two of them.")
        if self.scores:
            notes.append("held-out: accuracy in %; barrier: how far, in points, held-out accuracy on the straight "
                         f"path from the best ingredient{f' ({labels[self.best]})' if self.best in labels else ''} "
                         "dips below the line between the two endpoints' accuracies (≥: a lower bound, the "
                         "evaluation stopped once the dip was past the threshold).")
        module = self.module_note()
        if module:
            notes.append(module)
        return notes

    def print(self, console: Any = None) -> None:
        """The table fitted to the console's width, then ``notes()`` wrapped to it."""

        out = console if console is not None else make_console()
        print_table(self.table(), out)
        for note in self.notes():
            out.print(note, highlight=False, markup=False)

    def module_note(self) -> str:
        """One line: the median pairwise angle within each module, over the inputs not flagged (nothing when the
        angles hold by construction)."""
        if self.angles_by_construction:
            return ""
        keep = [i for i, n in enumerate(self.names) if self.verdict[n] == "soupable"]
        parts = []
        for module, data in self.modules.items():
            values = [math.degrees(math.acos(max(-1.0, min(1.0, data["cosine"][i][j])))) for i in keep for j in keep
                      if i < j and data["cosine"][i][j] is not None]
            median = _median(values)
            if median is not None:
                parts.append(f"{module} {median:.0f}°")
        return "median angle per module (soupable inputs): " + ", ".join(parts) if parts else ""

    def write_json(self, path: str | Path, *, inputs: Any = (), option: str = "--json") -> Path:

        return write_small_file(path, self.to_json().encode(), inputs=inputs, option=option)

    def plot(self, path: str | Path, *, inputs: Any = (), option: str = "--plot") -> Path:
        """Write ``png()`` to ``path`` atomically."""

        return write_small_file(path, self.png(), inputs=inputs, option=option)

    def png(self) -> bytes:
        """A heatmap of the pairwise angles (degrees), ingredients ordered by held-out score when known."""
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png")
        return buffer.getvalue()

    def figure(self) -> Any:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        order = [i for i in self.order() if self.cosine[i][i] is not None]
        n = len(order)
        figure = Figure(figsize=(max(5.5, 0.6 * n + 3.5), max(4.5, 0.55 * n + 2.5)), dpi=110, layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        angles = self.angle
        grid = [[math.nan if angles[i][j] is None or i == j else angles[i][j] for j in order] for i in order]
        top = max(90.0, max((v for row in grid for v in row if math.isfinite(v)), default=90.0))
        image = axes.imshow(grid, cmap="viridis_r", vmin=0, vmax=top)
        labels = short_names([self.names[i] for i in order])
        marks = [_mark(self.verdict[self.names[i]]) for i in order]
        if self.scores:
            labels = [f"{label} ({100 * self.scores[self.names[i]]:.1f}%)" if self.names[i] in self.scores else label
                      for label, i in zip(labels, order)]
        labels = [label + mark for label, mark in zip(labels, marks)]
        axes.set_xticks(range(n), labels, rotation=45, ha="right", fontsize="small")
        axes.set_yticks(range(n), labels, fontsize="small")
        if n <= 16:
            for r in range(n):
                for c in range(n):
                    if math.isfinite(grid[r][c]):
                        axes.text(c, r, f"{grid[r][c]:.0f}", ha="center", va="center", fontsize="small",
                                  color="black" if grid[r][c] < 0.55 * top else "white")
        figure.colorbar(image, ax=axes, label="angle between task vectors (°)")
        start = "the mean (no base given)" if self.centred else "the base"
        order_note = "ordered by held-out accuracy" if self.scores else "in input order"
        flagged = "; * flagged, see the table" if any(m for m in marks) else ""
        axes.set_title(f"{self.overall}: angles from {start}\n{order_note}{flagged}", fontsize="medium")
        return figure


def _mark(word: str) -> str:
    return "" if word == "soupable" else f" *{word}"


def short_names(names: list[str]) -> list[str]:
    """File names without a shared folder and the .safetensors suffix; folders by their name."""

    shown = [folder_name(n) for n in names]
    stems = [Path(n).name.removesuffix(".safetensors") for n in shown]
    return stems if len(set(stems)) == len(stems) else shown


def _median(values: list[float | None]) -> float | None:
    import statistics

    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}{unit}"


def _pct(value: float | None) -> str:
    """An accuracy in % (the column header says so)."""
    return "-" if value is None else f"{100 * value:.2f}"


def _points(value: float | None) -> str:
    """A barrier, a drop in accuracy, in points (the column header says so): 0.1463 -> 14.63."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"
