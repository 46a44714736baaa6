"""Greedy soup (Wortsman et al., ICML 2022, https://arxiv.org/abs/2203.05482): the same selection as the paper's
procedure, computed with far fewer forward passes and reads.

The procedure (mlfoundations/model-soups ``main.py``): score every ingredient on the held-out set and sort best
first; the soup starts as the best ingredient; each next ingredient is tried once, and kept if the mean of the
soup's members plus it scores strictly better on the held-out set than the best so far (``accept="ge"``: at least
as well). Ties in the sort keep input order (a stable sort).

What makes this fast, without changing a single decision:
- individual scores come from the evaluator's cache when it has them;
- the soup is kept as a running fp32 SUM on the evaluation device; a candidate is ``(sum + new) / (m + 1)``
  written into preallocated buffers, so accepted ingredients are never re-read and the set is never re-averaged;
  accepting swaps two buffers;
- with an ``Evaluator``, a candidate is evaluated with ``need_correct``: the evaluation stops as soon as the
  candidate cannot reach ``best_correct + 1`` correct examples (``best_correct`` for "ge"). Decisions are made on
  integer counts of correct examples, so they are identical to full evaluations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import ParameterError, SoupkitError, unknown_choice
from soupkit.io import CheckpointSource, check_output_path, provenance_metadata, save_checkpoint
from soupkit.io.provenance import ingredient_record
from soupkit.merging.engine import check_compatible
from soupkit.soups.result import GreedyStep, SoupResult
from soupkit.soups.scoring import (
    Judge,
    Score,
    Steps,
    close_all,
    input_name,
    open_inputs,
    protected_files,
    read_tensors,
)

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


def greedy_soup(
    checkpoints: Sequence[CheckpointSource],
    evaluator: Any,
    *,
    accept: str = "gt",
    prescreen: float | None = None,
    output: str | Path | None = None,
    force: bool = False,
    report_dir: str | Path | None = None,
    progress: bool = False,
) -> SoupResult:
    """Greedy soup of ``checkpoints`` (paths or state dicts) judged by held-out accuracy.

    ``evaluator``: an ``Evaluator``, a recipe path/name, or a callable ``state_dict -> float | EvalResult``
    (callables receive CPU fp32 tensors that are reused after the call returns). ``accept``: "gt" (strictly
    better, the paper's rule) or "ge". ``prescreen``: skip ingredients whose own held-out accuracy is below it.
    ``output``: write the soup there (atomically, with provenance metadata); otherwise it is returned in
    ``.state_dict``. ``report_dir``: receives ``greedy.json`` and plots.
    """
    if accept not in ACCEPT_RULES:
        raise ParameterError("--accept: " + unknown_choice("rule", accept, ACCEPT_RULES))
    if prescreen is not None and not (isinstance(prescreen, (int, float)) and 0.0 <= prescreen <= 1.0):
        raise ParameterError(f"--prescreen: expected an accuracy in [0, 1], got {prescreen!r}")
    started = time.perf_counter()
    readers = open_inputs(checkpoints)
    try:
        keys = check_compatible(readers, allow_missing=False)
        protect = protected_files(readers)
        out = check_output_path(output, inputs=protect, force=force) if output is not None else None
        judge = Judge(evaluator)
        names = [input_name(src, i) for i, src in enumerate(checkpoints)]

        # 1. individual held-out scores (the evaluator's cache answers for files it has seen)
        scores = [judge.score(src) for src in checkpoints]
        scored_at = time.perf_counter()
        order = sort_by_score(scores)
        if not order:
            raise NoScoreError(f"{names[0]}: none of the {len(names)} ingredients has a finite held-out score "
                               f"(NaN weights or outputs?); cannot start a soup")
        first = order[0]
        if prescreen is not None and scores[first].accuracy < prescreen:  # type: ignore[operator]
            raise ParameterError(f"--prescreen {prescreen}: no ingredient reaches it (best held-out accuracy "
                                 f"{scores[first].accuracy:.4f}, {names[first]})")

        # 2. the soup starts as the best ingredient: a running fp32 sum on the evaluation device
        device = judge.device
        first_reader = readers[first]
        float_keys = [k for k in keys if first_reader.info(k).is_float]
        float_set = set(float_keys)
        dtypes = {k: first_reader.info(k).dtype for k in keys}
        total: dict[str, torch.Tensor] = {}
        fixed: dict[str, torch.Tensor] = {}  # integer/bool buffers: the first soup member's, never averaged
        for key, tensor in read_tensors(first_reader, keys, device):
            if key in float_set:
                total[key] = tensor.to(torch.float32, copy=True)  # copy: never write into a caller's tensor
            else:
                fixed[key] = tensor
        new_total = {k: torch.empty_like(total[k]) for k in float_keys}
        candidate = {k: torch.empty_like(total[k]) for k in float_keys}
        candidate_state = {k: candidate[k] if k in candidate else fixed[k] for k in keys}
        members, best = [first], scores[first]
        history = [GreedyStep(0, first, names[first], scores[first].accuracy, scores[first].accuracy, True,
                              note="best held-out accuracy: starts the soup")]

        # 3. each next ingredient, once, in order; candidates see the held-out examples hardest first
        hardest = hardest_first([scores[i] for i in order])
        examples_seen = examples_full = candidates = 0
        passes_before = judge.forward_passes
        bar = Steps(len(order) - 1, progress)
        try:
            for position in order[1:]:
                step = len(history)
                own = scores[position]
                if prescreen is not None and own.accuracy < prescreen:  # type: ignore[operator]
                    history.append(GreedyStep(step, position, names[position], own.accuracy, None, False,
                                              note=f"skipped: own accuracy below prescreen {prescreen}"))
                    bar.advance()
                    continue
                count = len(members) + 1
                for key, tensor in read_tensors(readers[position], float_keys, device):
                    torch.add(total[key], tensor.to(torch.float32), out=new_total[key])
                    torch.div(new_total[key], count, out=candidate[key])
                need = need_correct(best, accept) if judge.is_evaluator else None
                result = judge.score(candidate_state, need_correct=need, use_cache=False, order=hardest)
                candidates += 1
                if result.n is not None:
                    examples_full += result.n
                    examples_seen += result.examples_seen if result.examples_seen is not None else result.n
                accepted = result.beats(best, accept)
                note = ""
                if result.stopped_early:
                    note = f"stopped early: cannot reach {need} correct of {result.n}"
                elif not result.valid:
                    note = "candidate has no finite score"
                history.append(GreedyStep(step, position, names[position], own.accuracy,
                                          None if result.stopped_early else result.accuracy, accepted,
                                          stopped_early=result.stopped_early, examples_seen=result.examples_seen,
                                          note=note))
                if accepted:
                    total, new_total = new_total, total  # the candidate's sum is the new soup's sum
                    members.append(position)
                    best = result
                bar.advance()
        finally:
            bar.close()
        for position, score in enumerate(scores):
            if not score.valid:
                history.append(GreedyStep(len(history), position, names[position], score.accuracy, None, False,
                                          note="no finite held-out score (NaN): never added"))
        passes_after = judge.forward_passes
        soup = {k: (total[k] / len(members)).to(device="cpu", dtype=dtypes[k]) if k in total else fixed[k].cpu()
                for k in keys}
        finished = time.perf_counter()

        stats: dict[str, Any] = {
            "seconds": finished - started,
            "seconds_scoring": scored_at - started,
            "seconds_greedy": finished - scored_at,
            "cached_scores": sum(s.cached for s in scores),
            "candidates_evaluated": candidates,
            "examples_evaluated": examples_seen,
            "examples_full": examples_full,
            "examples_saved": examples_full - examples_seen,
            "early_stops": sum(step.stopped_early for step in history),
        }
        if passes_before is not None and passes_after is not None:
            stats["forward_passes"] = passes_after - passes_before
        result = SoupResult(
            method="greedy", names=names, ingredients=members,
            scores=[s.accuracy if s.valid else None for s in scores], history=history, score=best.accuracy,
            rule={"accept": accept, "prescreen": prescreen, "order": order, "heldout": judge.heldout},
            stats=stats,
        )
        if out is not None:
            records = [ingredient_record(names[i], readers[i].path, readers[i].nbytes,
                                         checkpoints[i] if isinstance(checkpoints[i], Mapping) else None)
                       for i in members]
            greedy_record = {"order": [names[i] for i in order], "selected": [names[i] for i in members],
                             "scores": {names[i]: result.scores[i] for i in range(len(names))},
                             "heldout_accuracy": best.accuracy}
            metadata = provenance_metadata("greedy_soup", {"accept": accept, "prescreen": prescreen}, records,
                                           {"soupkit.greedy": greedy_record})
            result.path = save_checkpoint(soup, out, metadata, force=force, protect=protect)
        else:
            result.state_dict = soup
        if report_dir is not None:
            _report(result, soup, judge, checkpoints, Path(report_dir))
        return result
    finally:
        close_all(readers, checkpoints)


def _report(result: SoupResult, soup: Mapping[str, torch.Tensor], judge: Judge, checkpoints: Sequence[Any],
            report_dir: Path) -> None:
    """``greedy.json`` + the per-step plot, and the paper's scatter when the evaluator has test and shift sets."""
    from soupkit.report.plots import plot_greedy_steps, plot_soup_scatter, write_json

    report_dir.mkdir(parents=True, exist_ok=True)
    result.report_files.append(plot_greedy_steps(result, report_dir / "greedy_steps.png"))
    tests, shifts = judge.test_names, judge.shift_names
    if tests and shifts:
        from soupkit.merging import uniform_soup

        valid = [i for i, s in enumerate(result.scores) if s is not None]
        points = []
        for i in valid:
            points.append(_point(result.names[i], "ingredient", judge.accuracies(checkpoints[i], tests + shifts),
                                 tests, shifts))
        uniform = uniform_soup([checkpoints[i] for i in valid])
        points.append(_point(f"uniform soup ({len(valid)})", "uniform",
                             judge.accuracies(uniform, tests + shifts, use_cache=False), tests, shifts))
        points.append(_point(f"greedy soup ({len(result.ingredients)})", "greedy",
                             judge.accuracies(soup, tests + shifts, use_cache=False), tests, shifts))
        result.extra["scatter"] = points
        result.report_files.append(plot_soup_scatter(points, report_dir / "greedy_scatter.png"))
    result.report_files.append(report_dir / "greedy.json")
    write_json(result.to_dict(), report_dir / "greedy.json")


def _point(label: str, kind: str, accuracies: Mapping[str, float], tests: list[str], shifts: list[str]) -> dict:
    def mean(names: list[str]) -> float:
        values = [accuracies[n] for n in names if n in accuracies]
        return sum(values) / len(values) if values else math.nan

    return {"label": label, "kind": kind, "test": mean(tests), "shift": mean(shifts), "accuracies": dict(accuracies)}
