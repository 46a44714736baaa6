"""Merging checkpoints: the library calls behind ``soupkit merge`` and ``soupkit wise``.

``merge(checkpoints, method=..., output=None, **params)`` returns the merged state dict in memory, or streams it
to ``output`` and returns the written path. Inputs may be paths (any format ``open_checkpoint`` reads) or
in-memory state dicts.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import OutputError, ParameterError
from soupkit.io import (
    CheckpointReader,
    CheckpointSink,
    CheckpointSource,
    OutputSet,
    check_output_path,
    input_files,
    open_checkpoint,
    provenance_metadata,
)
from soupkit.io.provenance import ingredient_record
from soupkit.merging.engine import (
    MergeOptions,
    SoupkitWarning,
    Variant,
    check_compatible,
    output_plan,
    parse_dtype,
    run_merge,
    select_keys,
)
from soupkit.merging.registry import MergeMethod, get_method, list_methods, merge_method

__all__ = ["MergeMethod", "MergeOptions", "SoupkitWarning", "get_method", "list_methods", "merge",
           "merge_method", "merge_variants", "uniform_soup", "wise_ft"]

Result = dict[str, torch.Tensor] | Path


def _open_inputs(checkpoints: Sequence[CheckpointSource], ema: bool) -> list[CheckpointReader]:
    if isinstance(checkpoints, (str, Path, Mapping)):
        raise ParameterError("checkpoints must be a list of paths or state dicts, not a single one")
    seen: dict[Path, int] = {}
    readers: list[CheckpointReader] = []
    try:
        for number, source in enumerate(checkpoints):
            if isinstance(source, (str, Path)):
                resolved = Path(source).resolve()
                if resolved in seen:
                    raise ParameterError(f"{source}: given twice (inputs #{seen[resolved] + 1} and #{number + 1}); "
                                         f"weight it instead with --weights")
                seen[resolved] = number
            readers.append(open_checkpoint(source, ema=ema, name=f"<state dict #{number}>"))
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers


def merge_variants(
    checkpoints: Sequence[CheckpointSource],
    method: str,
    variants: Sequence[tuple[Mapping[str, Any], str | Path | None]],
    *,
    base: CheckpointSource | None = None,
    dtype: str | torch.dtype | None = None,
    precise: bool = False,
    device: str = "cpu",
    allow_missing: bool = False,
    allow_nonfinite: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    shard_size: int | None = None,
    force: bool = False,
    ema: bool = False,
    progress: bool = False,
    metadata: Mapping[str, Any] | None = None,
    chunk_elements: int | None = None,
) -> list[Result]:
    """Merge once, write several outputs: one per ``(params, output)`` pair (e.g. one per WiSE-FT alpha).

    Everything is validated (method, parameters, output paths, input compatibility) before any tensor data is
    read; outputs appear atomically only when the whole merge succeeded.
    """
    spec = get_method(method)
    options = MergeOptions(dtype=parse_dtype(dtype), precise=precise, device=_device(device),
                           allow_missing=allow_missing, allow_nonfinite=allow_nonfinite,
                           include=tuple(include), exclude=tuple(exclude), progress=progress)
    if chunk_elements is not None:
        options.chunk_elements = chunk_elements
    if spec.needs_base and base is None:
        raise ParameterError(f"method {method!r} needs a base model (--base)")
    if base is not None and not spec.needs_base:
        raise ParameterError(f"method {method!r} does not use a base model; drop --base")
    readers = _open_inputs(checkpoints, ema)
    base_reader = None
    try:
        n_models = len(readers)
        bound = [spec.bind(dict(params), n_models) for params, _ in variants]
        if base is not None:
            base_reader = open_checkpoint(base, ema=ema, name="<base state dict>")
        protected = [f for r in readers + ([base_reader] if base_reader else []) for f in input_files(r)]
        protected += [Path(p) for params in bound for p in params.get("fishers") or ()]  # auxiliary inputs too
        outputs = [None if out is None else check_output_path(out, inputs=protected, force=force)
                   for _, out in variants]
        targets = [o for o in outputs if o is not None]
        if len(set(targets)) != len(targets):
            raise OutputError(f"{targets[0]}: two outputs of this merge would share one path")
        keys = check_compatible(readers, allow_missing=allow_missing, base=base_reader)
        select_keys(keys, options.include, options.exclude)  # pattern errors before any work
        plan = output_plan(readers, keys, options.dtype)
        ingredients = [ingredient_record(r.name, r.path, r.nbytes) for r in readers]
        with OutputSet() as files:
            sinks = []
            for params, out in zip(bound, outputs):
                meta = provenance_metadata(method, params, ingredients, _extra(metadata, base_reader, options))
                sinks.append(CheckpointSink(out, plan, meta, files if out is not None else None, shard_size,
                                            protect=protected, force=force))
            run_merge(spec, readers, [Variant(p, s) for p, s in zip(bound, sinks)], options, base_reader, keys)
            results = [sink.finish() for sink in sinks]
        return results
    finally:
        for reader in readers + ([base_reader] if base_reader else []):
            if not isinstance(reader, CheckpointReader) or reader.path is not None:
                reader.close()


def _extra(metadata: Mapping[str, Any] | None, base: CheckpointReader | None, options: MergeOptions) -> dict:
    extra: dict[str, Any] = dict(metadata or {})
    if base is not None:
        extra["soupkit.base"] = ingredient_record(base.name, base.path, base.nbytes)
    if options.dtype is not None:
        extra["soupkit.dtype"] = str(options.dtype).replace("torch.", "")
    if options.include or options.exclude:
        extra["soupkit.filter"] = {"include": list(options.include), "exclude": list(options.exclude)}
    return extra


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ParameterError(f"--device: unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"--device {device}: CUDA is not available on this machine")
    return device


def merge(
    checkpoints: Sequence[CheckpointSource],
    method: str = "uniform",
    output: str | Path | None = None,
    *,
    base: CheckpointSource | None = None,
    weights: Sequence[float] | None = None,
    **options: Any,
) -> Result:
    """Merge ``checkpoints`` with ``method``; returns the state dict (``output=None``) or the written path.

    Method parameters (``alpha``, ``density``, ``scaling``, ...) and engine options (``dtype``, ``precise``,
    ``device``, ``allow_missing``, ``allow_nonfinite``, ``include``, ``exclude``, ``shard_size``, ``force``,
    ``ema``, ``progress``, ``metadata``) are keyword arguments; unknown names are errors.
    """
    engine_keys = {"dtype", "precise", "device", "allow_missing", "allow_nonfinite", "include", "exclude",
                   "shard_size", "force", "ema", "progress", "metadata", "chunk_elements"}
    recalibrate = options.pop("recalibrate_bn", None)
    params = {k: v for k, v in options.items() if k not in engine_keys}
    engine = {k: v for k, v in options.items() if k in engine_keys}
    if weights is not None:
        params["weights"] = list(weights)
    if recalibrate is None:
        return merge_variants(checkpoints, method, [(params, output)], base=base, **engine)[0]
    return _merge_and_recalibrate(checkpoints, method, output, base, params, engine, recalibrate)


def _merge_and_recalibrate(checkpoints: Sequence[CheckpointSource], method: str, output: str | Path | None,
                           base: CheckpointSource | None, params: dict[str, Any], engine: dict[str, Any],
                           evaluator: Any) -> Result:
    """Merge in memory, recompute BatchNorm statistics over the recipe's held-out data, then save.

    The fix for soups of convnets: averaged weights no longer match the averaged running statistics.
    """
    from soupkit.io import save_checkpoint
    from soupkit.merging.bn import recalibrate_bn

    sources = [*checkpoints, *([base] if base is not None else [])]
    protected = [Path(s) for s in sources if isinstance(s, (str, Path))]
    force, shard_size = engine.pop("force", False), engine.pop("shard_size", None)
    metadata = dict(engine.pop("metadata", None) or {})
    out = check_output_path(output, inputs=protected, force=force) if output is not None else None
    state = merge_variants(checkpoints, method, [(params, None)], base=base, **engine)[0]
    assert isinstance(state, dict)
    state = recalibrate_bn(state, evaluator)
    if out is None:
        return state
    ingredients = [ingredient_record(f"<state dict #{i}>", Path(s) if isinstance(s, (str, Path)) else None,
                                     Path(s).stat().st_size if isinstance(s, (str, Path)) else 0)
                   for i, s in enumerate(checkpoints)]
    recipe = evaluator if isinstance(evaluator, (str, Path)) else type(evaluator).__name__
    meta = provenance_metadata(method, get_method(method).bind(params, len(checkpoints)), ingredients,
                               {**metadata, "soupkit.recalibrate_bn": str(recipe)})
    return save_checkpoint(state, out, meta, force=force, shard_size=shard_size, protect=protected)


def uniform_soup(checkpoints: Sequence[CheckpointSource], output: str | Path | None = None, **options: Any) -> Result:
    """The uniform model soup: the plain mean of ``checkpoints`` (Wortsman et al., ICML 2022)."""
    return merge(checkpoints, "uniform", output, **options)


def wise_output_name(output: Path, alpha: float) -> Path:
    """``wise.safetensors`` + alpha 0.5 -> ``wise_alpha0.50.safetensors``."""
    return output.with_name(f"{output.stem}_alpha{alpha:.2f}{output.suffix}")


def wise_ft(
    zeroshot: CheckpointSource,
    finetuned: CheckpointSource,
    alpha: float | Sequence[float] = 0.5,
    output: str | Path | None = None,
    **options: Any,
) -> Result | list[Result]:
    """WiSE-FT: ``(1 - alpha) * zeroshot + alpha * finetuned``.

    A list of alphas gives one output per alpha from a single pass over the inputs (files named
    ``<output stem>_alpha0.50.safetensors``); alpha outside [0, 1] extrapolates and is warned about.
    """
    alphas = [float(a) for a in alpha] if isinstance(alpha, Sequence) else [float(alpha)]
    if not alphas:
        raise ParameterError("--alpha: give at least one value")
    if len(set(alphas)) != len(alphas):
        raise ParameterError(f"--alpha: duplicate values in {alphas}")
    for value in alphas:
        if not 0.0 <= value <= 1.0:
            warnings.warn(f"alpha={value} is outside [0, 1]: extrapolating beyond the two models",
                          SoupkitWarning, stacklevel=2)
    if output is None:
        outputs: list[Path | None] = [None] * len(alphas)
    elif isinstance(alpha, Sequence):
        outputs = [wise_output_name(Path(output), a) for a in alphas]
    else:
        outputs = [Path(output)]
    results = merge_variants([zeroshot, finetuned], "wise", [({"alpha": a}, o) for a, o in zip(alphas, outputs)],
                             **options)
    return results if isinstance(alpha, Sequence) else results[0]
