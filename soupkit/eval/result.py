"""What an evaluation returns: per-dataset counts, per-example correctness and loss.

Two kinds of dataset score, both "higher is better" in ``DatasetResult.score``:

- ``metric == "accuracy"`` (classifiers, multiple choice): ``correct`` / ``n``, a per-example ``correct_mask``,
  and the mean cross-entropy as ``loss``. Exact early stop (``need_correct``) applies to these only.
- ``metric == "log_likelihood"`` (a causal LM on plain text): the mean per-token log-likelihood over all scored
  tokens (``score``; ``perplexity`` = exp(-score)), per-example values (each example's mean per-token
  log-likelihood) instead of a correctness mask, ``correct`` / ``correct_mask`` None and ``accuracy`` None.
  ``loss`` is the mean per-token negative log-likelihood (= -score).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from soupkit.errors import ParameterError, unknown_choice


@dataclass
class DatasetResult:
    """One dataset's score. ``accuracy`` is ``correct / n``, or None when the evaluation stopped early
    (``need_correct``): then ``correct`` counts the ``examples_seen`` first examples only and ``correct_mask``
    covers just those."""

    name: str
    correct: int | None  # None for log-likelihood datasets
    n: int
    correct_mask: torch.Tensor | None  # bool, CPU, one per example in dataset order (None: log-likelihood)
    loss: float | None = None  # mean cross-entropy over the examples seen (per token for log-likelihood)
    seconds: float = 0.0
    stopped_early: bool = False
    examples_seen: int = 0
    cached: bool = False
    metric: str = "accuracy"  # or "log_likelihood"
    values: torch.Tensor | None = None  # log-likelihood: float, CPU, each example's mean per-token value
    tokens: int | None = None  # log-likelihood: tokens scored

    @property
    def accuracy(self) -> float | None:
        if self.metric != "accuracy" or self.stopped_early or self.n == 0 or self.correct is None:
            return None
        return self.correct / self.n

    def __repr__(self) -> str:
        """One line, never the per-example mask: ``DatasetResult('heldout', 97.50% of 472)``."""
        if self.stopped_early:
            score = f"stopped early, {self.correct} of {self.examples_seen} seen correct"
        else:
            score = f"{_pct(self.accuracy)} of {self.n}"
        return f"DatasetResult({self.name!r}, {score}{', cached' if self.cached else ''})"

    @property
    def score(self) -> float | None:
        """The dataset's number, higher is better: accuracy, or the mean per-token log-likelihood."""
        if self.metric == "accuracy":
            return self.accuracy
        return None if self.loss is None else -self.loss

    @property
    def perplexity(self) -> float | None:
        """exp(mean per-token negative log-likelihood) for log-likelihood datasets, else None."""
        if self.metric != "log_likelihood" or self.loss is None:
            return None
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def to_dict(self) -> dict[str, Any]:
        out = {"metric": self.metric, "score": self.score, "accuracy": self.accuracy, "correct": self.correct,
               "n": self.n, "loss": None if self.loss is None or math.isnan(self.loss) else self.loss,
               "seconds": round(self.seconds, 4), "stopped_early": self.stopped_early,
               "examples_seen": self.examples_seen, "cached": self.cached}
        if self.metric == "log_likelihood":
            out.update(perplexity=self.perplexity, tokens=self.tokens)
        return out


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

            raise ParameterError(unknown_choice("dataset", name, self.datasets)) from None

    def __contains__(self, name: object) -> bool:
        return name in self.datasets

    def accuracy(self, name: str) -> float | None:
        return self[name].accuracy

    def mean_accuracy(self, names: list[str]) -> float | None:
        """Mean score over ``names`` (e.g. the shift sets): accuracy, or log-likelihood when every one of them is
        a log-likelihood set; None if any is missing or incomplete, or the metrics differ."""
        found = [self.datasets[n] for n in names if n in self.datasets]
        if len(found) != len(names) or len({r.metric for r in found}) > 1:
            return None
        values = [r.score for r in found]
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
    """A single number for soup algorithms: an ``EvalResult``'s held-out score (its only dataset's, if it has
    one), a ``DatasetResult``'s score (accuracy, or mean per-token log-likelihood), or a plain number as a float.
    NaN when there is no complete score."""

    if isinstance(result, EvalResult) or hasattr(result, "datasets"):
        datasets = result.datasets
        if heldout in datasets:
            result = datasets[heldout]
        elif len(datasets) == 1:
            result = next(iter(datasets.values()))
        else:
            raise ParameterError(f"as_score: the result has no {heldout!r} dataset (it has {sorted(datasets)})")
    if hasattr(result, "correct") and hasattr(result, "n"):
        value = getattr(result, "score", result.accuracy)
        return math.nan if value is None else float(value)
    if isinstance(result, torch.Tensor) and result.numel() == 1:
        return float(result.item())
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return float(result)
    raise ParameterError(f"as_score: expected an EvalResult or a number, got a {type(result).__name__}")
