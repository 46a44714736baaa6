"""What a soup algorithm returns: the soup (in memory or written), how it was chosen, and a JSON-able record.

One ``SoupResult`` type serves the greedy soup, the WiSE-FT sweep and the learned soup; ``history`` holds the
algorithm's own step records (``GreedyStep``, ``SweepPoint`` or ``LearnedWeights``) and ``print_table()`` renders
them with the matching table from ``soupkit.report.tables``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from soupkit.errors import OutputError
from soupkit.io.atomic import check_report_path
from soupkit.report.html import current_command
from soupkit.report.layout import print_table
from soupkit.report.tables import soup_table


@dataclass
class GreedyStep:
    """One ingredient's turn in the greedy soup (step 0 is the best ingredient, which starts the soup)."""

    step: int
    index: int  # position in the input list
    name: str
    score: float | None  # the ingredient's own held-out accuracy (None: no finite score)
    candidate: float | None  # held-out accuracy of soup + this ingredient (None: not evaluated or stopped early)
    accepted: bool
    stopped_early: bool = False
    examples_seen: int | None = None  # held-out examples the candidate evaluation looked at
    note: str = ""  # why an ingredient was skipped, or what an early stop proved

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass
class SweepPoint:
    """One α of a WiSE-FT sweep: accuracy on every dataset the evaluator scored."""

    alpha: float
    accuracies: dict[str, float]
    heldout: float | None
    test: float | None = None  # mean accuracy over the in-distribution test sets
    shift: float | None = None  # mean accuracy over the distribution-shift sets
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass
class LearnedWeights:
    """The learned soup's mixing weights for one tensor (``key="*"`` when one weight per ingredient is shared)."""

    key: str
    weights: list[float]

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


#: per soup algorithm (``SoupRun``'s label): its name and the plots it draws, which name its report files
REPORTS = {"greedy soup": ("greedy", ("steps", "scatter")), "learned soup": ("learned", ("weights",)),
           "WiSE-FT sweep": ("wise", ("curve",))}


@dataclass
class ReportFiles:
    """Where a soup's report goes (its JSON record and plots), decided and checked before any work.

    Named after the soup's output (``-o soup.safetensors`` -> ``soup.json``, ``soup_steps.png``), so two soups
    written to one folder never replace each other's report; without an output, after the algorithm
    (``greedy.json``). Like a checkpoint, an existing report file is replaced only with ``force``.
    """

    folder: Path
    stem: str
    kinds: tuple[str, ...]

    @classmethod
    def plan(cls, algorithm: str, folder: str | Path, output: str | Path | None) -> ReportFiles:
        name, kinds = REPORTS[algorithm]
        stem = name if output is None else Path(str(output).rstrip("/\\")).name
        if output is not None and Path(stem).suffix:
            stem = Path(stem).stem
        return cls(Path(folder), stem, kinds)

    @property
    def json(self) -> Path:
        return self.folder / f"{self.stem}.json"

    def plot(self, kind: str) -> Path:
        if kind not in self.kinds:
            raise KeyError(f"{kind!r}: not one of this soup's plots {self.kinds}")
        return self.folder / f"{self.stem}_{kind}.png"

    def all(self) -> list[Path]:
        return [self.json, *(self.plot(kind) for kind in self.kinds)]

    def check(self, *, inputs: Any = (), force: bool = False) -> None:
        """Refuse, before any work, a report file that exists (without ``force``), is an input, or cannot be
        written; the folder is created by ``finish`` if it is missing and its parent exists."""

        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"--report-dir: {self.folder} is a file, not a folder")
        if not self.folder.exists():
            return
        for path in self.all():
            check_report_path(path, inputs=inputs, option="--report-dir")
            if path.exists() and not force:
                raise OutputError(f"{path} exists (the report of an earlier soup); pass --force to replace it, or "
                                  "--report-dir / another -o name to keep both")


@dataclass
class SoupResult:
    """The outcome of ``greedy_soup``, ``wise_sweep`` or ``learned_soup``.

    ``state_dict`` holds the soup when no ``output`` was given; otherwise ``path`` names the written file.
    ``ingredients`` are positions in the input list, in the order they entered the soup; ``scores`` are the
    individual held-out accuracies by input position (None where an input had no finite score).
    """

    method: str
    names: list[str]
    ingredients: list[int]
    scores: list[float | None]
    history: list[Any]
    score: float | None  # held-out accuracy of the soup
    state_dict: dict[str, Any] | None = None
    path: Path | None = None
    rule: dict[str, Any] = field(default_factory=dict)  # the options that define the result (accept, alphas ...)
    stats: dict[str, Any] = field(default_factory=dict)  # timings, forward passes, examples saved
    extra: dict[str, Any] = field(default_factory=dict)  # algorithm-specific figures (scatter points, weights)
    report_files: list[Path] = field(default_factory=list)

    @property
    def chosen_names(self) -> list[str]:
        return [self.names[i] for i in self.ingredients]

    @property
    def alpha(self) -> float | None:
        """The chosen α of a WiSE-FT sweep (None for other methods)."""
        return self.extra.get("alpha")

    def __repr__(self) -> str:
        """A short summary, never the tensors: method, held-out score, what was chosen, where it was written."""
        score = "n/a" if self.score is None or not math.isfinite(self.score) else f"{100 * self.score:.2f}%"
        parts = [f"{self.method}", f"held-out {score}"]
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha:g}")
        else:
            chosen = self.chosen_names
            shown = ", ".join(chosen[:4]) + (f", ... ({len(chosen)} in all)" if len(chosen) > 4 else "")
            parts.append(f"{len(chosen)} of {len(self.names)} ingredients [{shown}]")
        parts.append(f"written to {self.path}" if self.path is not None else
                     f"state_dict of {len(self.state_dict or {})} tensors")
        return f"SoupResult({'; '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """Everything but the tensors, as plain JSON types (NaN becomes null)."""
        return _clean({
            "method": self.method,
            "names": self.names,
            "ingredients": self.ingredients,
            "chosen": self.chosen_names,
            "scores": self.scores,
            "score": self.score,
            "path": str(self.path) if self.path is not None else None,
            "rule": self.rule,
            "history": [step.to_dict() for step in self.history],
            "stats": self.stats,
            "extra": self.extra,
            "report_files": [str(p) for p in self.report_files],
            "command": current_command(),
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def table(self) -> Any:
        """A ``rich.table.Table`` of the history."""

        return soup_table(self)

    def print_table(self, console: Any = None) -> None:
        """Print the history table fitted to the console's width (stderr by default, so stdout stays clean for
        pipes)."""

        print_table(self.table(), console, stderr=True)


def _clean(value: Any) -> Any:
    """Plain JSON types: NaN/Inf -> None, Paths -> str, tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
