"""WiSE-FT α sweep (Wortsman et al., CVPR 2022, https://arxiv.org/abs/2109.01903): evaluate
``(1 - α)·zeroshot + α·finetuned`` for every α, choose α on held-out accuracy, write that model, plot the curve.

Both models are read once and kept in fp32 on the evaluation device; each α is formed in place in one
preallocated buffer, so a sweep of 11 α costs 11 evaluations and no checkpoint reloads. α=0 and α=1 hand the
inputs over unchanged (bitwise). Interior α use the same arithmetic as ``soupkit wise`` (``wise_ft``), so the
chosen checkpoint is byte-for-byte the one ``soupkit wise --alpha A`` writes.

Fisher-weighted interpolation (Matena & Raffel, 2022, https://arxiv.org/abs/2111.09832, two-model case):
``θ = (c0·θ0 + c1·θ1) / (c0 + c1)`` with ``c0 = (1-α)·max(F0, floor)`` and ``c1 = α·max(F1, floor)``; tensors
without a Fisher in both files fall back to plain interpolation.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import IncompatibleCheckpointsError, ParameterError, unknown_choice
from soupkit.io import CheckpointSource, check_output_path, load_checkpoint, provenance_metadata, save_checkpoint
from soupkit.io.provenance import ingredient_record
from soupkit.merging.engine import SoupkitWarning, check_compatible
from soupkit.soups.alphas import parse_alphas
from soupkit.soups.result import SoupResult, SweepPoint, _clean
from soupkit.soups.scoring import Judge, Steps, close_all, input_name, open_inputs, protected_files, read_tensors


def _load_fishers(fisher: Sequence[CheckpointSource], floats: Mapping[str, torch.Tensor], device: torch.device,
                  floor: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{key: (max(F0, floor), max(F1, floor))}`` on ``device`` for keys both Fisher files hold."""
    if isinstance(fisher, (str, Path)) or len(fisher) != 2:
        raise ParameterError("--fisher: give two files, ZS_FISHER,FT_FISHER")
    names = [input_name(f, i) for i, f in enumerate(fisher)]
    loaded = [load_checkpoint(f) for f in fisher]
    for name, values in zip(names, loaded):
        unknown = [k for k in values if k not in floats]
        if unknown and len(unknown) == len(values):
            raise IncompatibleCheckpointsError(f"{name}: none of its tensors names a floating tensor of the models "
                                               f"(e.g. {unknown[0]!r}); is it the Fisher of these models?")
        for key, tensor in values.items():
            if key in floats and tuple(tensor.shape) != tuple(floats[key].shape):
                raise IncompatibleCheckpointsError(f"{name}: Fisher of {key!r} has shape {tuple(tensor.shape)}, "
                                                   f"the models have {tuple(floats[key].shape)}")
    shared = [k for k in floats if k in loaded[0] and k in loaded[1]]
    return {k: tuple(values[k].to(device, torch.float32).clamp_min(floor) for values in loaded)  # type: ignore[misc]
            for k in shared}


def interpolate_into(out: dict[str, torch.Tensor], theta0: Mapping[str, torch.Tensor],
                     theta1: Mapping[str, torch.Tensor], alpha: float,
                     fishers: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Write the α-interpolation of the fp32 tensors ``theta0``/``theta1`` into the buffers ``out``."""
    for key, buffer in out.items():
        zs, ft = theta0[key], theta1[key]
        pair = fishers.get(key) if fishers else None
        if pair is not None:
            c0, c1 = pair[0] * (1.0 - alpha), pair[1] * alpha
            torch.div(c0 * zs + c1 * ft, c0 + c1, out=buffer)
        else:
            torch.lerp(zs, ft, alpha, out=buffer)  # the same arithmetic as the "wise" merge method


def wise_sweep(
    zeroshot: CheckpointSource,
    finetuned: CheckpointSource,
    alphas: str | float | Sequence[float],
    evaluator: Any,
    *,
    select: str | None = None,
    output: str | Path | None = None,
    force: bool = False,
    fisher: Sequence[CheckpointSource] | None = None,
    fisher_floor: float = 1e-8,
    report_dir: str | Path | None = None,
    progress: bool = False,
) -> SoupResult:
    """Evaluate WiSE-FT at every α on all of the evaluator's datasets; choose α by held-out accuracy (or by
    ``select``, a dataset name; ties go to the first α in sweep order); write or return the chosen model.

    ``alphas``: a list, one value, or a string for ``parse_alphas``. ``fisher``: (zeroshot Fisher, fine-tuned
    Fisher) files for the Fisher-weighted variant. ``report_dir`` receives ``wise.json`` and ``wise_curve.png``.
    The result's ``.alpha`` is the chosen α and ``.history`` holds one ``SweepPoint`` per α.
    """
    alphas = parse_alphas(alphas)
    outside = [a for a in alphas if not 0.0 <= a <= 1.0]
    if outside and fisher is not None:
        raise ParameterError(f"--alpha: Fisher-weighted interpolation needs α in [0, 1], got {outside}")
    if outside:
        warnings.warn(f"α={outside} outside [0, 1]: extrapolating beyond the two models", SoupkitWarning,
                      stacklevel=2)
    if not (isinstance(fisher_floor, (int, float)) and fisher_floor > 0):
        raise ParameterError(f"--fisher-floor: must be > 0, got {fisher_floor!r}")
    started = time.perf_counter()
    sources = [zeroshot, finetuned]
    readers = open_inputs(sources, what="wise")
    try:
        keys = check_compatible(readers, allow_missing=False)
        protect = protected_files(readers)
        out = check_output_path(output, inputs=protect, force=force) if output is not None else None
        judge = Judge(evaluator)
        names = [input_name(src, i) for i, src in enumerate(sources)]
        available = list(judge.evaluator.dataset_names) if judge.is_evaluator else [judge.heldout]
        chooser = select or judge.heldout
        if chooser not in available:
            raise ParameterError("--select: " + unknown_choice("dataset", chooser, available))

        device = judge.device
        float_keys = [k for k in keys if readers[0].info(k).is_float]
        dtypes = [{k: r.info(k).dtype for k in keys} for r in readers]
        theta: list[dict[str, torch.Tensor]] = [{}, {}]
        fixed: list[dict[str, torch.Tensor]] = [{}, {}]
        for side, reader in enumerate(readers):
            for key, tensor in read_tensors(reader, keys, device):
                if key in float_keys:
                    theta[side][key] = tensor.to(torch.float32, copy=True)
                else:
                    fixed[side][key] = tensor
        fishers = _load_fishers(fisher, theta[0], device, fisher_floor) if fisher is not None else None
        buffers = {k: torch.empty_like(theta[0][k]) for k in float_keys}

        def state_at(alpha: float) -> dict[str, torch.Tensor]:
            """The model at α on the device (fp32 floats); α=0 and α=1 are the inputs themselves."""
            if alpha in (0.0, 1.0):
                side = int(alpha)
                return {k: theta[side][k] if k in theta[side] else fixed[side][k] for k in keys}
            interpolate_into(buffers, theta[0], theta[1], alpha, fishers)
            return {k: buffers[k] if k in buffers else fixed[0][k] for k in keys}

        tests, shifts = judge.test_names, judge.shift_names
        points: list[SweepPoint] = []
        bar = Steps(len(alphas), progress, "WiSE-FT sweep")
        try:
            for alpha in alphas:
                accuracies = judge.accuracies(state_at(alpha), use_cache=False)
                points.append(SweepPoint(alpha, accuracies, accuracies.get(judge.heldout),
                                         test=_mean(accuracies, tests), shift=_mean(accuracies, shifts)))
                bar.advance()
        finally:
            bar.close()

        values = [p.accuracies.get(chooser, math.nan) for p in points]
        finite = [i for i, v in enumerate(values) if math.isfinite(v)]
        if not finite:
            raise ParameterError(f"--select {chooser}: no α gave a finite accuracy (NaN weights?)")
        chosen = max(finite, key=lambda i: (values[i], -i))
        points[chosen].chosen = True
        alpha = alphas[chosen]
        side_dtypes = dtypes[1] if alpha == 1.0 else dtypes[0]
        soup = {k: v.to(device="cpu", dtype=side_dtypes[k]) for k, v in state_at(alpha).items()}
        by_alpha = {p.alpha: p.heldout for p in points}
        result = SoupResult(
            method="wise_sweep", names=names, ingredients=[0, 1],
            scores=[by_alpha.get(0.0), by_alpha.get(1.0)], history=points, score=points[chosen].heldout,
            rule={"alphas": alphas, "select": select, "heldout": judge.heldout,
                  "fisher": [input_name(f, i) for i, f in enumerate(fisher)] if fisher is not None else None,
                  "fisher_floor": fisher_floor if fisher is not None else None},
            stats={"seconds": time.perf_counter() - started, "evaluations": len(alphas),
                   "fisher_tensors": len(fishers) if fishers is not None else None},
            extra={"alpha": alpha, "select": chooser},
        )
        if out is not None:
            records = [ingredient_record(names[i], readers[i].path, readers[i].nbytes,
                                         sources[i] if isinstance(sources[i], Mapping) else None) for i in (0, 1)]
            method = "wise_fisher" if fisher is not None else "wise"
            params = {"alpha": alpha} if fisher is None else {"alpha": alpha, "fisher_floor": fisher_floor}
            sweep = _clean({"alphas": alphas, "select": chooser, chooser: values})
            result.path = save_checkpoint(soup, out, provenance_metadata(method, params, records,
                                                                         {"soupkit.sweep": sweep}),
                                          force=force, protect=protect)
        else:
            result.state_dict = soup
        if report_dir is not None:
            from soupkit.report.plots import plot_wise_curve, write_json

            folder = Path(report_dir)
            result.report_files += [plot_wise_curve(points, folder / "wise_curve.png"), folder / "wise.json"]
            write_json(result.to_dict(), folder / "wise.json")
        return result
    finally:
        close_all(readers, sources)


def _mean(accuracies: Mapping[str, float], names: Sequence[str]) -> float | None:
    values = [accuracies[n] for n in names if n in accuracies]
    return sum(values) / len(values) if values else None
