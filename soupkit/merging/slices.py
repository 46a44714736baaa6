"""Frankenmerges: a mergekit config's ``slices:`` (layer ranges of one or more models, stacked or interleaved, each
slice merged with the config's method) written as one model whose ``config.json`` has the new layer count.

``soupkit.merging.mergekit`` reads the config into a ``SlicePlan``: every output tensor, the models (and base) it
is merged from, its name in each of them, and its method parameters (mergekit's gradients run over each slice's
own layers; the tensors outside the layers follow the first slice -- embeddings -- or the last -- final norm,
``lm_head`` -- at t = 0, as mergekit plans them). ``merge_slices`` runs each group of tensors that share their
inputs as one soupkit merge over renamed views of the inputs (``io.views.KeyMapReader``: no tensor is copied to
rename it) and writes the whole result at once, atomically: a Hugging Face folder (the base model's config, else
the first model's, with the layer count -- and ``layer_types`` where the config has them -- of the output) or one
checkpoint file. The result is held in memory (in the output dtype) until it is written: a frankenmerge needs RAM
for its output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    from soupkit.io import open_checkpoint
    from soupkit.io.provenance import ingredient_record, provenance_metadata

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
    path = folder / "config.json" if folder.is_dir() else folder.parent / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def merge_slices(plan: SlicePlan, output: str | Path | None, *, options: Any, progress: bool = False,
                 metadata: Mapping[str, Any] | None = None,
                 overrides: Callable[[str], Mapping[str, Any]] | Mapping[str, Any] | None = None) -> Any:
    """Run ``plan``: the merged state dict (``output=None``), or the written folder or file."""
    from soupkit.io import check_output_path, open_checkpoint, save_checkpoint
    from soupkit.io.hf_folder import is_folder_output, plan_folder_output, save_folder
    from soupkit.io.views import KeyMapReader
    from soupkit.merging.api import merge_variants

    inputs = plan.models
    protected = [Path(p) for p in inputs]
    folder = None
    if output is not None:  # refused before any tensor is read
        if is_folder_output(output, [plan.template]):
            folder = plan_folder_output(output, [plan.template], shard_size=options.shard_size)
            assert folder is not None
            folder.check([f for p in protected for f in (p.glob("*") if p.is_dir() else [p])], force=options.force)
        else:
            check_output_path(output, inputs=protected, force=options.force)
    extra = dict(overrides or {}) if not callable(overrides) else None
    state: dict[str, Any] = {}
    merge_options = options.model_copy(update={"force": False})
    for group in plan.groups:
        views = [KeyMapReader(open_checkpoint(path), {k: names[i] for k, names in group.sources.items()})
                 for i, path in enumerate(group.models)]
        base = None if group.base is None else KeyMapReader(open_checkpoint(group.base), group.base_sources)
        params = group.parameters

        def variant(key: str, params: dict[str, dict[str, Any]] = params) -> dict[str, Any]:
            return {**params[key], **(extra if extra is not None else overrides(key))}  # type: ignore[operator]

        state.update(merge_variants(views, plan.method, [(variant, None)], base=base, options=merge_options,
                                    progress=progress, metadata=metadata)[0])
    if output is None:
        return state
    meta = _provenance(plan, metadata)
    if folder is not None:
        return save_folder(state, folder.folder if os.fspath(output).endswith(("/", os.sep)) else output,
                           [plan.template], metadata=meta, shard_size=options.shard_size, force=options.force,
                           protect=protected, config_updates=plan.config_updates)
    return save_checkpoint(state, output, meta, force=options.force, shard_size=options.shard_size,
                           protect=protected)
