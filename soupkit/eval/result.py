"""What an evaluation returns: per-dataset counts, per-example correctness and loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DatasetResult:
    """One dataset's score. ``accuracy`` is ``correct / n``, or None when the evaluation stopped early
    (``need_correct``): then ``correct`` counts the ``examples_seen`` first examples only and ``correct_mask``
    covers just those."""

    name: str
    correct: int
    n: int
    correct_mask: torch.Tensor  # bool, CPU, one per example in dataset order
    loss: float | None = None  # mean cross-entropy over the examples seen
    seconds: float = 0.0
    stopped_early: bool = False
    examples_seen: int = 0
    cached: bool = False

    @property
    def accuracy(self) -> float | None:
        if self.stopped_early or self.n == 0:
            return None
        return self.correct / self.n

    def __repr__(self) -> str:
        """One line, never the per-example mask: ``DatasetResult('heldout', 97.50% of 472)``."""
        if self.stopped_early:
            score = f"stopped early, {self.correct} of {self.examples_seen} seen correct"
        else:
            score = f"{_pct(self.accuracy)} of {self.n}"
        return f"DatasetResult({self.name!r}, {score}{', cached' if self.cached else ''})"

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "n": self.n,
                "loss": None if self.loss is None or math.isnan(self.loss) else self.loss,
                "seconds": round(self.seconds, 4), "stopped_early": self.stopped_early,
                "examples_seen": self.examples_seen, "cached": self.cached}


@dataclass
class EvalResult:
    """Scores of one checkpoint on several datasets (``result["heldout"]``, ``result.accuracy("heldout")``)."""

    datasets: dict[str, DatasetResult] = field(default_factory=dict)
    seconds: float = 0.0
    checkpoint: str | None = None  # a label: the path, or "<state dict>"
    fingerprint: str | None = None  # content fingerprint, when the cache computed one

    def __getitem__(self, name: str) -> DatasetResult:
        try:
            return self.datasets[name]
        except KeyError:
            from soupkit.errors import ParameterError, unknown_choice

            raise ParameterError(unknown_choice("dataset", name, self.datasets)) from None

    def __contains__(self, name: object) -> bool:
        return name in self.datasets

    def accuracy(self, name: str) -> float | None:
        return self[name].accuracy

    def mean_accuracy(self, names: list[str]) -> float | None:
        """Mean accuracy over ``names`` (e.g. the shift sets), None if any is missing or incomplete."""
        values = [self.datasets[n].accuracy if n in self.datasets else None for n in names]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        """A short summary, never whole tensors: ``EvalResult(soup.safetensors: heldout 97.50%, clean ...)``."""
        scores = ", ".join(f"{name} {_pct(r.accuracy) if not r.stopped_early else 'stopped early'}"
                           for name, r in self.datasets.items())
        return f"EvalResult({self.checkpoint or 'checkpoint'}: {scores or 'no datasets'}; {self.seconds:.1f} s)"

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "fingerprint": self.fingerprint, "seconds": round(self.seconds, 4),
                "datasets": {name: r.to_dict() for name, r in self.datasets.items()}}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def as_score(result: Any, heldout: str = "heldout") -> float:
    """A single number for soup algorithms: an ``EvalResult``'s held-out accuracy (its only dataset's, if it has
    one), a ``DatasetResult``'s accuracy, or a plain number as a float. NaN when there is no complete score."""
    from soupkit.errors import ParameterError

    if isinstance(result, EvalResult) or hasattr(result, "datasets"):
        datasets = result.datasets
        if heldout in datasets:
            result = datasets[heldout]
        elif len(datasets) == 1:
            result = next(iter(datasets.values()))
        else:
            raise ParameterError(f"as_score: the result has no {heldout!r} dataset (it has {sorted(datasets)})")
    if hasattr(result, "correct") and hasattr(result, "n"):
        accuracy = result.accuracy
        return math.nan if accuracy is None else float(accuracy)
    if isinstance(result, torch.Tensor) and result.numel() == 1:
        return float(result.item())
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return float(result)
    raise ParameterError(f"as_score: expected an EvalResult or a number, got a {type(result).__name__}")
