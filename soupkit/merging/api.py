"""The library calls behind ``soupkit merge``, ``soupkit wise`` and every other command that writes a checkpoint.

``merge(checkpoints, method=..., output=None, **kwargs)`` returns the merged state dict in memory, or streams it
to ``output`` and returns the written path. ``kwargs`` are the method's parameters and the output options
(``soupkit.options.OutputOptions``, each honoured or refused by the output's writer: docs/output.md),
or ``options=OutputOptions(...)``. Inputs may be paths (any format
``open_checkpoint`` reads) or in-memory state dicts.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soupkit.errors import ParameterError
from soupkit.io import CheckpointSource
from soupkit.io.hf_folder import is_folder_output
from soupkit.merging.adapters import adapter_positions
from soupkit.merging.engine import SoupkitWarning
from soupkit.merging.plan import Params, Result, Transform, close_inputs, open_inputs, plan_merge
from soupkit.merging.registry import METHODS, get_method
from soupkit.merging.writers import COPY, MERGE
from soupkit.options import Command, OutputOptions, split_options

__all__ = ["close_inputs", "merge", "merge_variants", "open_inputs", "uniform_soup", "wise_ft", "wise_output_name",
           "write_checkpoint"]


def merge_variants(
    checkpoints: Sequence[CheckpointSource],
    method: str,
    variants: Sequence[tuple[Params, str | Path | None]],
    *,
    base: CheckpointSource | None = None,
    options: OutputOptions | None = None,
    progress: bool = False,
    metadata: Mapping[str, Any] | None = None,
    chunk_elements: int | None = None,
    record_as: str | None = None,
    command: Command = MERGE,
    transform: Transform | None = None,
) -> list[Result]:
    """Merge once, write several outputs: one per ``(params, output)`` pair (e.g. one per WiSE-FT alpha).

    The plan (``soupkit.merging.plan.plan_merge``) validates everything (method, parameters, options against each
    output's writer and ``command``, output paths, input compatibility) before any tensor data is read; outputs
    appear atomically only when the whole merge succeeded. ``record_as``: the method name provenance records
    (``convert`` for a one-input copy); ``transform``: applied to the merged state dict before it is written.
    """
    with plan_merge(checkpoints, method, variants, base=base, options=options, command=command, metadata=metadata,
                    record_as=record_as, progress=progress, chunk_elements=chunk_elements) as plan:
        return plan.execute(transform)


def merge(
    checkpoints: Sequence[CheckpointSource],
    method: str = "uniform",
    output: str | Path | None = None,
    *,
    base: CheckpointSource | None = None,
    progress: bool = False,
    metadata: Mapping[str, Any] | None = None,
    recalibrate_bn: Any = None,
    chunk_elements: int | None = None,
    **kwargs: Any,
) -> Result:
    """Merge ``checkpoints`` with ``method``; returns the state dict (``output=None``) or the written path.

    ``kwargs``: the method's parameters (``weights``, ``alpha``, ``density``, ...) and the output options
    (``OutputOptions`` fields, or ``options=OutputOptions(...)``); unknown names are errors. ``recalibrate_bn``:
    an evaluator (``soupkit.Evaluator.from_recipe(recipe)``, or a function returning one) whose held-out data
    recomputes BatchNorm statistics of the result; a recipe path is refused in one line saying so.
    ``chunk_elements``: the engine's flat chunk for elementwise methods (tuning and tests).
    """
    options, params = split_options(kwargs)
    if isinstance(checkpoints, Sequence) and len(checkpoints) == 1 and base is None and isinstance(method, str) \
            and method in METHODS and get_method(method).min_models == 1:
        warnings.warn("only one input: the output equals it (give several checkpoints to merge)", SoupkitWarning,
                      stacklevel=2)
    if recalibrate_bn is None:
        return merge_variants(checkpoints, method, [(params, output)], base=base, options=options,
                              progress=progress, metadata=metadata, chunk_elements=chunk_elements)[0]
    from soupkit.merging.bn import merge_and_recalibrate

    return merge_and_recalibrate(checkpoints, method, output, base, params, options, recalibrate_bn,
                                 metadata=metadata, progress=progress)


def uniform_soup(checkpoints: Sequence[CheckpointSource], output: str | Path | None = None, **kwargs: Any) -> Result:
    """The uniform model soup: the plain mean of ``checkpoints`` (Wortsman et al., ICML 2022)."""
    return merge(checkpoints, "uniform", output, **kwargs)


def wise_output_name(output: str | Path, alpha: float, *, folder: bool = False) -> str:
    """``wise.safetensors`` + alpha 0.5 -> ``wise_alpha0.50.safetensors``; a folder output ``wise/`` ->
    ``wise_alpha0.50/`` (``folder``: the output names a folder, ``soupkit.io.hf_folder.is_folder_output``)."""
    path = Path(output)
    if folder:
        return str(path.with_name(f"{path.name}_alpha{alpha:.2f}")) + "/"
    return str(path.with_name(f"{path.stem}_alpha{alpha:.2f}{path.suffix}"))


def wise_ft(
    zeroshot: CheckpointSource,
    finetuned: CheckpointSource,
    alpha: float | Sequence[float] = 0.5,
    output: str | Path | None = None,
    *,
    progress: bool = False,
    metadata: Mapping[str, Any] | None = None,
    chunk_elements: int | None = None,
    **kwargs: Any,
) -> Result | list[Result]:
    """WiSE-FT: ``(1 - alpha) * zeroshot + alpha * finetuned`` (the ``wise`` method).

    A list of alphas gives one output per alpha from a single pass over the inputs (files named
    ``<output stem>_alpha0.50.safetensors``, folders ``<folder>_alpha0.50/``); alpha outside [0, 1] extrapolates
    and is warned about.
    ``kwargs``: output options, as for ``merge``.
    """
    options, rest = split_options(kwargs)
    if rest:
        name = next(iter(rest))
        raise ParameterError(f"wise_ft has no option {name!r}; it takes alpha and the output options")
    several = isinstance(alpha, Sequence) and not isinstance(alpha, str)
    alphas = list(alpha) if several else [alpha]  # type: ignore[arg-type]
    if not alphas:
        raise ParameterError("--alpha: give at least one value")
    alphas = [get_method("wise").bind({"alpha": a}, 2)["alpha"] for a in alphas]
    if len(set(alphas)) != len(alphas):
        raise ParameterError(f"--alpha: duplicate values in {', '.join(map(str, alphas))}")
    for value in alphas:
        if not 0.0 <= value <= 1.0:
            warnings.warn(f"alpha={value} is outside [0, 1]: extrapolating beyond the two models",
                          SoupkitWarning, stacklevel=2)
    if output is None:
        outputs: list[str | Path | None] = [None] * len(alphas)
    elif several:
        folder = is_folder_output(output, [zeroshot, finetuned])
        outputs = [wise_output_name(output, a, folder=folder) for a in alphas]
    else:
        outputs = [output]
    # WiSE-FT of a LoRA adapter over its base: W + a*dW (the base is the zero-shot model)
    base = zeroshot if adapter_positions([zeroshot, finetuned]) == [1] else None
    results = merge_variants([zeroshot, finetuned], "wise", [({"alpha": a}, o) for a, o in zip(alphas, outputs)],
                             base=base, options=options, progress=progress, metadata=metadata,
                             chunk_elements=chunk_elements)
    return results if several else results[0]


def write_checkpoint(source: CheckpointSource, output: str | Path, *, record_as: str = "convert",
                     metadata: Mapping[str, Any] | None = None, progress: bool = False,
                     command: Command | None = None, **kwargs: Any) -> Path:
    """Write one checkpoint (a file of any readable format, or an in-memory state dict) as ``output``, through
    the merge plan so that every output form and option means the same as for a merge (dtype, shards, folders,
    device, EMA, non-finite check, force). ``command``: what the caller honours (default ``COPY``: options that
    need several inputs are refused in one line)."""
    options, rest = split_options(kwargs)
    if rest:
        raise ParameterError(f"{record_as} has no option {next(iter(rest))!r}")
    if command is None:
        command = Command(f"soupkit {record_as}", COPY.honours, COPY.why)
    result = merge_variants([source], "uniform", [({}, output)], options=options, progress=progress,
                            metadata=metadata, record_as=record_as, command=command)[0]
    assert isinstance(result, Path)
    return result
