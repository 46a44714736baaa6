"""Invariants every registered merge method gets for free (like timm's test_models over list_models())."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

import soupkit
from soupkit.io import load_checkpoint
from tests.merging.methods._common import FLOAT_KEYS, INT_KEYS, task_states, write

METHODS = soupkit.list_methods()
#: values for required parameters that are numbers (nearswap's t has no default in mergekit either)
REQUIRED_VALUES = {"t": 0.05}


def arguments(name: str, models: list[dict], folder: Path) -> dict[str, Any]:
    """Values for a method's required parameters (auxiliary tensor files are written to ``folder``)."""
    spec = soupkit.get_method(name)
    auxiliary = spec.auxiliary
    params: dict[str, Any] = {}
    for param in spec.parameters.values():
        if not param.required:
            continue
        if param.name in REQUIRED_VALUES:
            params[param.name] = REQUIRED_VALUES[param.name]
            continue
        assert param.name in auxiliary, f"{name}: give the registry tests a value for required {param.name!r}"
        files = []
        for i, model in enumerate(models):
            g = torch.Generator().manual_seed(i)
            files.append(str(write(folder, f"{param.name}{i}",
                                   {k: torch.rand(model[k].shape, generator=g) for k in FLOAT_KEYS})))
        params[param.name] = files
    return params


def model_count(name: str) -> int:
    spec = soupkit.get_method(name)
    return max(spec.min_models, min(3, spec.max_models or 3))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", METHODS)
def test_keys_dtypes_integers_and_streaming(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    spec = soupkit.get_method(name)
    base, models = task_states(model_count(name), spread=0.3)
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    models = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in m.items()} for m in models]
    disagree = len(models) > 1  # nearswap and arcee_fusion take one model (and the base)
    if disagree:
        models[1]["pos_ids"] = models[1]["pos_ids"].flip(0)  # inputs disagree on an integer buffer: first wins
    originals = [{k: v.clone() for k, v in m.items()} for m in models]
    params = arguments(name, models, tmp_path)
    base_arg = base if spec.needs_base else None
    with pytest.warns(UserWarning, match="pos_ids") if disagree else contextlib.nullcontext():
        memory = soupkit.merge(models, name, base=base_arg, **params)
    assert all(same_tensors(m, o) for m, o in zip(models, originals)), "a method modified its inputs in place"
    assert sorted(memory) == sorted(models[0])
    for key, tensor in models[0].items():
        assert memory[key].shape == tensor.shape and memory[key].dtype == tensor.dtype, key
    for key in INT_KEYS:
        assert torch.equal(memory[key], models[0][key])
    paths = [write(tmp_path, f"m{i}", m) for i, m in enumerate(models)]
    base_path = write(tmp_path, "base", base) if spec.needs_base else None
    with pytest.warns(UserWarning, match="pos_ids") if disagree else contextlib.nullcontext():
        written = soupkit.merge(paths, name, tmp_path / "out.safetensors", base=base_path, chunk_elements=5,
                                **params)
    assert same_tensors(load_checkpoint(written), memory)


@pytest.mark.parametrize("name", METHODS)
def test_identical_inputs_come_back_unchanged(tmp_path: Path, name: str) -> None:
    spec = soupkit.get_method(name)
    _, (model, *_) = task_states(1)
    models = [dict(model) for _ in range(model_count(name))]
    out = soupkit.merge(models, name, base=model if spec.needs_base else None, **arguments(name, models, tmp_path))
    assert same_tensors(out, model)


@pytest.mark.parametrize("name", METHODS)
def test_schema_is_documented(name: str) -> None:
    spec = soupkit.get_method(name)
    assert spec.reference and spec.reference.startswith("https://")
    assert spec.description and spec.description != spec.pretty_name
    assert "offset" not in spec.parameters  # engine-supplied, never a user parameter
    from soupkit.report.methods import method_text

    assert name in method_text(name) and spec.reference in method_text(name)
