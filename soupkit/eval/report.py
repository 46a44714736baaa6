"""Scoring several checkpoints with one evaluator, and the report of it: a rich table (checkpoints x datasets,
plus the mean over the shift sets), JSON and CSV. Cells hold each dataset's score: accuracy (in percent in the
table), or for plain text under a causal LM the mean per-token log-likelihood (with the perplexity beside it).
``soupkit eval`` is ``evaluate_checkpoints`` + this report."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soupkit.errors import CheckpointError, OutputError, ParameterError
from soupkit.eval.evaluator import Evaluator
from soupkit.io.atomic import atomic_write_text
from soupkit.report.layout import display_names, name_cell

MEAN_SHIFT = "mean shift"


@dataclass
class EvalReport:
    """Results of several checkpoints on the same recipe."""

    recipe: str
    dataset_names: list[str]
    shift_names: list[str]
    results: list[Any] = field(default_factory=list)  # EvalResult per checkpoint, in input order
    device: str = "cpu"
    precision: str = "fp32"
    name: str | None = None  # the recipe's own name (its ``name:``), for the title

    def rows(self) -> list[dict[str, Any]]:
        """One dict per checkpoint: the score per dataset (accuracy, or mean per-token log-likelihood) and the mean
        over shift sets (None where missing)."""
        out = []
        for result in self.results:
            row: dict[str, Any] = {"checkpoint": result.checkpoint}
            for name in self.dataset_names:
                row[name] = result.datasets[name].score if name in result.datasets else None
            if self.shift_names:
                row[MEAN_SHIFT] = result.mean_accuracy(self.shift_names)
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "device": self.device, "precision": self.precision,
                "datasets": self.dataset_names, "shifts": self.shift_names,
                "checkpoints": [{**r.to_dict(), "mean_shift": r.mean_accuracy(self.shift_names)}
                                for r in self.results]}

    def to_csv(self) -> str:
        columns = ["checkpoint", *self.dataset_names, *([MEAN_SHIFT] if self.shift_names else [])]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in self.rows():
            writer.writerow(["" if row[c] is None else (f"{row[c]:.6f}" if isinstance(row[c], float) else row[c])
                             for c in columns])
        return buffer.getvalue()

    def table(self) -> Any:
        """A rich table: accuracy in percent per dataset (shift sets in italics) and their mean; log-likelihood
        sets show the mean per-token log-likelihood and the perplexity."""
        from rich.table import Table

        likelihood = {n for r in self.results for n, d in r.datasets.items() if d.metric == "log_likelihood"}
        unit = "accuracy %" + (", log-likelihood per token (perplexity)" if likelihood else "")
        table = Table(title=f"{self.name or Path(self.recipe).stem}  ({self.device}, {self.precision}), {unit}",
                      title_justify="left")
        labels, _ = display_names([str(r.checkpoint) for r in self.results])
        table.add_column("checkpoint")
        for name in self.dataset_names:
            table.add_column(name, justify="right", no_wrap=True,
                             header_style="italic" if name in self.shift_names else None)
        if self.shift_names:
            table.add_column(MEAN_SHIFT, justify="right", style="bold", no_wrap=True)
        for label, row, result in zip(labels, self.rows(), self.results):
            cells = [name_cell(label), *(_cell(result.datasets.get(name), row[name]) for name in self.dataset_names)]
            if self.shift_names:
                shifts_likelihood = all(n in likelihood for n in self.shift_names)
                cells.append(_likelihood(row[MEAN_SHIFT]) if shifts_likelihood else _pct(row[MEAN_SHIFT]))
            table.add_row(*cells)
        return table

    def notes(self) -> list[str]:
        """Lines to print under the table: the common folder, the shift sets, how many scores were cached."""
        _, caption = display_names([str(r.checkpoint) for r in self.results], "checkpoints")
        notes = [caption] if caption else []
        if self.shift_names:
            notes.append(f"mean shift = mean over {', '.join(self.shift_names)}")
        cached = sum(r.datasets[n].cached for r in self.results for n in r.datasets)
        if cached:
            notes.append(f"{cached} of {sum(len(r.datasets) for r in self.results)} scores from the score cache "
                         "(--no-cache to score again)")
        return notes

    def write(self, path: str | Path, kind: str) -> Path:
        """Write the JSON (``kind="json"``) or CSV report atomically."""
        text = json.dumps(self.to_dict(), indent=2) + "\n" if kind == "json" else self.to_csv()
        return _write_text(Path(path), text, f"--{kind}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _likelihood(value: float | None) -> str:
    import math

    return "-" if value is None else f"{value:.4f} ({math.exp(-value) if value > -700 else math.inf:.2f})"


def _cell(result: Any, value: float | None) -> str:
    if result is not None and result.metric == "log_likelihood":
        return _likelihood(value)
    return _pct(value)


def _check_output(path: Path, option: str) -> None:
    if path.is_dir():
        raise OutputError(f"{option}: {path} is a directory")
    if not path.parent.is_dir():
        raise OutputError(f"{option}: folder {path.parent} does not exist")


def _write_text(path: Path, text: str, option: str) -> Path:

    _check_output(path, option)
    return atomic_write_text(path, text)


def evaluate_checkpoints(checkpoints: Sequence[str | Path], recipe: Any, *, device: str | None = None,
                         datasets: Sequence[str] | None = None, cache_dir: str | Path | None = None,
                         use_cache: bool = True, progress: bool = False, json_path: str | Path | None = None,
                         csv_path: str | Path | None = None) -> EvalReport:
    """Score every checkpoint on the recipe's datasets (all, or ``datasets``) with one evaluator; optionally
    write the JSON / CSV report (by the first process only, under torchrun).

    Inputs and output folders are checked before the model is built, so a typo fails in milliseconds.
    """

    if isinstance(checkpoints, (str, Path)) or not checkpoints:
        raise ParameterError("give at least one checkpoint to evaluate")
    for path in checkpoints:
        if not Path(path).exists():
            raise CheckpointError(f"{path}: no such file")
    outputs = {kind: Path(p) for kind, p in (("json", json_path), ("csv", csv_path)) if p is not None}
    for kind, out in outputs.items():
        _check_output(out, f"--{kind}")
    ev = recipe if isinstance(recipe, Evaluator) else Evaluator.from_recipe(recipe, device=device,
                                                                            cache_dir=cache_dir, use_cache=use_cache)
    names = list(datasets) if datasets else ev.dataset_names
    report = EvalReport(ev.recipe.source, names, [n for n in ev.shift_names if n in names], device=str(ev.device),
                        precision=ev.precision, name=ev.recipe.name)
    for path in checkpoints:
        report.results.append(ev.evaluate(path, names, progress=progress))
    if ev.rank == 0:
        for kind, out in outputs.items():
            report.write(out, kind)
    return report
