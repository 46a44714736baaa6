"""The merge plan: one function validates every input and option and checks every output before any tensor is
read (``plan_merge``); the plan's writers then carry it out (``MergePlan.execute``).

Every command that writes a checkpoint builds one: ``merge`` with any method, the greedy / learned soups and
WiSE-FT sweeps (their final write), ``wise``, ``convert``, ``zeroshot``, BatchNorm recalibration and merge
configs. So each output form (``soupkit.merging.writers``: file, shards, Hugging Face folder, ``.pt``,
Lightning ``.ckpt``, memory, exact or SVD adapter) works the same for all of them, and an option no writer of the
plan honours is refused in one line before any work.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import ParameterError
from soupkit.io import (
    CheckpointReader,
    CheckpointSink,
    CheckpointSource,
    OutputSet,
    input_files,
    lora,
    open_checkpoint,
    plan_of,
    provenance_metadata,
)
from soupkit.io.lora import check_adapter_mix
from soupkit.io.provenance import ingredient_record
from soupkit.merging.adapters import adapter_positions, zero_updates
from soupkit.merging.engine import (
    EngineRun,
    SoupkitWarning,
    Variant,
    check_compatible,
    output_plan,
    run_merge,
    select_keys,
)
from soupkit.merging.registry import METHODS, MergeMethod, get_method
from soupkit.merging.writers import MERGE, Target, plan_targets
from soupkit.options import Command, OutputOptions, torch_dtype_name

Result = dict[str, torch.Tensor] | Path
#: a variant's parameters: one dict for every tensor, or a function of the tensor name (per-layer parameters)
Params = Mapping[str, Any] | Callable[[str], Mapping[str, Any]]
#: a function applied to the merged state dict before it is written (BatchNorm recalibration)
Transform = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------- inputs


def open_inputs(checkpoints: Sequence[CheckpointSource], options: OutputOptions,
                adapter_base: CheckpointSource | None = None, *, names: Sequence[str] | None = None,
                what: str = "checkpoints") -> list[CheckpointReader]:
    """Open every input lazily, headers only (closing those opened if one fails); an empty list and an input given
    twice are errors. LoRA adapters read as W + dW over ``adapter_base`` when one is given
    (``soupkit.merging.adapters``). ``names``: what messages call in-memory inputs (default ``<state dict #i>``).
    The one home of this for merges, soups and the doctor."""
    _check_sequence(checkpoints, what)
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


def _check_sequence(checkpoints: Any, what: str) -> None:
    if isinstance(checkpoints, (str, Path, Mapping)) or not isinstance(checkpoints, Sequence):
        raise ParameterError(f"{what} must be a list of paths or state dicts, not a single one")
    if not checkpoints:
        raise ParameterError(f"{what}: give at least one checkpoint")


def close_inputs(readers: Sequence[CheckpointReader | None]) -> None:
    for reader in readers:
        if reader is not None and (not isinstance(reader, CheckpointReader) or reader.path is not None):
            reader.close()


def check_method(method: Any, base: Any, adapters: bool) -> MergeMethod:
    """The method, checked against ``--base`` (which LoRA adapters take whatever the method: their base model)."""
    if not isinstance(method, str):
        raise ParameterError(f"method: expected a method name such as 'uniform', got {method!r}")
    spec = get_method(method)
    if spec.needs_base and base is None and not adapters:
        raise ParameterError(f"method {method!r} needs a base model (--base)")
    if base is not None and not spec.takes_base and not adapters:
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


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class PlannedOutput:
    """One output of the plan: where it goes (its writer), the method's bound parameters, its provenance."""

    target: Target
    params: Params
    metadata: dict[str, str]


@dataclass
class MergePlan:
    """A validated merge, inputs open (headers only); ``execute`` runs it and returns one result per output
    (a path, or the state dict for an in-memory one). A context manager: leaving it closes the inputs."""

    spec: MergeMethod
    options: OutputOptions
    outputs: list[PlannedOutput]
    sources: list[CheckpointSource]
    readers: list[CheckpointReader] = field(default_factory=list)
    base_reader: CheckpointReader | None = None
    keys: list[str] = field(default_factory=list)
    run: EngineRun | None = None
    progress: bool = False
    protected: list[Path] = field(default_factory=list)  # files no output may replace (inputs, Fisher files)

    def __enter__(self) -> MergePlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        close_inputs([*self.readers, self.base_reader])
        self.readers, self.base_reader = [], None

    def execute(self, transform: Transform | None = None) -> list[Result]:
        """Merge and write every output atomically (all or nothing). ``transform``: applied to the merged state
        dict in memory before it is written (the merge then holds the whole result in memory)."""
        if self.outputs[0].target.writer.adapter:
            return [self._write_adapter(o) for o in self.outputs]
        assert self.run is not None
        if transform is not None:
            return self._transformed(transform)
        with self._output_set() as files:
            sinks = [self._sink(o, files, self._tensor_plan()) for o in self.outputs]
            run_merge(self.spec, self.readers, [Variant(o.params, s) for o, s in zip(self.outputs, sinks)],
                      self.run, self.base_reader, self.keys)
            return [self._finish(o, s) for o, s in zip(self.outputs, sinks)]

    @property
    def stats(self) -> dict[str, Any]:
        """What the engine counted (e.g. ``integer_disagreements``)."""
        return self.run.stats if self.run is not None else {}

    def _tensor_plan(self) -> list[Any]:
        assert self.run is not None
        return output_plan(self.readers, self.keys, self.run.dtype)

    def _output_set(self) -> OutputSet:
        """The merge's atomic outputs: an input rewritten while merged is named, never published from; folder
        outputs are built beside their names and published by one rename."""
        files = OutputSet(replace=self.options.force)
        files.watch(self.protected)
        for output in self.outputs:
            if output.target.folder is not None:
                files.folder(output.target.folder.folder)
        return files

    def _sink(self, output: PlannedOutput, files: OutputSet, tensor_plan: list[Any]) -> CheckpointSink:
        return output.target.open_sink(tensor_plan, output.metadata, files, protected=self.protected,
                                       options=self.options, sources=self.sources)

    @staticmethod
    def _finish(output: PlannedOutput, sink: CheckpointSink) -> Result:
        return output.target.finish(sink)

    def _transformed(self, transform: Transform) -> list[Result]:
        """Merge into memory, apply ``transform``, then write each result through its writer."""
        assert self.run is not None
        memory = [CheckpointSink(None, self._tensor_plan(), None, None) for _ in self.outputs]
        run_merge(self.spec, self.readers, [Variant(o.params, s) for o, s in zip(self.outputs, memory)],
                  self.run, self.base_reader, self.keys)
        states = [transform(sink.finish()) for sink in memory]  # type: ignore[arg-type]
        with self._output_set() as files:
            results = []
            for output, state in zip(self.outputs, states):
                if output.target.weights is None:
                    results.append(state)
                    continue
                sink = self._sink(output, files, plan_of(state))
                for key, tensor in state.items():
                    sink.write(key, tensor.detach().cpu().reshape(-1))
                results.append(self._finish(output, sink))
            return results

    def _write_adapter(self, output: PlannedOutput) -> Path:
        """A soup of adapters without a base, as an adapter folder (``soupkit.merging.adapters``)."""
        target, n = output.target, len(self.sources)
        assert target.output is not None and not callable(output.params)
        meta = output.metadata
        weights = self.spec.linear_weights(output.params, n)
        rank = self.options.rank
        if weights is not None:  # linear in the updates: exact (or the exact sum re-factorised, with --rank)
            result = lora.merge_adapters(self.sources, weights, target.output, rank=rank, force=self.options.force,
                                         metadata=meta)
        else:
            assert rank is not None
            lora.check_dense_merge(self.sources, self.spec.name, rank=rank, output=target.output)  # before any work
            base = zero_updates(self.sources) if self.spec.needs_base else None
            updates = OutputOptions(allow_missing=True)  # modules some adapters leave alone: merged over the others
            with plan_merge(self.sources, self.spec.name, [(output.params, None)], base=base, options=updates,
                            progress=self.progress) as deltas_plan:
                deltas = deltas_plan.execute()[0]
            assert isinstance(deltas, dict)
            result = lora.save_adapter(deltas, list(self.sources), target.output, rank, force=self.options.force,
                                       metadata=meta)
        if rank is not None:
            warnings.warn(f"rank-{rank} adapter written to {result.folder}: relative reconstruction error "
                          f"{result.relative_error:.2e}", SoupkitWarning, stacklevel=4)
        return result.folder


def plan_merge(
    checkpoints: Sequence[CheckpointSource],
    method: str,
    variants: Sequence[tuple[Params, str | Path | None]],
    *,
    base: CheckpointSource | None = None,
    options: OutputOptions | None = None,
    command: Command = MERGE,
    metadata: Mapping[str, Any] | None = None,
    record_as: str | None = None,
    progress: bool = False,
    chunk_elements: int | None = None,
) -> MergePlan:
    """Validate a merge once, for several outputs (one per ``(params, output)`` pair, e.g. one per WiSE-FT
    alpha): the method and its parameters, the options against each output's writer and ``command``, the
    output paths, the inputs' compatibility. Nothing is read but headers. ``record_as``: the method name
    provenance records (``convert`` for a one-input copy). Returns the plan (a context manager)."""
    options = options or OutputOptions()
    _check_sequence(checkpoints, "checkpoints")
    adapter_inputs = adapter_positions(checkpoints)
    spec = check_method(method, base, bool(adapter_inputs))
    if adapter_inputs and base is None and len(adapter_inputs) == len(checkpoints):
        return _adapter_plan(checkpoints, spec, variants, options, command, metadata, progress)
    run = EngineRun(options, progress=progress)
    if chunk_elements is not None:
        run.chunk_elements = chunk_elements
    readers = open_inputs(checkpoints, options, adapter_base=base if adapter_inputs else None)
    plan = MergePlan(spec, options, [], list(checkpoints), readers, run=run, progress=progress)
    try:
        if base is not None and spec.takes_base:
            plan.base_reader = open_checkpoint(base, ema=options.ema, name="<base state dict>",
                                               strip_prefix=options.strip_prefix, add_prefix=options.add_prefix)
        keys = check_compatible(readers, allow_missing=options.allow_missing, base=plan.base_reader)
        bound = [_bind(spec, params, len(readers), keys) for params, _ in variants]
        protected = [f for r in [*readers, plan.base_reader] if r is not None for f in input_files(r)]
        protected += [Path(p) for params in bound if not callable(params) for p in params.get("fishers") or ()]
        templates = [base, *checkpoints] if adapter_inputs and base is not None else list(checkpoints)
        targets = plan_targets([out for _, out in variants], templates, protected, options, command=command)
        plan.protected = protected
        omitted = {k for t in targets if t.folder is not None for k in t.folder.omitted_keys(keys, readers)}
        plan.keys = [k for k in keys if k not in omitted]  # a folder leaves out tied copies, as save_pretrained
        select_keys(plan.keys, options.include, options.exclude)  # pattern errors before any work
        ingredients = [ingredient_record(r.name, r.path, r.nbytes) for r in readers]
        extra = _extra(metadata, plan.base_reader, options)
        for params, target in zip(bound, targets):
            recorded = {"per_layer": True} if callable(params) else params
            plan.outputs.append(PlannedOutput(target, params,
                                              provenance_metadata(record_as or method, recorded, ingredients, extra)))
    except BaseException:
        plan.close()
        raise
    return plan


def _adapter_plan(checkpoints: Sequence[CheckpointSource], spec: MergeMethod,
                  variants: Sequence[tuple[Params, str | Path | None]], options: OutputOptions, command: Command,
                  metadata: Mapping[str, Any] | None, progress: bool) -> MergePlan:
    """LoRA adapters without a base: each output an adapter folder, exact when the method is linear in the
    updates, else refactorised (``--rank``); anything else names both ways out, before any work."""
    n = len(checkpoints)
    protected = [p for c in checkpoints for p in (lora.find_adapter(c) or ())]
    targets = plan_targets([out for _, out in variants], list(checkpoints), protected, options, command=command,
                           adapter_soup=True)
    plan = MergePlan(spec, options, [], list(checkpoints), progress=progress)
    meta = {k: v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
    for (params, _), target in zip(variants, targets):
        if callable(params):
            raise ParameterError("per-layer parameters need --base for a soup of LoRA adapters")
        bound = spec.bind(dict(params), n)
        if target.writer.name == "adapter" and spec.linear_weights(bound, n) is None:
            linear = [m.name for m in METHODS if m.linear is not None]
            raise ParameterError(f"method {spec.name!r} cannot be written exactly as a LoRA adapter (only "
                                 f"{', '.join(linear)} are linear in the updates); give --base BASE to write full "
                                 f"weights, or --rank R to re-factorise its output by truncated SVD")
        plan.outputs.append(PlannedOutput(target, bound, meta))
    return plan


def _extra(metadata: Mapping[str, Any] | None, base: CheckpointReader | None, options: OutputOptions) -> dict:
    extra: dict[str, Any] = dict(metadata or {})
    if base is not None:
        extra["soupkit.base"] = ingredient_record(base.name, base.path, base.nbytes)
    if options.dtype is not None:
        extra["soupkit.dtype"] = torch_dtype_name(options.dtype)
    if options.include or options.exclude:
        extra["soupkit.filter"] = {"include": list(options.include), "exclude": list(options.exclude)}
    return extra
