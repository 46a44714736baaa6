"""Merge configs: one YAML file describes a whole merge, validated before any tensor is read.

```yaml
method: ties
base: zeroshot.safetensors          # for methods that need one
models:                             # per-model parameters sit next to each path
  - path: finetuned_a.safetensors
    weight: 1.0                     # -> weights
    density: 0.3                    # -> density (ties' per-model list)
  - path: finetuned_b.safetensors
    weight: 0.5
    density: 0.2
parameters:                         # global parameters of the method
  scaling: 0.8
dtype: bf16                         # any output option (soupkit.options.OutputOptions) but force
include: ["encoder.*"]
exclude: ["*.bias"]
eval: ../digits.yaml                # optional evaluation recipe, validated and passed on (MergeConfig.eval)
tensors:                            # optional per-tensor parameters: the first pattern matching a tensor's
  - match: "layers.0.*"             # name (fnmatch, as include/exclude) updates `parameters` for it
    parameters: {scaling: 0.5}
```

The schema is pydantic: the file's fields below, the output options' fields, and the method's own parameter
model (its signature) for ``parameters`` and the per-model keys, so configs, library calls and CLI flags
accept the same values with the same errors. A model entry's key ``k`` sets the method's per-model parameter
``k`` or ``ks`` (``weight`` -> ``weights``, ``fisher`` -> ``fishers``). Relative paths resolve against the
config file's folder. A mergekit config (``merge_method:``) is read by ``soupkit.merging.mergekit``. Examples
for every method: ``recipes/merges/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError, suggest
from soupkit.merging.api import merge_variants
from soupkit.merging.config_schema import CONFIG_OPTIONS, FIELDS, MergeConfig, _Parser
from soupkit.merging.mergekit import from_mergekit
from soupkit.merging.registry import get_method
from soupkit.options import split_options
from soupkit.yaml_file import read_yaml

__all__ = ["CONFIG_OPTIONS", "FIELDS", "MergeConfig", "load_merge_config", "merge_from_config"]


def load_merge_config(path_or_dict: str | Path | Mapping[str, Any]) -> MergeConfig:
    """Read and validate a merge config (a YAML path or an already-parsed mapping)."""
    if isinstance(path_or_dict, Mapping):
        source, folder, data = "<merge config>", Path.cwd(), path_or_dict
    else:
        path = Path(path_or_dict)
        try:
            exists, regular = path.exists(), path.is_file()
        except OSError as error:  # a name too long for the file system, a symlink loop
            raise RecipeError(f"{path}: cannot read the merge config: {error.strerror}") from None
        if not regular:
            raise RecipeError(f"{path}: " + ("the merge config is not a regular file" if exists
                                             else "no such merge config file"))
        source, folder, data = str(path), path.resolve().parent, read_yaml(path, "merge config")
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a merge config is a mapping with fields {', '.join(FIELDS)}")
    if "merge_method" in data:
        return from_mergekit(data, source, folder)
    return _Parser(source, folder).parse(data)


def merge_from_config(path_or_dict: str | Path | Mapping[str, Any], output: str | Path | None = None, *,
                      progress: bool = False, **overrides: Any) -> Any:
    """Merge as a config describes; returns what ``soupkit.merge`` returns (the state dict, or the written path).

    ``overrides``: output options (or ``options=OutputOptions(...)``: its non-default fields) and method
    parameters; those given take precedence over the config's.
    """
    config = load_merge_config(path_or_dict)
    given, params = split_options(overrides)
    spec = get_method(config.method)
    for name in params:
        if name not in spec.parameters:
            raise RecipeError(f"{config.source}: method {config.method!r} has no parameter {name!r} to override."
                              f"{suggest(name, spec.parameters)}")
    options = config.options.model_copy(update={n: getattr(given, n) for n in given.changed()})
    if config.slices is not None:
        from soupkit.merging.slices import merge_slices  # cycle: slices merges through this module's helpers

        return merge_slices(config.slices, output, options=options, progress=progress, overrides=params,
                            metadata={"soupkit.config": config.source})
    per_key = config.layer_parameters
    variant = {**config.parameters, **params} if per_key is None else (lambda key: {**per_key(key), **params})
    return merge_variants(config.models, config.method, [(variant, output)],
                          base=config.base, options=options, progress=progress,
                          metadata={"soupkit.config": config.source})[0]
