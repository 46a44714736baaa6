"""``soupkit.doctor``: will these checkpoints soup? A pre-flight check before any GPU hour goes into a soup.

```python
report = soupkit.doctor(["ft0.safetensors", "ft1.safetensors", "ft2.safetensors"], base="zs.safetensors")
report.overall, report.verdict, report.cosine            # or evaluator="digits" for barriers and scores
```

One streaming pass (``stats``) gives the Gram matrix of the task vectors, whole model and per module; the rules
(``rules``, thresholds stated there and in the README) turn it into a verdict per ingredient and one overall;
with an evaluator (``paths``) the straight paths from the best ingredient and the uniform soup are scored too.

The package is called ``diagnosis``, not ``doctor``, on purpose: importing a submodule ``soupkit.doctor`` would
bind the name ``soupkit.doctor`` to the module and shadow the function users call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit.diagnosis import rules
from soupkit.diagnosis.paths import check_paths, score_all
from soupkit.diagnosis.report import DoctorReport
from soupkit.diagnosis.stats import GramStats, centre, gram_pass
from soupkit.errors import IncompatibleCheckpointsError, ParameterError
from soupkit.eval import Evaluator
from soupkit.io import CheckpointReader, CheckpointSource, input_files, open_checkpoint
from soupkit.io.atomic import check_report_path, write_small_file
from soupkit.merging.api import open_inputs
from soupkit.merging.engine import check_compatible
from soupkit.options import OutputOptions
from soupkit.soups.scoring import Judge

__all__ = ["DoctorReport", "doctor"]


def doctor(checkpoints: Sequence[CheckpointSource], base: CheckpointSource | None = None, evaluator: Any = None, *,
           json: str | Path | None = None, plot: str | Path | None = None, device: str | None = None
           ) -> DoctorReport:
    """Diagnose whether ``checkpoints`` (paths or state dicts) will soup; returns a ``DoctorReport``.

    ``base``: the pretrained model they were fine-tuned from (task vectors θᵢ − θ_base; without it, θᵢ − mean θ).
    ``evaluator``: an ``Evaluator`` or a recipe path/name, for held-out scores, interpolation barriers and the
    uniform soup's score. ``json`` / ``plot``: also write the JSON report / the angle heatmap (PNG) there.
    Inputs that do not fit the majority's keys and shapes get the verdict ``incompatible`` instead of an error.
    """
    readers = _open(checkpoints, base)
    base_reader = None
    try:
        if base is not None:
            base_reader = open_checkpoint(base, name="<base state dict>")
        protect = [f for r in [*readers, *([base_reader] if base_reader else [])] for f in input_files(r)]
        for path, option in ((json, "--json"), (plot, "--plot")):
            if path is not None:
                check_report_path(path, inputs=protect, option=option)
        judge = _Judge(evaluator, device) if evaluator is not None else None
        majority, incompatible = _compatibility(readers)
        members = [readers[i] for i in majority]
        keys = check_compatible(members, allow_missing=False, base=base_reader)
        stats = gram_pass(members, keys, base_reader)
        report = _report(readers, majority, incompatible, stats, base_reader)
        sources = list(checkpoints)
        if judge is not None:

            score_all(report, judge, [sources[i] for i in majority], majority)
        _judge(report, majority, stats, incompatible)
        if judge is not None:

            check_paths(report, judge, sources, majority)
        report.overall, report.overall_reason = rules.overall(list(report.verdict.values()), report.uniform_score,
                                                              report.scores.get(report.best or ""))
        outputs = [(json, report.to_json().encode(), "--json")] if json is not None else []
        if plot is not None:
            outputs.append((plot, report.png(), "--plot"))  # both rendered before either is written
        for path, data, option in outputs:
            write_small_file(path, data, inputs=protect, option=option)
        return report
    finally:
        for reader, source in zip(readers, checkpoints):
            if reader is not source:
                reader.close()
        if base_reader is not None and base_reader is not base:
            base_reader.close()


def _open(sources: Sequence[CheckpointSource], base: CheckpointSource | None) -> list[CheckpointReader]:
    """The inputs, headers only; LoRA adapters read as W + dW over ``base`` (so their task vectors are dW)."""

    if isinstance(sources, Sequence) and not isinstance(sources, str) and len(sources) < 2:
        raise ParameterError(f"the doctor compares checkpoints: give at least two, got {len(sources)}")
    names = [_name(s, i) for i, s in enumerate(sources)] if isinstance(sources, Sequence) else None
    return open_inputs(sources, OutputOptions(), names=names, adapter_base=base)


def _name(source: Any, number: int) -> str:
    return str(source) if isinstance(source, (str, Path)) else getattr(source, "name", f"<state dict #{number}>")


def _compatibility(readers: Sequence[CheckpointReader]) -> tuple[list[int], dict[int, str]]:
    """Group inputs that ``check_compatible`` accepts together; the largest group (ties: the earliest) is the
    majority. Returns its positions and, for every other input, why it does not fit."""
    found: list[list[int]] = []
    for i, reader in enumerate(readers):
        for group in found:
            try:
                check_compatible([readers[group[0]], reader], allow_missing=False)
            except IncompatibleCheckpointsError:
                continue
            group.append(i)
            break
        else:
            found.append([i])
    majority = max(found, key=len)
    reasons = {}
    for i in range(len(readers)):
        if i not in majority:
            try:
                check_compatible([readers[majority[0]], readers[i]], allow_missing=False)
            except IncompatibleCheckpointsError as err:
                reasons[i] = str(err)
    return majority, reasons


def geometry(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norms, pairwise L2 distances, cosines) of the rows behind a Gram matrix (cosine NaN for a zero row)."""
    sq = gram.diagonal().clamp_min(0)
    distance = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt()
    distance.fill_diagonal_(0.0)
    norms = sq.sqrt()
    scale = norms[:, None] * norms[None, :]
    cosine = torch.where(scale > 0, gram / scale, torch.full_like(gram, math.nan)).clamp(-1.0, 1.0)
    return norms, distance, cosine


def _full(values: torch.Tensor, rows: Sequence[int], n: int) -> list[list[float | None]]:
    """An N×N list of lists with ``values`` (over ``rows``) in place and None elsewhere."""
    out: list[list[float | None]] = [[None] * n for _ in range(n)]
    for a, i in enumerate(rows):
        for b, j in enumerate(rows):
            value = float(values[a, b])
            out[i][j] = value if math.isfinite(value) else None
    return out


def _report(readers: Sequence[CheckpointReader], rows: list[int], incompatible: dict[int, str], stats: GramStats,
            base: CheckpointReader | None) -> DoctorReport:
    n = len(readers)
    norms, distance, cosine = geometry(stats.gram[""])
    uniform = (stats.gram[""] if stats.centred else centre(stats.gram[""])).diagonal().clamp_min(0).sqrt()

    def per_input(values: torch.Tensor) -> list[float | None]:
        out: list[float | None] = [None] * n
        for a, i in enumerate(rows):
            out[i] = float(values[a])
        return out

    modules = {}
    for module, gram in stats.gram.items():
        if module:
            _, d, c = geometry(gram)
            modules[module] = {"parameters": stats.numel[module], "distance": _full(d, rows, n),
                               "cosine": _full(c, rows, n)}
    names = [r.name for r in readers]
    return DoctorReport(
        names=names, base=None if base is None else base.name, centred=stats.centred, norm=per_input(norms),
        weight_norm=per_input(stats.raw_sq.sqrt()), to_uniform=per_input(uniform), distance=_full(distance, rows, n),
        cosine=_full(cosine, rows, n), modules=modules, verdict=dict.fromkeys(names, "soupable"),
        reason={names[i]: why for i, why in incompatible.items()}, overall="", overall_reason="",
        stats={"parameters": stats.numel[""], "incompatible": len(incompatible)},
    )


def _judge(report: DoctorReport, rows: list[int], stats: GramStats, incompatible: dict[int, str]) -> None:
    """Verdicts without evaluation: incompatible, duplicate, different_init (see ``rules``)."""
    names = report.names
    for i in incompatible:
        report.verdict[names[i]] = "incompatible"
    norms, distance, cosine = geometry(stats.gram[""])
    weight = stats.raw_sq.sqrt()
    copies = rules.duplicates(distance, cosine, stats.identical, weight)
    for a, (b, why) in copies.items():
        report.verdict[names[rows[a]]] = "duplicate"
        report.reason[names[rows[a]]] = f"of {names[rows[b]]}: {why}"
    if not stats.centred:  # the base again: its cosines are 0/0, and it would only dilute a soup
        for a, why in rules.zero_task_vectors(norms, weight).items():
            if a not in copies:
                copies[a] = (a, why)
                report.verdict[names[rows[a]]] = "duplicate"
                report.reason[names[rows[a]]] = why
    keep = [a for a in range(len(rows)) if a not in copies]
    dist, norm = distance[keep][:, keep], weight[keep]
    cos = None if stats.centred else cosine[keep][:, keep]
    anchor = None
    if not stats.centred:  # the base is a point too: row len(keep), at distance ‖τᵢ‖ from each ingredient
        dist = torch.cat([torch.cat([dist, norms[keep][:, None]], 1),
                          torch.cat([norms[keep], torch.zeros(1, dtype=dist.dtype)])[None, :]], 0)
        norm = torch.cat([norm, torch.tensor([math.sqrt(stats.base_sq or 0.0)], dtype=norm.dtype)])
        cos = torch.cat([torch.cat([cos, torch.full((len(keep), 1), math.nan, dtype=cos.dtype)], 1),
                         torch.full((1, len(keep) + 1), math.nan, dtype=cos.dtype)], 0)
        anchor = len(keep)
    scored = [a for a in range(len(keep)) if names[rows[keep[a]]] in report.scores]
    preference = sorted(scored, key=lambda a: -report.scores[names[rows[keep[a]]]]) + list(range(len(keep)))
    _, outliers = rules.groups(dist, norm, cos, preference, anchor)
    for a, why in outliers.items():
        if a < len(keep):
            report.verdict[names[rows[keep[a]]]] = "different_init"
            report.reason[names[rows[keep[a]]]] = why


class _Judge:
    """Held-out accuracy through the soups' ``Judge`` (an ``Evaluator``: its score cache, and its early stop for
    path points; or any callable ``state_dict -> float | EvalResult``)."""

    def __init__(self, evaluator: Any, device: str | None):

        if isinstance(evaluator, (str, Path)) and device is not None:

            evaluator = Evaluator.from_recipe(evaluator, device=device)
        self.judge = Judge(evaluator)
        self.heldout: str = self.judge.heldout

    def accuracy(self, source: Any, need_correct: int | None = None) -> tuple[float, bool]:
        """(accuracy, exact). A stopped evaluation gives the best accuracy it could still have reached."""
        score = self.judge.score(source, need_correct=need_correct if self.judge.is_evaluator else None)
        if score.stopped_early and score.correct is not None and score.n and score.examples_seen is not None:
            return (score.correct + score.n - score.examples_seen) / score.n, False
        if score.accuracy is None or not math.isfinite(score.accuracy):
            raise ParameterError(f"--eval: the evaluator gave no finite held-out accuracy for {_name(source, 0)}")
        return score.accuracy, True

    def examples(self) -> int | None:
        counter = getattr(self.judge.evaluator, "num_examples", None) if self.judge.is_evaluator else None
        return counter(self.heldout) if counter is not None else None
