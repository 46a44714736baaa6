"""``kind: python`` factories (model and data) in a file beside the recipe import without PYTHONPATH, and only
for that import: ``sys.path`` is restored and an installed module is never shadowed by a file beside a recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from soupkit.errors import RecipeError
from soupkit.eval import Evaluator

FACTORY = '''
import torch
from torch import nn


def tiny(num_classes=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))


def data(n=5):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(3, 4, 4, generator=g), i % 3) for i in range(n)]
'''


def _recipe(folder: Path, module: str) -> Path:
    (folder / f"{module}.py").write_text(FACTORY)
    recipe = {"model": {"kind": "python", "factory": f"{module}:tiny", "num_classes": 3, "input_size": 4},
              "data": {"heldout": {"kind": "python", "factory": f"{module}:data", "kwargs": {"n": 5}}},
              "batch_size": 2, "device": "cpu", "precision": "fp32"}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_factory_beside_the_recipe_imports_and_sys_path_is_restored(tmp_path: Path, monkeypatch) -> None:
    module = "soupkit_test_factory_beside_recipe"
    monkeypatch.chdir(Path(__file__).parent)  # not the recipe's folder: the cwd must not be what makes it work
    before = list(sys.path)
    try:
        evaluator = Evaluator.from_recipe(_recipe(tmp_path, module), use_cache=False)
        assert evaluator.num_examples("heldout") == 5
        state = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
        assert 0.0 <= evaluator(state).accuracy("heldout") <= 1.0
        assert sys.path == before
    finally:
        sys.modules.pop(module, None)


def test_a_file_beside_the_recipe_never_shadows_an_installed_module(tmp_path: Path) -> None:
    (tmp_path / "json.py").write_text("raise RuntimeError('shadowed')\n")
    recipe = {"model": {"kind": "python", "factory": "json:tiny"},
              "data": {"heldout": {"kind": "digits", "split": "heldout"}}, "device": "cpu"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"model.factory: module 'json' has no attribute 'tiny'"):
        Evaluator.from_recipe(path, use_cache=False)


def test_a_missing_factory_module_names_the_folder_it_looked_in(tmp_path: Path) -> None:
    recipe = {"model": {"kind": "python", "factory": "no_such_factory_module:make"},
              "data": {"heldout": {"kind": "digits", "split": "heldout"}}, "device": "cpu"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"cannot import 'no_such_factory_module' \(looked in the recipe's folder"):
        Evaluator.from_recipe(path, use_cache=False)
