"""WiSE-FT α sweep (Wortsman et al., CVPR 2022, https://arxiv.org/abs/2109.01903): evaluate
``(1 - α)·zeroshot + α·finetuned`` for every α, choose α on held-out accuracy, write that model, plot the curve.

Both models are read once and kept on the evaluation device (fp32; fp64 with ``precise``); the model at each α is
formed by the ``wise`` method's own function, so a sweep of 11 α costs 11 evaluations and no checkpoint reloads.
The chosen model is written by ``wise_ft`` (the code behind ``soupkit wise``), so it is bit for bit the file
``soupkit wise --alpha A`` writes, and the numbers that were scored (``wise`` at α=0 and α=1 gives the inputs'
floating tensors exactly; integer tensors always come from the zero-shot model, as the engine takes them from its
first input).

Fisher-weighted interpolation (Matena & Raffel, 2022, https://arxiv.org/abs/2111.09832, two-model case) is the
``fisher`` method with weights (1-α, α) and the two Fisher files: ``θ = (c0·θ0 + c1·θ1) / (c0 + c1)`` with
``c0 = (1-α)·max(F0, floor)`` and ``c1 = α·max(F1, floor)``, computed as that method computes it; tensors without
a Fisher in both files are the plain weighted mean (the method's running mean makes α=1 ``zs + (ft - zs)``, not
``ft`` bit for bit). Its chosen model is ``soupkit merge --method fisher --weights
1-α,α --fisher ZS_FISHER,FT_FISHER`` of (zeroshot, finetuned), bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit import interrupt
from soupkit.errors import IncompatibleCheckpointsError, ParameterError, suggest, unknown_choice
from soupkit.io import CheckpointSource, open_checkpoint
from soupkit.merging import merge, wise_ft
from soupkit.merging.engine import SoupkitWarning
from soupkit.merging.methods.fisher import DEFAULT_FLOOR
from soupkit.merging.registry import get_method
from soupkit.report.plots import plot_wise_curve
from soupkit.soups.alphas import parse_alphas
from soupkit.soups.common import SoupRun, ingredient_names, mean_accuracy
from soupkit.soups.result import SoupResult, SweepPoint, _clean
from soupkit.soups.scoring import Steps


class Interpolation:
    """The two models on the evaluation device, and the model at any α by the method's own function (``wise``,
    or ``fisher`` with weights (1-α, α) when Fisher files are given)."""

    def __init__(self, run: SoupRun, fishers: Sequence[Path] | None, floor: float):
        device = run.judge.device
        self.keys = run.float_keys(run.readers[0])
        self.theta = [run.read_floats(reader, self.keys, device) for reader in run.readers]
        self.layout = run.candidates(run.readers[0], device)
        self.method = get_method("fisher" if fishers else "wise")
        self.fisher_files, self.floor = list(fishers or ()), floor
        self.fishers = _load_fishers(run, self.fisher_files, self.keys, device) if fishers else None

    def params(self, alpha: float) -> dict[str, Any]:
        """The method's parameters at α (what the written file's provenance records)."""
        if self.fishers is None:
            return {"alpha": alpha}
        return {"weights": [1.0 - alpha, alpha], "fishers": [str(p) for p in self.fisher_files], "floor": self.floor}

    def __call__(self, alpha: float) -> dict[str, torch.Tensor]:
        """The model at α, as the written file will hold it (valid until the next call)."""
        bound = self.method.bind(self.params(alpha), 2)
        floats = {}
        for key in self.keys:
            if self.fishers is not None:
                bound["fishers"] = list(self.fishers[key])  # the engine passes the files' tensors, in step
            floats[key] = self.method.fn([self.theta[0][key], self.theta[1][key]], **bound)
        return self.layout(floats)


def _load_fishers(run: SoupRun, files: Sequence[Path], keys: Sequence[str], device: torch.device
                  ) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """``{key: (F0 or None, F1 or None)}`` on ``device`` in the accumulation dtype, after checking every Fisher
    tensor is a floating tensor of the models with their shape (as strictly as the final merge will)."""
    first, loaded = run.readers[0], []
    for path in files:
        with open_checkpoint(path) as reader:
            for key, info in reader.infos().items():
                if key not in run.keys or not first.info(key).is_float:
                    raise IncompatibleCheckpointsError(f"{path}: Fisher tensor {key!r} is not a floating tensor of "
                                                       f"the models.{suggest(key, run.keys)}")
                if tuple(info.shape) != tuple(first.info(key).shape):
                    raise IncompatibleCheckpointsError(f"{path}: Fisher of {key!r} has shape {tuple(info.shape)}, "
                                                       f"the models have {tuple(first.info(key).shape)}")
            loaded.append({k: reader.get(k).to(device).to(run.acc_dtype) for k in keys if k in reader.infos()})
    return {k: tuple(values.get(k) for values in loaded) for k in keys}


def _fisher_files(fisher: Sequence[CheckpointSource] | None, floor: float) -> list[Path] | None:
    if not (isinstance(floor, (int, float)) and floor > 0):
        raise ParameterError(f"--fisher-floor: must be > 0, got {floor!r}")
    if fisher is None:
        return None
    if isinstance(fisher, (str, Path)) or len(fisher) != 2 or not all(isinstance(f, (str, Path)) for f in fisher):
        raise ParameterError("--fisher: give two files, ZS_FISHER,FT_FISHER")
    return [Path(f) for f in fisher]


@interrupt.cooperative()  # Ctrl-C / SIGTERM stop it between steps, never inside a finaliser
def wise_sweep(
    zeroshot: CheckpointSource,
    finetuned: CheckpointSource,
    alphas: str | float | Sequence[float],
    evaluator: Any,
    *,
    select: str | None = None,
    output: str | Path | None = None,
    fisher: Sequence[str | Path] | None = None,
    fisher_floor: float = DEFAULT_FLOOR,
    report_dir: str | Path | None = None,
    progress: bool = False,
    **output_options: Any,
) -> SoupResult:
    """Evaluate WiSE-FT at every α on all of the evaluator's datasets; choose α by held-out accuracy (or by
    ``select``, a dataset name; ties go to the first α in sweep order); write or return the chosen model.

    ``alphas``: a list, one value, or a string for ``parse_alphas``. ``fisher``: (zeroshot Fisher, fine-tuned
    Fisher) files for the Fisher-weighted variant. ``report_dir`` receives the record and the curve, named
    after ``output`` (``wise.json`` and ``wise_curve.png`` for ``wise.safetensors``).
    ``output_options``: the merge engine's (see ``soupkit.soups.common``). The result's ``.alpha`` is the chosen
    α and ``.history`` holds one ``SweepPoint`` per α.
    """
    alphas = parse_alphas(alphas)
    outside = [a for a in alphas if not 0.0 <= a <= 1.0]
    if outside and fisher is not None:
        raise ParameterError(f"--alpha: Fisher-weighted interpolation needs α in [0, 1], got {outside}")
    if outside:
        warnings.warn(f"α={outside} outside [0, 1]: extrapolating beyond the two models", SoupkitWarning,
                      stacklevel=2)
    fishers = _fisher_files(fisher, fisher_floor)
    sources = [zeroshot, finetuned]
    with SoupRun("WiSE-FT sweep", sources, evaluator, output=output, report_dir=report_dir,
                 output_options=output_options, what="wise", auxiliary=fishers or ()) as run:
        judge = run.judge
        available = list(judge.evaluator.dataset_names) if judge.is_evaluator else [judge.heldout]
        chooser = select or judge.heldout
        if chooser not in available:
            raise ParameterError("--select: " + unknown_choice("dataset", chooser, available))
        model_at = Interpolation(run, fishers, fisher_floor)
        points = _sweep(run, model_at, alphas, progress)
        values = [p.accuracies.get(chooser, math.nan) for p in points]
        finite = [i for i, v in enumerate(values) if math.isfinite(v)]
        if not finite:
            raise ParameterError(f"--select {chooser}: no α gave a finite accuracy (NaN weights?)")
        chosen = max(finite, key=lambda i: (values[i], -i))
        points[chosen].chosen = True
        by_alpha = {p.alpha: p.heldout for p in points}
        fisher_names = ingredient_names(fishers) if fishers else None
        result = SoupResult(
            method="wise_sweep", names=run.names, ingredients=[0, 1],
            scores=[by_alpha.get(0.0), by_alpha.get(1.0)], history=points, score=points[chosen].heldout,
            rule={"alphas": alphas, "select": select, "heldout": judge.heldout, "fisher": fisher_names,
                  "fisher_floor": fisher_floor if fishers else None},
            stats={"evaluations": len(alphas),
                   "fisher_tensors": (sum(all(f is not None for f in v) for v in model_at.fishers.values())
                                      if model_at.fishers is not None else None)},
            extra={"alpha": alphas[chosen], "select": chooser},
        )
        sweep = _clean({"alphas": alphas, "select": chooser, chooser: values, "fisher": fisher_names})
        return _publish(run, model_at, result, {"soupkit.sweep": sweep})


def _publish(run: SoupRun, model_at: Interpolation, result: SoupResult, metadata: dict[str, Any]) -> SoupResult:
    """Write the model at the chosen α (``wise_ft``, or the ``fisher`` method) and the report."""
    alpha = result.alpha
    assert alpha is not None

    def write(out: Path | None, **options: Any) -> Any:

        if model_at.fishers is not None:
            return merge(run.sources, "fisher", out, metadata=metadata, **model_at.params(alpha), **options)
        with warnings.catch_warnings():  # the sweep has already warned about α outside [0, 1]
            warnings.filterwarnings("ignore", message="alpha=.* is outside", category=SoupkitWarning)
            return wise_ft(run.sources[0], run.sources[1], alpha, out, metadata=metadata, **options)

    def plots(name: Callable[[str], Path]) -> list[Path]:
        return [plot_wise_curve(result.history, name("curve"))]

    return run.finish(result, write, plots)


def _sweep(run: SoupRun, model_at: Interpolation, alphas: Sequence[float], progress: bool) -> list[SweepPoint]:
    """Every α scored on all of the evaluator's datasets."""
    judge = run.judge
    tests, shifts = judge.test_names, judge.shift_names
    points: list[SweepPoint] = []
    bar = Steps(len(alphas), progress, "WiSE-FT sweep", judge=judge)
    try:
        for alpha in alphas:
            interrupt.check()  # between two points of the sweep
            accuracies = judge.accuracies(model_at(alpha), use_cache=False)
            points.append(SweepPoint(alpha, accuracies, accuracies.get(judge.heldout),
                                     test=mean_accuracy(accuracies, tests), shift=mean_accuracy(accuracies, shifts)))
            bar.advance()
    finally:
        bar.close()
    return points
