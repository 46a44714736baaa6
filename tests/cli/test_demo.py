"""`soupkit demo --quick` end to end: the JSON's structure, real accuracies, reproducibility, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import soupkit
from soupkit.demo import HOLDOUT, IMAGE_SIZE, run_demo
from soupkit.demo_train import digits_cnn

MODELS = {"pretrained", "best individual", "uniform soup", "greedy soup", "learned soup"}
DATASETS = {"heldout", "clean", "noise", "rotation", "blur", "inversion", "occlusion", "mean_shift"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, quick=True, seed=0, log=lambda _: None)
    return out, json.loads((out / "demo.json").read_text())


def test_demo_json_structure_and_files(quick_run) -> None:
    out, report = quick_run
    assert set(report["models"]) >= MODELS and any(m.startswith("WiSE-FT (alpha=") for m in report["models"])
    for model, row in report["models"].items():
        assert set(row) == DATASETS, model
        for dataset, value in row.items():
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (model, dataset, value)
    assert len(report["ingredients"]) == 4 and report["greedy"]["ingredients"]
    assert report["summary"].startswith("The pretrained model scores")
    assert report["doctor"]["overall"] in report["summary"] and report["doctor"]["names"]
    assert set(report["doctor"]["verdict"].values()) <= {"soupable", "duplicate", "different_basin"}
    for name in ("greedy_soup_scatter.png", "wise_curve.png", "doctor_angles.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    meta = soupkit.open_checkpoint(out / "ingredients" / "finetuned_00.safetensors").metadata
    assert float(meta["demo.lr"]) == report["ingredients"][0]["lr"]


def test_demo_accuracies_are_computed_from_the_data(quick_run) -> None:
    """Recompute the pretrained model's clean and held-out accuracy by hand: the JSON must match exactly."""
    from soupkit.eval.data.digits import load_digits_split

    out, report = quick_run
    model = digits_cnn()
    model.load_state_dict(soupkit.load_checkpoint(out / "pretrained.safetensors"))
    model.eval()
    for split, column in (("test", "clean"), ("heldout", "heldout")):
        images, labels = load_digits_split(split, size=IMAGE_SIZE, seed=0, holdout=HOLDOUT)
        with torch.no_grad():
            correct = (model(images).argmax(1) == labels).sum().item()
        assert report["models"]["pretrained"][column] == pytest.approx(correct / len(labels), abs=1e-12)


@pytest.mark.slow  # a second demo run (seconds of training); the default `pytest -q` still runs it
def test_demo_is_reproducible_and_reuses_work(quick_run, tmp_path: Path) -> None:
    out, report = quick_run
    again = run_demo(tmp_path, quick=True, seed=0, log=lambda _: None).to_dict()
    assert again["models"] == report["models"] and again["ingredients"] == report["ingredients"]
    # the README's promise: same --seed, byte-identical demo.json, wherever the run was written
    assert (tmp_path / "demo.json").read_bytes() == (out / "demo.json").read_bytes()
    logged: list[str] = []
    run_demo(tmp_path, quick=True, seed=0, log=logged.append)
    assert not any(line.startswith(("pretraining", "fine-tuning")) for line in logged), logged


def test_demo_json_holds_no_timings_or_paths_of_this_run(quick_run) -> None:
    out, report = quick_run
    text = (out / "demo.json").read_text()
    assert str(out) not in text and "seconds" not in text and "memory" not in text
    assert report["greedy"]["names"][0] == "finetuned_00.safetensors"
    run = json.loads((out / "demo_run.json").read_text())
    assert run["out"] == str(out) and run["seconds"] > 0
    assert set(run["soups"]) == {"greedy", "learned", "wise"} and "seconds" in run["soups"]["greedy"]["stats"]


def test_split_record_moves_what_changes_between_runs(tmp_path: Path) -> None:
    from soupkit.demo import split_record
    from soupkit.soups.result import SoupResult

    names = [str(tmp_path / "ingredients" / f"ft_{i}.safetensors") for i in range(2)]
    soup = SoupResult("greedy", names, [1], [0.5, 0.75], [], 0.75, path=tmp_path / "soup.safetensors",
                      stats={"seconds": 1.25, "memory_free_bytes": 123}, extra={"scatter": [{"label": names[1]}]})
    record, run = split_record(soup, tmp_path)
    assert record["names"] == ["ingredients/ft_0.safetensors", "ingredients/ft_1.safetensors"]
    assert record["extra"]["scatter"][0]["label"] == "ingredients/ft_1.safetensors"
    assert "stats" not in record and "path" not in record and "report_files" not in record
    assert run == {"stats": {"seconds": 1.25, "memory_free_bytes": 123}, "path": "soup.safetensors",
                   "report_files": [], "command": None}


def test_the_demo_evaluates_through_the_bundled_recipe(quick_run) -> None:
    from soupkit.eval.recipe import find_recipe
    from soupkit.yaml_file import read_yaml

    out, _ = quick_run
    used = read_yaml(out / "recipe.yaml", "recipe")
    bundled = read_yaml(find_recipe("digits"), "recipe")
    assert used == {**bundled, "device": "cpu"}
    assert bundled["data"]["heldout"]["holdout"] == HOLDOUT


@pytest.mark.slow
def test_readme_cli_commands_reproduce_the_demos_picks(quick_run, tmp_path: Path, monkeypatch) -> None:
    """The README's greedy and WiSE-FT commands, run on the demo's files with the recipe it wrote (and a fresh
    score cache), keep the same ingredients and pick the same α as the demo."""
    from soupkit.cli import main

    out, report = quick_run
    monkeypatch.setenv("SOUPKIT_CACHE_DIR", str(tmp_path / "cache"))
    recipe = str(out / "recipe.yaml")
    ingredients = sorted(str(p) for p in (out / "ingredients").glob("*.safetensors"))  # what a shell glob gives
    for argv in (["merge", "--method", "greedy", *ingredients, "--eval", recipe, "-o", str(tmp_path / "g.safetensors")],
                 ["wise", str(out / "pretrained.safetensors"), str(out / "ingredients" / report["wise"]["names"][1]),
                  "--alpha", "0:1:0.1", "--eval", recipe, "-o", str(tmp_path / "w.safetensors")]):
        try:
            main(argv)
        except SystemExit as exit_info:
            assert exit_info.code in (0, None), argv
    greedy = json.loads(soupkit.open_checkpoint(tmp_path / "g.safetensors").metadata["soupkit.greedy"])
    assert greedy["selected"] == report["greedy"]["ingredients"]
    wise = soupkit.open_checkpoint(tmp_path / "w.safetensors").metadata
    assert json.loads(wise["soupkit.params"])["alpha"] == report["wise"]["extra"]["alpha"]


def test_search_on_the_demos_ingredients_is_no_worse_than_the_defaults(quick_run) -> None:
    """Issue 24: on the demo's ingredients, with a fixed seed, the searched TIES merge scores at least the method
    at its defaults on the held-out set (the defaults are the search's first candidate)."""
    from soupkit.eval import Evaluator
    from soupkit.soups.merge_search import search

    out, _ = quick_run
    ingredients = sorted((out / "ingredients").glob("*.safetensors"))
    evaluator = Evaluator.from_recipe(out / "recipe.yaml", use_cache=False)
    result = search(ingredients, "ties", evaluator, base=out / "pretrained.safetensors", budget=8, seed=0,
                    compare=False)
    defaults = result.candidates[0]
    assert defaults.parameters == {} and result.best.correct >= defaults.correct
    assert result.best.correct > defaults.correct  # on these ingredients TIES' defaults leave room: found
