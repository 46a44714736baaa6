"""Greedy soup (Wortsman et al., ICML 2022, https://arxiv.org/abs/2203.05482): the same selection as the paper's
procedure, computed with far fewer forward passes and reads.

The procedure (mlfoundations/model-soups ``main.py``): score every ingredient on the held-out set and sort best
first; the soup starts as the best ingredient; each next ingredient is tried once, and kept if the mean of the
soup's members plus it scores strictly better on the held-out set than the best so far (``accept="ge"``: at least
as well). Ties in the sort keep input order (a stable sort).

One arithmetic with ``soupkit merge --method linear``: the soup is kept as the members' running mean on the
evaluation device, and a candidate is one step of the ``linear`` method's own running mean
(``linear.mean_step``: ``lerp(mean, new, 1/(m+1))``) written into a preallocated buffer; accepting swaps two
buffers. The soup is then written by ``merge(members in selection order, "linear")``, so it equals that command's
output bit for bit and the candidate that was scored (N identical inputs come back bit-identical).

What makes this fast, without changing a single decision:
- individual scores come from the evaluator's cache when it has them;
- accepted ingredients are never re-read during the search and the set is never re-averaged (the final merge
  reads the members once more);
- with an ``Evaluator``, a candidate is evaluated with ``need_correct``: the evaluation stops as soon as the
  candidate cannot reach ``best_correct + 1`` correct examples (``best_correct`` for "ge"). Decisions are made on
  integer counts of correct examples, so they are identical to full evaluations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit import interrupt
from soupkit.errors import ParameterError, SoupkitError, unknown_choice
from soupkit.io import CheckpointReader, CheckpointSource
from soupkit.merging import uniform_soup
from soupkit.merging.api import merge_variants
from soupkit.merging.methods.linear import mean_step
from soupkit.report.plots import plot_greedy_steps, plot_soup_scatter
from soupkit.soups.common import SoupRun, mean_accuracy, read_tensors
from soupkit.soups.result import GreedyStep, SoupResult
from soupkit.soups.scoring import Score, Steps

ACCEPT_RULES = ("gt", "ge")


class NoScoreError(SoupkitError):
    """No ingredient has a finite held-out score, so there is nothing to start a soup from."""


def sort_by_score(scores: Sequence[Score]) -> list[int]:
    """Positions of the ingredients with a finite score, best first; ties keep input order (stable sort).

    Counts of correct examples are compared when every score has them on the same held-out size (exact),
    accuracies otherwise.
    """
    valid = [i for i, s in enumerate(scores) if s.valid]
    counted = all(scores[i].correct is not None for i in valid) and len({scores[i].n for i in valid}) <= 1
    if counted:
        return sorted(valid, key=lambda i: -scores[i].correct)  # type: ignore[operator]
    return sorted(valid, key=lambda i: -scores[i].accuracy)  # type: ignore[operator]


def hardest_first(scores: Sequence[Score]) -> torch.Tensor | None:
    """Held-out example order for candidate evaluations: most often misclassified by the ingredients first.

    A candidate that cannot beat the soup is usually wrong where the ingredients are, so putting those examples
    first makes its early stop come sooner. The count of correct examples, and so every decision, does not
    depend on the order. None when the ingredients' per-example masks are unknown (a plain callable evaluator).
    """
    masks = [s.correct_mask for s in scores if s.valid and s.correct_mask is not None]
    if not masks or len({len(m) for m in masks}) != 1:
        return None
    wrong = sum((~m.to(torch.bool)).to(torch.int32) for m in masks)
    return torch.sort(wrong, descending=True, stable=True).indices


def need_correct(best: Score, accept: str) -> int | None:
    """Correct held-out examples a candidate needs to be accepted (None when scores are not counted)."""
    if best.correct is None:
        return None
    return best.correct + 1 if accept == "gt" else best.correct


class RunningSoup:
    """The soup's members' running mean (accumulation dtype, evaluation device) and the next candidate, formed in
    place by the ``linear`` method's own step."""

    def __init__(self, run: SoupRun, first: CheckpointReader, device: torch.device):
        self.keys, self.device, self.acc_dtype = run.float_keys(first), device, run.acc_dtype
        self.mean = run.read_floats(first, self.keys, device)
        self.next = {k: torch.empty_like(v) for k, v in self.mean.items()}
        self.count = 1

    def candidate(self, reader: CheckpointReader) -> dict[str, torch.Tensor]:
        """The mean of the members and ``reader`` (each of its tensors read once)."""
        for key, tensor in read_tensors(reader, self.keys, self.device):
            mean_step(self.mean[key], tensor.to(self.acc_dtype), 1.0, self.count + 1, out=self.next[key])
        return self.next

    def accept(self) -> None:
        self.mean, self.next = self.next, self.mean
        self.count += 1


@interrupt.cooperative()  # Ctrl-C / SIGTERM stop it between steps, never inside a finaliser
def greedy_soup(
    checkpoints: Sequence[CheckpointSource],
    evaluator: Any,
    *,
    accept: str = "gt",
    prescreen: float | None = None,
    output: str | Path | None = None,
    report_dir: str | Path | None = None,
    progress: bool = False,
    **output_options: Any,
) -> SoupResult:
    """Greedy soup of ``checkpoints`` (paths or state dicts) judged by held-out accuracy.

    ``evaluator``: an ``Evaluator``, a recipe path/name, or a callable ``state_dict -> float | EvalResult``
    (callables receive CPU tensors that are reused after the call returns). ``accept``: "gt" (strictly
    better, the paper's rule) or "ge". ``prescreen``: skip ingredients whose own held-out accuracy is below it.
    ``output``: write the soup there (atomically, with provenance metadata); otherwise it is returned in
    ``.state_dict``. ``report_dir``: receives the record and plots, named after ``output`` (``soup.json``,
    ``soup_steps.png``, ``soup_scatter.png``; ``greedy.json`` ... without one). ``output_options``: the output
    options a soup honours (``soupkit.soups.common``; the table in docs/output.md), by candidates and the written
    soup alike; ``output`` may be any form a merge writes (file, shards, folder, ``.pt``, ``.ckpt``).
    """
    if accept not in ACCEPT_RULES:
        raise ParameterError("--accept: " + unknown_choice("rule", accept, ACCEPT_RULES))
    if prescreen is not None and not (isinstance(prescreen, (int, float)) and 0.0 <= prescreen <= 1.0):
        raise ParameterError(f"--prescreen: expected an accuracy in [0, 1], got {prescreen!r}")
    with SoupRun("greedy soup", checkpoints, evaluator, output=output, report_dir=report_dir,
                 output_options=output_options) as run:
        # 1. individual held-out scores (the evaluator's cache answers for files it has seen)
        scores = [run.judge.score(src) for src in run.scoring_sources]
        scored_at = time.perf_counter()
        order = sort_by_score(scores)
        if not order:
            raise NoScoreError(f"{run.names[0]}: none of the {len(run.names)} ingredients has a finite held-out "
                               f"score (NaN weights or outputs?); cannot start a soup")
        if prescreen is not None and scores[order[0]].accuracy < prescreen:  # type: ignore[operator]
            raise ParameterError(f"--prescreen {prescreen}: no ingredient reaches it (best held-out accuracy "
                                 f"{scores[order[0]].accuracy:.4f}, {run.names[order[0]]})")
        # 2. the search; 3. the soup, through the merge engine
        members, best, history, stats = _search(run, scores, order, accept, prescreen, progress)
        finished = time.perf_counter()
        stats = {"seconds": finished - run.started, "seconds_scoring": scored_at - run.started,
                 "seconds_greedy": finished - scored_at, "cached_scores": sum(s.cached for s in scores), **stats}
        result = SoupResult(
            method="greedy", names=run.names, ingredients=members,
            scores=[s.accuracy if s.valid else None for s in scores], history=history, score=best.accuracy,
            rule={"accept": accept, "prescreen": prescreen, "order": order, "heldout": run.judge.heldout},
            stats=stats,
        )
        return _publish(run, checkpoints, result)


def _publish(run: SoupRun, checkpoints: Sequence[CheckpointSource], result: SoupResult) -> SoupResult:
    """Write the soup (the linear method over the members in selection order, through the merge engine) and the
    report."""

    names, members = run.names, result.ingredients
    record = {"accept": result.rule["accept"], "prescreen": result.rule["prescreen"],
              "order": [names[i] for i in result.rule["order"]], "selected": [names[i] for i in members],
              "scores": dict(zip(names, result.scores)), "heldout_accuracy": result.score}
    selected = [checkpoints[i] for i in members]

    def write(out: Path | None, **options: Any) -> Any:
        # merge_variants, not merge: a soup of one ingredient is a legitimate outcome, not a user mistake
        return merge_variants(selected, "linear", [({}, out)], metadata={"soupkit.greedy": record},
                              base=run.base_for(selected), **options)[0]

    return run.finish(result, write, lambda name: _plots(run, result, name))


def _search(run: SoupRun, scores: list[Score], order: list[int], accept: str, prescreen: float | None,
            progress: bool) -> tuple[list[int], Score, list[GreedyStep], dict[str, Any]]:
    """Start from the best ingredient; try each next one once, in order, on the hardest examples first."""
    judge, names, first = run.judge, run.names, order[0]
    soup = RunningSoup(run, run.readers[first], judge.device)
    layout = run.candidates(run.readers[first], judge.device)
    members, best = [first], scores[first]
    history = [GreedyStep(0, first, names[first], best.accuracy, best.accuracy, True,
                          note="best held-out accuracy: starts the soup")]
    hardest = hardest_first([scores[i] for i in order])
    seen = full = candidates = 0
    passes_before = judge.forward_passes
    bar = Steps(len(order) - 1, progress, judge=judge)
    try:
        for position in order[1:]:
            interrupt.check()  # between two candidates (the evaluator also checks between batches)
            own = scores[position]
            if prescreen is not None and own.accuracy < prescreen:  # type: ignore[operator]
                history.append(GreedyStep(len(history), position, names[position], own.accuracy, None, False,
                                          note=f"skipped: own accuracy below prescreen {prescreen}"))
                bar.advance()
                continue
            need = need_correct(best, accept) if judge.is_evaluator else None
            result = judge.score(layout(soup.candidate(run.readers[position])), need_correct=need,
                                 use_cache=False, order=hardest)
            candidates += 1
            if result.n is not None:
                full += result.n
                seen += result.examples_seen if result.examples_seen is not None else result.n
            accepted = result.beats(best, accept)
            history.append(_step(len(history), position, names[position], own, result, accepted, need))
            if accepted:
                soup.accept()
                members.append(position)
                best = result
            bar.advance()
    finally:
        bar.close()
    for position, score in enumerate(scores):
        if not score.valid:
            history.append(GreedyStep(len(history), position, names[position], score.accuracy, None, False,
                                      note="no finite held-out score (NaN): never added"))
    stats: dict[str, Any] = {"candidates_evaluated": candidates, "examples_evaluated": seen,
                             "examples_full": full, "examples_saved": full - seen,
                             "early_stops": sum(step.stopped_early for step in history)}
    if passes_before is not None and judge.forward_passes is not None:
        stats["forward_passes"] = judge.forward_passes - passes_before
    return members, best, history, stats


def _step(step: int, position: int, name: str, own: Score, result: Score, accepted: bool,
          need: int | None) -> GreedyStep:
    note = ""
    if result.stopped_early:
        note = f"stopped early: cannot reach {need} correct of {result.n}"
    elif not result.valid:
        note = "candidate has no finite score"
    return GreedyStep(step, position, name, own.accuracy, None if result.stopped_early else result.accuracy,
                      accepted, stopped_early=result.stopped_early, examples_seen=result.examples_seen, note=note)


def _plots(run: SoupRun, result: SoupResult, name: Callable[[str], Path]) -> list[Path]:
    """The per-step plot, and the paper's scatter when the evaluator has test and shift sets."""
    files = [plot_greedy_steps(result, name("steps"))]
    judge = run.judge
    tests, shifts = judge.test_names, judge.shift_names
    if tests and shifts:
        valid = [i for i, s in enumerate(result.scores) if s is not None]
        sources = run.scoring_sources
        points = [{**_point(result.names[i], "ingredient", judge.accuracies(sources[i], tests + shifts), tests,
                            shifts), "heldout": result.scores[i]} for i in valid]
        members = [run.sources[i] for i in valid]
        uniform = uniform_soup(members, ema=run.ema, strip_prefix=run.options.strip_prefix,
                               base=run.base_for(members))
        points.append(_point(f"uniform soup ({len(valid)})", "uniform",
                             judge.accuracies(uniform, tests + shifts, use_cache=False), tests, shifts))
        soup = result.path if result.path is not None else result.state_dict
        points.append(_point(f"greedy soup ({len(result.ingredients)})", "greedy",
                             judge.accuracies(soup, tests + shifts, use_cache=False), tests, shifts))
        result.extra["scatter"] = points
        files.append(plot_soup_scatter(points, name("scatter")))
    return files


def _point(label: str, kind: str, accuracies: Mapping[str, float], tests: list[str], shifts: list[str]) -> dict:
    test, shift = mean_accuracy(accuracies, tests), mean_accuracy(accuracies, shifts)
    return {"label": label, "kind": kind, "test": math.nan if test is None else test,
            "shift": math.nan if shift is None else shift, "accuracies": dict(accuracies)}
