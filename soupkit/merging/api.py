"""The library calls behind ``soupkit merge``, ``soupkit wise`` and every other command that writes a checkpoint.

``merge(checkpoints, method=..., output=None, **kwargs)`` returns the merged state dict in memory, or streams it
to ``output`` and returns the written path. ``kwargs`` are the method's parameters and the output options
(``soupkit.options.OutputOptions``: dtype, precise, device, shard_size, include, exclude, allow_missing,
allow_nonfinite, ema, force), or ``options=OutputOptions(...)``. Inputs may be paths (any format
``open_checkpoint`` reads) or in-memory state dicts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
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
from soupkit.io.hf_folder import FolderOutput, plan_folder_output
from soupkit.io.lora import check_adapter_mix
from soupkit.io.provenance import ingredient_record
from soupkit.merging.adapters import adapter_positions, merge_adapters_without_base
from soupkit.merging.engine import (
    EngineRun,
    SoupkitWarning,
    Variant,
    check_compatible,
    output_plan,
    parse_dtype,
    run_merge,
    select_keys,
)
from soupkit.merging.registry import METHODS, MergeMethod, get_method
from soupkit.options import OutputOptions, split_options

Result = dict[str, torch.Tensor] | Path
#: a variant's parameters: one dict for every tensor, or a function of the tensor name (per-layer parameters)
Params = Mapping[str, Any] | Callable[[str], Mapping[str, Any]]


def open_inputs(checkpoints: Sequence[CheckpointSource], options: OutputOptions,
                adapter_base: CheckpointSource | None = None, *, names: Sequence[str] | None = None,
                what: str = "checkpoints") -> list[CheckpointReader]:
    """Open every input lazily, headers only (closing those opened if one fails); an empty list and an input given
    twice are errors. LoRA adapters read as W + dW over ``adapter_base`` when one is given
    (``soupkit.merging.adapters``). ``names``: what messages call in-memory inputs (default ``<state dict #i>``).
    The one home of this for merges, soups and the doctor."""
    if isinstance(checkpoints, (str, Path, Mapping)) or not isinstance(checkpoints, Sequence):
        raise ParameterError(f"{what} must be a list of paths or state dicts, not a single one")
    if not checkpoints:
        raise ParameterError(f"{what}: give at least one checkpoint")
    adapters = set(adapter_positions(checkpoints))
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
            readers.append(open_checkpoint(source, ema=options.ema and number not in adapters,
                                           name=names[number] if names else f"<state dict #{number}>",
                                           strip_prefix=options.strip_prefix,
                                           add_prefix=options.add_prefix,
                                           base=adapter_base if number in adapters else None))
        check_adapter_mix(readers)
    except BaseException:
        close_inputs(readers)
        raise
    return readers


def close_inputs(readers: Sequence[CheckpointReader | None]) -> None:
    for reader in readers:
        if reader is not None and (not isinstance(reader, CheckpointReader) or reader.path is not None):
            reader.close()


def _method(method: Any, base: Any, adapters: bool) -> MergeMethod:
    """The method, checked against ``--base`` (which LoRA adapters take whatever the method: their base model)."""
    if not isinstance(method, str):
        raise ParameterError(f"method: expected a method name such as 'uniform', got {method!r}")
    spec = get_method(method)
    if spec.needs_base and base is None and not adapters:
        raise ParameterError(f"method {method!r} needs a base model (--base)")
    if base is not None and not spec.needs_base and not adapters:
        raise ParameterError(f"method {method!r} does not use a base model; drop --base")
    return spec


def _bind(spec: MergeMethod, params: Params, n_models: int, keys: Sequence[str]) -> Params:
    """Validate a variant's parameters before any tensor is read (per-layer ones: for every key, each distinct
    parameter set once)."""
    if not callable(params):
        return spec.bind(dict(params), n_models)
    bound: dict[str, dict[str, Any]] = {}
    by_key = {}
    for key in keys:
        given = dict(params(key))
        signature = repr(sorted(given.items()))
        if signature not in bound:
            bound[signature] = spec.bind(given, n_models)
        by_key[key] = bound[signature]
    return by_key.__getitem__


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
) -> list[Result]:
    """Merge once, write several outputs: one per ``(params, output)`` pair (e.g. one per WiSE-FT alpha).

    Everything is validated (method, parameters, options, output paths, input compatibility) before any tensor
    data is read; outputs appear atomically only when the whole merge succeeded. ``record_as``: the method name
    provenance records (``convert`` for a one-input copy).
    """
    options = options or OutputOptions()
    adapters = bool(adapter_positions(checkpoints)) if isinstance(checkpoints, Sequence) else False
    spec = _method(method, base, adapters)
    if adapters and base is None and len(adapter_positions(checkpoints)) == len(checkpoints):
        return [merge_adapters_without_base(checkpoints, method, params, out, options, progress=progress,
                                            metadata=metadata) for params, out in variants]
    options.refuse(["rank"], "full-weight outputs", "it shapes a soup of LoRA adapters written without --base")
    run = EngineRun(options, progress=progress)
    if chunk_elements is not None:
        run.chunk_elements = chunk_elements
    readers = open_inputs(checkpoints, options, adapter_base=base if adapters else None)
    base_reader = None
    try:
        if base is not None and spec.needs_base:
            base_reader = open_checkpoint(base, ema=options.ema, name="<base state dict>",
                                          strip_prefix=options.strip_prefix, add_prefix=options.add_prefix)
        keys = check_compatible(readers, allow_missing=options.allow_missing, base=base_reader)
        bound = [_bind(spec, params, len(readers), keys) for params, _ in variants]
        protected = [f for r in [*readers, base_reader] if r is not None for f in input_files(r)]
        protected += [Path(p) for params in bound if not callable(params) for p in params.get("fishers") or ()]
        templates = [base, *checkpoints] if adapters and base is not None else list(checkpoints)
        outputs = _outputs([out for _, out in variants], templates, protected, options)
        keys = _without_tied_copies(keys, outputs, readers)
        select_keys(keys, options.include, options.exclude)  # pattern errors before any work
        plan = output_plan(readers, keys, run.dtype)
        ingredients = [ingredient_record(r.name, r.path, r.nbytes) for r in readers]
        with OutputSet(replace=options.force) as files:
            files.watch(protected)  # an input rewritten while merged is named, never published from
            sinks = []
            for params, (out, folder) in zip(bound, outputs):
                if folder is not None:
                    files.folder(folder.folder)  # built beside its name, published by one rename
                recorded = {"per_layer": True} if callable(params) else params
                meta = provenance_metadata(record_as or method, recorded, ingredients,
                                           _extra(metadata, base_reader, options))
                shard_size = folder.shard_size if folder is not None else options.shard_size
                sinks.append(CheckpointSink(out, plan, meta, files if out is not None else None, shard_size,
                                            protect=protected, force=options.force))
                if folder is not None:
                    folder.add_files(files, dtype=_torch_name(run.dtype))
            run_merge(spec, readers, [Variant(p, s) for p, s in zip(bound, sinks)], run, base_reader, keys)
            return [sink.finish() if folder is None else folder.folder for sink, (_, folder) in zip(sinks, outputs)]
    finally:
        close_inputs([*readers, base_reader])


def _outputs(outputs: Sequence[str | Path | None], templates: Sequence[Any], protected: Sequence[Path],
             options: OutputOptions) -> list[tuple[Path | None, FolderOutput | None]]:
    """Each output checked before any work: a file, or a Hugging Face folder (``soupkit.io.hf_folder``: a path
    ending in /, an existing folder, or no suffix when the inputs are folders) as (its weights file, the
    folder)."""
    checked: list[tuple[Path | None, FolderOutput | None]] = []
    for out in outputs:
        if out is not None and not isinstance(out, (str, Path)):
            raise ParameterError(f"output: expected a file or folder path, got {type(out).__name__}")
        folder = plan_folder_output(out, templates, shard_size=options.shard_size) if out is not None else None
        if folder is not None:
            folder.check(protected, force=options.force)
            checked.append((folder.weights, folder))
        else:
            path = None if out is None else check_output_path(out, inputs=protected, force=options.force)
            checked.append((path, None))
    targets = [o for o, _ in checked if o is not None]
    if len(set(targets)) != len(targets):
        raise OutputError(f"{targets[0]}: two outputs of this merge would share one path")
    return checked


def _without_tied_copies(keys: list[str], outputs: Sequence[tuple[Path | None, FolderOutput | None]],
                         readers: Sequence[CheckpointReader] = ()) -> list[str]:
    """A folder output leaves out tied copies (``lm_head.weight``), as ``save_pretrained`` does; a config that
    ties what an input stores untied is refused (``FolderOutput.omitted_keys``)."""
    omitted = {k for _, folder in outputs if folder is not None for k in folder.omitted_keys(keys, readers)}
    return [k for k in keys if k not in omitted] if omitted else keys


def _torch_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"`` (how config.json and provenance name dtypes)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _extra(metadata: Mapping[str, Any] | None, base: CheckpointReader | None, options: OutputOptions) -> dict:
    extra: dict[str, Any] = dict(metadata or {})
    if base is not None:
        extra["soupkit.base"] = ingredient_record(base.name, base.path, base.nbytes)
    if options.dtype is not None:
        extra["soupkit.dtype"] = _torch_name(parse_dtype(options.dtype))
    if options.include or options.exclude:
        extra["soupkit.filter"] = {"include": list(options.include), "exclude": list(options.exclude)}
    return extra


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
    an evaluation recipe or evaluator whose held-out data recomputes BatchNorm statistics of the result.
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


def wise_output_name(output: Path, alpha: float) -> Path:
    """``wise.safetensors`` + alpha 0.5 -> ``wise_alpha0.50.safetensors``."""
    return output.with_name(f"{output.stem}_alpha{alpha:.2f}{output.suffix}")


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
    ``<output stem>_alpha0.50.safetensors``); alpha outside [0, 1] extrapolates and is warned about.
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
        outputs: list[Path | None] = [None] * len(alphas)
    else:
        outputs = [wise_output_name(Path(output), a) for a in alphas] if several else [Path(output)]
    # WiSE-FT of a LoRA adapter over its base: W + a*dW (the base is the zero-shot model)
    base = zeroshot if adapter_positions([zeroshot, finetuned]) == [1] else None
    results = merge_variants([zeroshot, finetuned], "wise", [({"alpha": a}, o) for a, o in zip(alphas, outputs)],
                             base=base, options=options, progress=progress, metadata=metadata,
                             chunk_elements=chunk_elements)
    return results if several else results[0]


#: output options that mean nothing for a one-input copy (nothing is merged)
_COPY_REFUSES = ("include", "exclude", "allow_missing", "precise")


def write_checkpoint(source: CheckpointSource, output: str | Path, *, record_as: str = "convert",
                     metadata: Mapping[str, Any] | None = None, progress: bool = False, **kwargs: Any) -> Path:
    """Write one checkpoint (a file of any readable format, or an in-memory state dict) as ``output``, through
    the merge engine so that every output option means the same as for a merge (dtype, shard size, device,
    EMA, non-finite check, force). Options that need several inputs are refused in one line."""
    options, rest = split_options(kwargs)
    if rest:
        raise ParameterError(f"{record_as} has no option {next(iter(rest))!r}")
    options.refuse(_COPY_REFUSES, f"soupkit {record_as}", "it writes one checkpoint, nothing is merged")
    result = merge_variants([source], "uniform", [({}, output)], options=options, progress=progress,
                            metadata=metadata, record_as=record_as)[0]
    assert isinstance(result, Path)
    return result
