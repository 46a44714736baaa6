"""Recipe validation: every error is one line naming the file and the field, with a suggestion where one helps;
shipped recipes load; bare names resolve on the search path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from soupkit.errors import RecipeError
from soupkit.eval import load_recipe
from soupkit.eval.recipe import available_recipes, builtin_folder, find_recipe
from soupkit.eval.registry import AdapterRegistry
from tests.eval.helpers import digits_recipe

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def error_of(source) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(source)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("change", "expected"), [
    (lambda r: r.update(bach_size=8), r"recipe.yaml: bach_size: unknown key 'bach_size'. Did you mean 'batch_size'\?"),
    (lambda r: r["data"].update(tests={}), r"recipe.yaml: data.tests: unknown key 'tests'. Did you mean 'test'\?"),
    (lambda r: r["model"].update(factroy="x:y"),
     r"recipe.yaml: model.factroy: unknown key 'factroy'. Did you mean 'factory'\? Allowed: kind, factory"),
    (lambda r: r["data"]["heldout"].update(spilt="test"),
     r"data.heldout.spilt: unknown key 'spilt'. Did you mean 'split'\?.*class_subset"),
    (lambda r: r["data"]["test"]["clean"].update(kind="imagefolders"),
     r"data.test.clean.kind: unknown data kind 'imagefolders'. Did you mean 'imagefolder'\? Available: csv, digits, "),
    (lambda r: r["model"].update(kind="tim"), r"model.kind: unknown model kind 'tim'. Did you mean 'timm'\?"),
    (lambda r: r["model"].pop("kind"), r"model.kind: missing; one of open_clip, python, timm"),
    (lambda r: r["data"]["test"]["noise"].update(shift="fog"), r"data.test.noise.shift: Input should be 'noise'"),
    (lambda r: r.update(precision="fp8"), r"recipe.yaml: precision: Input should be 'auto', 'fp32'"),
    (lambda r: r.update(batch_size=0), r"recipe.yaml: batch_size: Input should be greater than 0"),
    (lambda r: r.update(memory_format="nhwc"), r"recipe.yaml: memory_format: Input should be 'auto', 'channels_last'"),
    (lambda r: r.update(device="gpu"),
     r"recipe.yaml: device: unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"),
    (lambda r: r.pop("model"), r"recipe.yaml: model: missing required key"),
    (lambda r: r["data"]["test"].update(heldout={"kind": "digits"}), r"data.test.heldout: the name 'heldout' is"),
    (lambda r: r["data"]["test"]["noise"].update(role="ood"), r"data.test.noise.role: expected in_distribution or"),
    (lambda r: r["data"]["heldout"].update(holdout_fraction=1.5), r"data.heldout.holdout_fraction: expected a num"),
    (lambda r: r["data"]["heldout"].update(class_subset=[1, 1]), r"data.heldout.class_subset: expected distinct"),
    (lambda r: r["data"]["heldout"].update(class_subset="ids.txt"), r"class_subset: cannot read class-subset file"),
    (lambda r: r["data"]["heldout"].update(kind="tensors", path="${SOUPKIT_TEST_UNSET}/x.pt", split=None),
     r"data.heldout.spl"),
])
def test_errors_name_the_file_and_field(tmp_path, change, expected):
    recipe = digits_recipe()
    change(recipe)
    message = error_of(write(tmp_path, recipe))
    assert str(tmp_path / "recipe.yaml") in message
    assert __import__("re").search(expected, message), message


def test_unset_variables_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("SOUPKIT_TEST_UNSET", raising=False)
    recipe = digits_recipe(data={"heldout": {"kind": "tensors", "path": "${SOUPKIT_TEST_UNSET}/held.safetensors"}})
    assert "data.heldout.path: environment variable SOUPKIT_TEST_UNSET is not set" in error_of(write(tmp_path, recipe))
    assert error_of(tmp_path / "nope.yaml").startswith(
        f"{tmp_path / 'nope.yaml'}: no such recipe file. Recipes by name (--eval NAME): ")
    assert "Did you mean 'digits'?" in error_of(tmp_path / "digitz.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {kind: python\n")
    assert error_of(bad).startswith(f"{bad}: not valid YAML (line 2)")
    bad.write_text("- a list\n")
    assert "a recipe is a mapping" in error_of(bad)
    # a missing data file is reported when the evaluator is built, before the model, naming the recipe field
    from soupkit.eval import Evaluator

    recipe = digits_recipe(data={"heldout": {"kind": "tensors", "path": "held.safetensors"}})
    with pytest.raises(RecipeError, match=rf"{tmp_path / 'recipe.yaml'}: data.heldout.path: .*held.safetensors does"):
        Evaluator.from_recipe(write(tmp_path, recipe), use_cache=False)


def test_relative_paths_resolve_against_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ids.txt").write_text("3  # three\n5, 7\n")
    recipe = digits_recipe(data={"heldout": {"kind": "tensors", "path": "held.safetensors",
                                             "class_subset": "ids.txt"}})
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(write(tmp_path / "sub", recipe))
    spec = loaded.datasets["heldout"]
    assert spec.params["path"] == tmp_path / "sub" / "held.safetensors" and spec.class_subset == (3, 5, 7)
    assert spec.role == "heldout" and loaded.heldout_name == "heldout"


def test_roles_default_to_first_test_set_in_distribution(tmp_path):
    recipe = digits_recipe()
    assert load_recipe(recipe).shift_names == ["noise"]
    recipe["data"]["test"]["clean"]["role"] = "shift"
    recipe["data"]["test"]["noise"]["role"] = "in_distribution"
    loaded = load_recipe(recipe)
    assert loaded.test_names == ["clean", "noise"] and loaded.shift_names == ["clean"]


def test_bare_names_and_the_search_path(tmp_path, monkeypatch):
    assert {"digits", "clip-vit-b32-imagenet", "timm-imagefolder"} <= set(available_recipes())
    assert find_recipe("digits") == builtin_folder() / "digits.yaml"
    monkeypatch.setenv("SOUPKIT_RECIPE_PATH", str(tmp_path))
    write(tmp_path, digits_recipe(batch_size=7), "digits.yaml")  # user folders come first
    assert load_recipe("digits").batch_size == 7
    with pytest.raises(RecipeError, match=r"recipe 'digts' not found .* Did you mean 'digits'\? Available: "):
        load_recipe("digts")


def test_top_level_recipes_are_the_packaged_ones():
    for packaged in builtin_folder().glob("*.yaml"):
        top = REPO / "recipes" / packaged.name
        assert top.resolve() == packaged.resolve(), f"recipes/{packaged.name} should link to {packaged}"


def test_shipped_recipes_validate(tmp_path, monkeypatch):
    assert load_recipe("digits").shift_names == ["noise", "rotation", "blur", "inversion", "occlusion"]
    for var in ("IMAGENET_DIR", "IMAGENET_SHIFTS_DIR", "DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    for name in ("imagenet-r", "imagenet-a"):
        (tmp_path / f"{name}-class-ids.txt").write_text("\n".join(str(i) for i in range(0, 1000, 5)))
    clip = load_recipe("clip-vit-b32-imagenet")
    assert clip.test_names[0] == "imagenet" and len(clip.shift_names) == 5
    assert len(clip.datasets["imagenet-r"].class_subset) == 200
    assert clip.datasets["heldout"].params["path"] == tmp_path / "train"
    assert load_recipe("timm-imagefolder").model.params["name"] == "resnet50"
    monkeypatch.delenv("IMAGENET_DIR")
    assert "IMAGENET_DIR is not set" in error_of("clip-vit-b32-imagenet")


def test_registry_refuses_duplicates_and_lists_choices():
    registry = AdapterRegistry("widget kind", "soupkit.eval.models", "soupkit.test-widgets")

    @registry.register("a")
    def a(x: int = 1, *, context=None):
        """An a."""

    with pytest.raises(ValueError, match="widget kind 'a' is already registered"):
        registry.register("a")(a)
    with pytest.raises(RecipeError, match=r"unknown widget kind 'b'. Available: a"):
        registry.get("b")
    assert registry.validate("a", {}, where="r: model", folder=Path()) == {"x": 1}
    with pytest.raises(RecipeError, match=r"r: model.x: Input should be a valid integer"):
        registry.validate("a", {"x": "many"}, where="r: model", folder=Path())
