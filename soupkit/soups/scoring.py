"""One interface over the three kinds of evaluator a soup algorithm accepts.

- an ``Evaluator`` (``soupkit.eval``): scores paths through its cache, evaluates candidates on its own device,
  and honours ``need_correct`` (exact early stop);
- a recipe path or built-in recipe name, from which an ``Evaluator`` is built;
- any callable ``state_dict -> float | EvalResult`` (runs on the CPU; no early stop).

Scores are kept as integer counts of correct held-out examples whenever the evaluator reports them, so that
"better than the best so far" is decided on integers, exactly as a full evaluation would decide it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import ParameterError
from soupkit.eval import Evaluator
from soupkit.io import load_checkpoint


@dataclass
class Score:
    """A held-out score. ``correct``/``n`` are set when the evaluator counts examples (``Evaluator`` or a callable
    returning an ``EvalResult``); a plain float callable gives ``accuracy`` only."""

    accuracy: float | None
    correct: int | None = None
    n: int | None = None
    loss: float | None = None
    stopped_early: bool = False
    examples_seen: int | None = None
    cached: bool = False
    correct_mask: Any = None  # per-example correctness (bool tensor) when the evaluator gives it

    @property
    def valid(self) -> bool:
        """False for a model with no usable score: None, NaN accuracy, or a NaN loss (NaN weights/logits)."""
        if self.accuracy is None or not math.isfinite(self.accuracy):
            return False
        return not (self.loss is not None and math.isnan(self.loss))

    def beats(self, best: Score, accept: str) -> bool:
        """Whether this candidate is accepted against ``best`` under ``accept`` ("gt" or "ge")."""
        if not self.valid or self.stopped_early:
            return False
        if self.correct is not None and best.correct is not None and self.n == best.n:
            return self.correct > best.correct if accept == "gt" else self.correct >= best.correct
        assert self.accuracy is not None and best.accuracy is not None
        return self.accuracy > best.accuracy if accept == "gt" else self.accuracy >= best.accuracy


def is_evaluator(obj: Any) -> bool:
    """Duck-typed check for ``soupkit.eval.Evaluator`` (and test doubles with the same surface)."""
    return all(hasattr(obj, name) for name in ("evaluate", "heldout_name", "device", "dataset_names"))


def resolve_evaluator(evaluator: Any) -> Any:
    """An ``Evaluator``, built from a recipe path/name when given one; callables pass through."""
    if isinstance(evaluator, (str, Path)):

        return Evaluator.from_recipe(evaluator)
    if is_evaluator(evaluator) or callable(evaluator):
        return evaluator
    raise ParameterError(f"--eval: expected an Evaluator, a recipe path or a callable state_dict -> score, got a "
                         f"{type(evaluator).__name__}")


class Judge:
    """Scores checkpoints and candidate state dicts on the held-out set with whatever evaluator was given."""

    def __init__(self, evaluator: Any):
        self.evaluator = resolve_evaluator(evaluator)
        self.is_evaluator = is_evaluator(self.evaluator)
        #: a running rich Progress (the algorithm's step bar) evaluations add their per-batch line to
        self.live: Any = None
        if self.is_evaluator:
            self.heldout: str = self.evaluator.heldout_name
            self.device = torch.device(self.evaluator.device)
            # duck-typed evaluators predating example orders (or progress) are still welcome
            parameters = inspect.signature(self.evaluator.evaluate).parameters
            self.takes_order = "order" in parameters
            self.takes_progress = "progress" in parameters
        else:
            self.takes_order = False
            self.heldout = "heldout"
            self.device = torch.device("cpu")

    @property
    def forward_passes(self) -> int | None:
        return getattr(self.evaluator, "forward_passes", None) if self.is_evaluator else None

    @property
    def test_names(self) -> list[str]:
        # in-distribution test sets only: the evaluator's test_names include the shifts
        if not self.is_evaluator:
            return []
        shifts = set(getattr(self.evaluator, "shift_names", []) or [])
        return [n for n in getattr(self.evaluator, "test_names", []) or [] if n not in shifts]

    @property
    def shift_names(self) -> list[str]:
        return list(getattr(self.evaluator, "shift_names", []) or []) if self.is_evaluator else []

    def score(self, source: Any, *, need_correct: int | None = None, use_cache: bool | None = None,
              order: Any = None) -> Score:
        """Held-out score of a path or state dict. ``need_correct`` lets an ``Evaluator`` stop as soon as the
        candidate provably cannot reach that many correct examples; ``order`` is the example order to try."""
        if self.is_evaluator:
            options = {"order": order} if self.takes_order and order is not None and need_correct is not None else {}
            result = self.evaluator.evaluate(source, [self.heldout], need_correct=need_correct, use_cache=use_cache,
                                             **options, **self._progress())
            return _from_dataset(result.datasets[self.heldout])
        state = source if isinstance(source, Mapping) else load_checkpoint(source)
        return from_value(self.evaluator(state), self.heldout)

    def _progress(self) -> dict[str, Any]:
        return {"progress": self.live} if self.live is not None and self.takes_progress else {}

    def accuracies(self, source: Any, datasets: Sequence[str] | None = None, *,
                   use_cache: bool | None = None) -> dict[str, float]:
        """Accuracy on ``datasets`` (all of the evaluator's when None); callables give what they return."""
        if self.is_evaluator:
            result = self.evaluator.evaluate(source, None if datasets is None else list(datasets),
                                             use_cache=use_cache, **self._progress())
            return {name: dataset_score(r) for name, r in result.datasets.items()}
        state = source if isinstance(source, Mapping) else load_checkpoint(source)
        value = self.evaluator(state)
        if hasattr(value, "datasets"):
            return {name: dataset_score(r) for name, r in value.datasets.items()}
        score = from_value(value, self.heldout)
        return {self.heldout: score.accuracy if score.accuracy is not None else math.nan}


def dataset_score(result: Any) -> float:
    """A dataset result's score (accuracy, or mean log-likelihood for a causal LM on plain text); NaN if none."""
    value = getattr(result, "score", result.accuracy)
    return math.nan if value is None else float(value)


def _from_dataset(result: Any) -> Score:
    loss = getattr(result, "loss", None)
    accuracy = getattr(result, "score", getattr(result, "accuracy", None))  # higher is better
    return Score(
        accuracy=None if accuracy is None else float(accuracy),
        correct=None if result.correct is None else int(result.correct),
        n=None if result.n is None else int(result.n),
        loss=None if loss is None else float(loss),
        stopped_early=bool(getattr(result, "stopped_early", False)),
        examples_seen=getattr(result, "examples_seen", None),
        cached=bool(getattr(result, "cached", False)),
        correct_mask=None if getattr(result, "stopped_early", False) else getattr(result, "correct_mask", None),
    )


def from_value(value: Any, heldout: str = "heldout") -> Score:
    """A callable's return value (float, None, EvalResult or DatasetResult) as a ``Score``."""
    if value is None:
        return Score(None)
    datasets = getattr(value, "datasets", None)
    if datasets is not None:
        if heldout in datasets:
            return _from_dataset(datasets[heldout])
        if len(datasets) == 1:
            return _from_dataset(next(iter(datasets.values())))
        raise ParameterError(f"evaluator returned results for {sorted(datasets)} but no {heldout!r} dataset")
    if hasattr(value, "correct") and hasattr(value, "n"):
        return _from_dataset(value)
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        return Score(float(value))
    except (TypeError, ValueError):
        raise ParameterError(f"evaluator must return a float or an EvalResult, got a {type(value).__name__}") from None


class Steps:
    """A rich progress bar over an algorithm's steps on stderr (silent unless enabled). Given the ``judge``, the
    evaluations it runs meanwhile show their per-batch progress as a second line of the same display (two live
    displays cannot share a terminal)."""

    def __init__(self, total: int, enabled: bool, description: str = "greedy soup", judge: Judge | None = None):
        self._bar: Any = None
        self._judge = judge
        if enabled and total > 0:
            from rich import progress as p
            from rich.console import Console

            self._bar = p.Progress(p.SpinnerColumn(), p.TextColumn("{task.description}"), p.BarColumn(),
                                   p.MofNCompleteColumn(), p.TimeRemainingColumn(), p.TimeElapsedColumn(),
                                   console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task(description, total=total)
            self._bar.start()
            if judge is not None:
                judge.live = self._bar

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def describe(self, text: str) -> None:
        """Replace the bar's label (e.g. with the best score so far)."""
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            if self._judge is not None:
                self._judge.live = None
