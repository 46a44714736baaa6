"""One vocabulary for devices and dtypes (soupkit.options): merges, recipes and the evaluator accept and refuse
the same names with the same words; method defaults are the true ones, shown and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import soupkit
from soupkit.errors import ParameterError, RecipeError
from soupkit.io import open_checkpoint
from soupkit.merging.registry import get_method
from soupkit.options import DEVICE_KINDS, OutputOptions, device_name, dtype_name, parse_dtype, resolve_device


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_merges_and_recipes_accept_the_same_devices(device: str) -> None:
    from soupkit.eval.recipe import load_recipe

    assert OutputOptions(device=device).device == device
    recipe = load_recipe({"model": {"kind": "python", "factory": "soupkit.demo_train:digits_cnn"},
                          "data": {"heldout": {"kind": "digits", "split": "heldout"}}, "device": device})
    assert recipe.device == device


@pytest.mark.parametrize("device", ["xla", "cuda:x", "cpu:0", "mps:1", "meta", "tpu"])
def test_merges_and_recipes_refuse_the_same_devices_in_the_same_words(device: str) -> None:
    from soupkit.eval.recipe import load_recipe

    words = f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps"
    with pytest.raises(ParameterError, match=f"device: {words}"):
        OutputOptions.build({"device": device})
    with pytest.raises(RecipeError, match=f"device: {words}"):
        load_recipe({"model": {"kind": "python", "factory": "soupkit.demo_train:digits_cnn"},
                     "data": {"heldout": {"kind": "digits", "split": "heldout"}}, "device": device})
    with pytest.raises(ParameterError, match=words):
        resolve_device(device)
    assert set(DEVICE_KINDS) == {"auto", "cpu", "cuda", "mps"}


def test_devices_this_machine_lacks_are_one_line_errors() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="cuda: CUDA is not available on this machine"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ParameterError, match="mps: MPS is not available on this machine"):
            resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("given", "canonical"), [("bf16", "bf16"), ("bfloat16", "bf16"), (torch.bfloat16, "bf16"),
                                                  ("half", "fp16"), ("float32", "fp32"), ("double", "fp64")])
def test_one_dtype_vocabulary(given, canonical: str) -> None:
    assert dtype_name(given) == canonical == OutputOptions(dtype=given).dtype
    assert parse_dtype(given) == getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
                                                 "fp64": "float64"}[canonical])
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        dtype_name(torch.int8)
    assert device_name(torch.device("cpu")) == "cpu"


def test_true_defaults_are_shown_and_recorded(tmp_path: Path, make_ckpt) -> None:
    from soupkit.report.methods import method_text

    ties = get_method("ties")
    assert ties.parameters["density"].default == 0.2 and ties.parameters["convention"].choices == ("soupkit",
                                                                                                    "mergekit")
    text = method_text("ties")
    assert "--density (float per model, default 0.2)" in text and "'soupkit' | 'mergekit'" in text
    a, b, base = make_ckpt("a", 0), make_ckpt("b", 1), make_ckpt("base", 2)
    out = soupkit.merge([a, b], "ties", tmp_path / "t.safetensors", base=base)
    with open_checkpoint(out) as reader:
        params = json.loads(reader.metadata["soupkit.params"])
    assert params["density"] == [0.2, 0.2] and params["weights"] == [1.0, 1.0] and params["convention"] == "soupkit"
    with pytest.raises(ParameterError, match="ties: convention must be one of soupkit, mergekit, got 'x'"):
        ties.bind({"convention": "x"}, 2)
