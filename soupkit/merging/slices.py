"""Frankenmerges: a mergekit config's ``slices:`` (layer ranges of one or more models, stacked or interleaved, each
slice merged with the config's method) written as one model whose ``config.json`` has the new layer count.

``soupkit.merging.mergekit`` reads the config into a ``SlicePlan``: every output tensor, the models (and base) it
is merged from, its name in each of them, and its method parameters (mergekit's gradients run over each slice's
own layers; the tensors outside the layers follow the first slice -- embeddings -- or the last -- final norm,
``lm_head`` -- at t = 0, as mergekit plans them). ``merge_slices`` runs each group of tensors that share their
inputs as one soupkit merge over renamed views of the inputs (``io.views.KeyMapReader``: no tensor is copied to
rename it), one output layer at a time, into one sink, published atomically: a Hugging Face folder (the base
model's config, else the first model's, with the layer count -- and ``layer_types`` where the config has them --
of the output) or one checkpoint file. Memory holds one layer's tensors (plus the embeddings' group), never the
whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soupkit.io import CheckpointSink, OutputSet, check_output_path, open_checkpoint
from soupkit.io.base import TensorInfo
from soupkit.io.hf_folder import is_folder_output, plan_folder_output
from soupkit.io.provenance import ingredient_record, provenance_metadata
from soupkit.io.small_files import read_json_file
from soupkit.io.views import KeyMapReader
from soupkit.merging import api
from soupkit.merging.engine import parse_dtype

#: config.json fields holding the layer count, by architecture family (Llama/Mistral/Qwen..., GPT-2, others)
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class SliceGroup:
    """Output tensors merged from the same inputs: ``sources[out_key]`` names the tensor in each of ``models``
    (in order), ``base_sources[out_key]`` in ``base``; ``parameters[out_key]`` the method's parameters."""

    models: tuple[Path, ...]
    base: Path | None
    sources: dict[str, tuple[str, ...]]
    base_sources: dict[str, str]
    parameters: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class SlicePlan:
    """A whole frankenmerge: the method, its groups in output order, the folder whose config.json the output
    copies, and that config's new fields (layer count)."""

    source: str
    method: str
    groups: tuple[SliceGroup, ...]
    template: Path
    config_updates: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[Path]:
        seen: dict[Path, None] = {}
        for group in self.groups:
            seen.update(dict.fromkeys((*group.models, *([group.base] if group.base else []))))
        return list(seen)


def layer_count_updates(template: Path, layers: Sequence[tuple[Path, int]]) -> dict[str, Any]:
    """The config.json fields of an output made of ``layers`` (each output layer's model and index there): its
    layer count, and ``layer_types`` where the configs list one type per layer (each layer keeps its own)."""
    config = _read_config(template)
    name = next((f for f in LAYER_COUNT_FIELDS if isinstance(config.get(f), int)), LAYER_COUNT_FIELDS[0])
    updates: dict[str, Any] = {name: len(layers)}
    if isinstance(config.get("layer_types"), list):
        types = {path: _read_config(path).get("layer_types") for path in {p for p, _ in layers}}
        if all(isinstance(t, list) and 0 <= i < len(t) for p, i in layers for t in [types[p]]):
            updates["layer_types"] = [types[p][i] for p, i in layers]
    return updates


def _provenance(plan: SlicePlan, metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """The output's provenance record: the method, each slice's layer ranges, every model read."""

    ingredients = []
    for path in plan.models:
        reader = open_checkpoint(path)
        try:
            ingredients.append(ingredient_record(reader.name, reader.path, reader.nbytes))
        finally:
            reader.close()
    layers = {"layers": plan.config_updates, "groups": len(plan.groups)}
    return provenance_metadata(plan.method, layers, ingredients, {**(metadata or {}), "soupkit.slices": "true"})


def _read_config(folder: Path) -> dict[str, Any]:
    """The model folder's config.json (read as every small file is: ``soupkit.io.small_files``), {} without one."""

    return read_json_file(folder if folder.is_dir() else folder.parent, "config.json") or {}


def merge_slices(plan: SlicePlan, output: str | Path | None, *, options: Any, progress: bool = False,
                 metadata: Mapping[str, Any] | None = None,
                 overrides: Callable[[str], Mapping[str, Any]] | Mapping[str, Any] | None = None) -> Any:
    """Run ``plan``: the merged state dict (``output=None``), or the written folder or file. Streams group by
    group (one output layer at a time) into one sink: memory holds one layer's tensors, not the model."""

    protected = [Path(p) for p in plan.models]
    folder = None
    target = None
    if output is not None:  # refused before any tensor is read
        if is_folder_output(output, [plan.template]):
            folder = plan_folder_output(output, [plan.template], shard_size=options.shard_size)
            assert folder is not None
            folder.check([f for p in protected for f in (p.glob("*") if p.is_dir() else [p])], force=options.force)
            folder.config_updates = dict(plan.config_updates)
            target = folder.weights
        else:
            target = check_output_path(output, inputs=protected, force=options.force)
    dtype = parse_dtype(options.dtype)
    readers = {path: open_checkpoint(path) for path in plan.models}
    try:
        infos = [TensorInfo(key, info.shape, dtype if dtype is not None and info.dtype.is_floating_point
                            else info.dtype)
                 for group in plan.groups for key, names in group.sources.items()
                 for info in [readers[group.models[0]].info(names[0])]]
    finally:
        for reader in readers.values():
            reader.close()
    omitted = folder.omitted_keys([i.key for i in infos]) if folder is not None else set()
    infos = [i for i in infos if i.key not in omitted]
    if target is None:
        state: dict[str, Any] = {}
        for group in plan.groups:
            state.update(_merge_group(plan.method, group, options, overrides))
        return state
    files = OutputSet(replace=options.force)
    files.watch(protected)  # an input rewritten while merged is named, never published from
    if folder is not None:
        files.folder(folder.folder)  # built beside its name, published by one rename
    with files:
        sink = CheckpointSink(target, infos, _provenance(plan, metadata), files,
                              folder.shard_size if folder is not None else options.shard_size, protect=protected,
                              force=options.force)
        for group in plan.groups:
            for key, tensor in _merge_group(plan.method, group, options, overrides).items():
                if key not in omitted:
                    sink.write(key, tensor.reshape(-1))
        written = sink.finish()
        if folder is None:
            return written
        folder.add_files(files, dtype=None if dtype is None else str(dtype).removeprefix("torch."))
    return folder.folder


def _merge_group(method: str, group: SliceGroup, options: Any,
                 overrides: Callable[[str], Mapping[str, Any]] | Mapping[str, Any] | None) -> dict[str, Any]:
    """One group's tensors, merged in memory over renamed views of its inputs (no tensor copied to rename it)."""

    views = [KeyMapReader(open_checkpoint(path), {k: names[i] for k, names in group.sources.items()})
             for i, path in enumerate(group.models)]
    base = None if group.base is None else KeyMapReader(open_checkpoint(group.base), group.base_sources)
    fixed = dict(overrides or {}) if not callable(overrides) else None

    def variant(key: str) -> dict[str, Any]:
        return {**group.parameters[key], **(fixed if fixed is not None else overrides(key))}  # type: ignore[misc]

    return api.merge_variants(views, method, [(variant, None)], base=base, options=options.model_copy(
        update={"force": False}), progress=False)[0]  # one bar per layer would be noise
