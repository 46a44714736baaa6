"""Merge configs: every example in recipes/merges/ runs, and every mistake is one error naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import soupkit
from soupkit.errors import RecipeError, SoupkitError
from soupkit.io import load_checkpoint
from soupkit.merging.config import load_merge_config, merge_from_config
from tests.merging.methods._common import FLOAT_KEYS, task_states, write

EXAMPLES = sorted((Path(__file__).parents[3] / "recipes" / "merges").glob("*.yaml"))


def test_an_example_for_every_method() -> None:
    assert {yaml.safe_load(p.read_text())["method"] for p in EXAMPLES} >= set(soupkit.list_methods())


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_run_with_real_files(tmp_path: Path, example: Path) -> None:
    """Each example, with its placeholder paths swapped for real files, gives what merge() gives."""
    config = yaml.safe_load(example.read_text())
    spec = soupkit.get_method(config["method"])
    base, models = task_states(len(config["models"]), spread=0.3)
    paths = [write(tmp_path, f"m{i}", m) for i, m in enumerate(models)]
    entries = []
    for i, entry in enumerate(config["models"]):
        entry = {"path": entry} if isinstance(entry, str) else dict(entry)
        entry["path"] = paths[i].name  # relative: resolved against the config's folder
        for key in entry:
            if f"{key}s" in spec.auxiliary or key in spec.auxiliary:
                entry[key] = write(tmp_path, f"{key}{i}", {k: torch.rand(models[i][k].shape) for k in FLOAT_KEYS}).name
        entries.append(entry)
    config["models"] = entries
    if "base" in config:
        config["base"] = write(tmp_path, "base", base).name
    if "eval" in config:
        (tmp_path / "recipe.yaml").write_text("dataset: digits\n")
        config["eval"] = "recipe.yaml"
    config_path = tmp_path / "merge.yaml"
    config_path.write_text(yaml.safe_dump(config))

    parsed = load_merge_config(config_path)
    assert parsed.models == paths and parsed.method == config["method"]
    assert parsed.eval == (str(tmp_path / "recipe.yaml") if "eval" in config else None)
    written = merge_from_config(config_path, tmp_path / "out.safetensors")
    expected = soupkit.merge(parsed.models, parsed.method, base=parsed.base, dtype=parsed.dtype,
                             include=parsed.include, exclude=parsed.exclude, **parsed.parameters)
    result = load_checkpoint(written)
    assert result.keys() == expected.keys() and all(torch.equal(result[k], expected[k]) for k in result)


def test_per_model_parameters_and_overrides(tmp_path: Path) -> None:
    base, models = task_states(2, spread=0.3)
    config = {"method": "ties", "base": str(write(tmp_path, "base", base)),
              "models": [{"path": str(write(tmp_path, "a", models[0])), "weight": 2.0, "density": 0.5},
                         {"path": str(write(tmp_path, "b", models[1])), "density": 0.3}],
              "parameters": {"scaling": 0.5}}
    parsed = load_merge_config(config)
    assert parsed.parameters == {"scaling": 0.5, "weights": [2.0, 1.0], "density": [0.5, 0.3]}
    out = merge_from_config(config, scaling=0.25, dtype="bf16", include=())
    expected = soupkit.merge(parsed.models, "ties", base=parsed.base, weights=[2.0, 1.0], density=[0.5, 0.3],
                             scaling=0.25)
    for key in FLOAT_KEYS:
        assert out[key].dtype == torch.bfloat16
        assert torch.equal(out[key], expected[key].to(torch.bfloat16))


A, B = "a.safetensors", "b.safetensors"
BAD = [
    ({"methd": "ties"}, r"unknown field 'methd'. Did you mean 'method'\? Valid fields: method, models, base"),
    ({"method": "tie"}, r"unknown merge method 'tie'. Did you mean 'ties'\?"),
    ({"models": []}, r"models: List should have at least 1 item"),
    ({"models": [{"weight": 1.0}]}, r"models\[0\]: expected a path or a mapping with a 'path' field"),
    ({"models": [A, "missing.safetensors"]}, r"models\[1\].path: .*missing.safetensors: no such file"),
    ({"models": [{"path": A, "densty": 0.2}, B]}, r"models\[0\].densty: .*Did you mean 'density'\?"),
    ({"models": [{"path": A, "density": 0.2}, B]}, r"models\[1\]: no 'density' \(other models set one\)"),
    ({"parameters": {"scalin": 2}}, r"parameters.scalin: .*Did you mean 'scaling'\?"),
    ({"parameters": {"density": 1.5}}, r"ties: density\[0\] must be in \(0, 1\]"),
    ({"base": None}, r"base: method 'ties' needs a base model"),
    ({"base": "nowhere.safetensors"}, r"base: .*nowhere.safetensors: no such file"),
    ({"dtype": "int8"}, r"unknown dtype 'int8'"),
    ({"include": [3]}, r"include: expected a glob or a list of globs"),
    ({"eval": "missing_recipe.yaml"}, r"eval: .*missing_recipe.yaml: no such file"),
    ({"method": "uniform", "base": "base.safetensors"}, r"base: method 'uniform' does not use a base model"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_config_errors_name_the_file_and_field(tmp_path: Path, change: dict, message: str) -> None:
    base, models = task_states(2)
    for name, state in [("a", models[0]), ("b", models[1]), ("base", base)]:
        write(tmp_path, name, state)
    config = {"method": "ties", "base": "base.safetensors", "models": ["a.safetensors", "b.safetensors"]}
    config.update(change)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SoupkitError, match=message) as caught:
        merge_from_config(path, tmp_path / "out.safetensors")
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such merge config file"):
        load_merge_config(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("method: [ties\n")
    with pytest.raises(RecipeError, match=r"broken.yaml: not valid YAML \(line \d+\)"):
        load_merge_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- ties\n")
    with pytest.raises(RecipeError, match="list.yaml: a merge config is a mapping"):
        load_merge_config(tmp_path / "list.yaml")
    models = [str(write(tmp_path, name, task_states(1)[0])) for name in "xy"]
    with pytest.raises(RecipeError, match="no parameter 'alpah' to override. Did you mean 'alpha'"):
        merge_from_config({"method": "wise", "models": models}, alpah=0.3)


def test_cli_merge_config(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from soupkit.cli import app

    if "--config" not in CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "200"}).output:
        pytest.skip("soupkit merge has no --config yet (soupkit/cli/merge_cmd.py is being written)")
    base, models = task_states(2)
    config = {"method": "task_arithmetic", "base": write(tmp_path, "base", base).name,
              "models": [{"path": write(tmp_path, f"m{i}", m).name, "weight": 0.5} for i, m in enumerate(models)]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    result = cli("merge", "--config", "merge.yaml", "-o", "out.safetensors", "-q")
    assert result.code == 0, result.err
    expected = soupkit.merge(models, "task_arithmetic", base=base, weights=[0.5, 0.5])
    written = load_checkpoint(tmp_path / "out.safetensors")
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    config["parameters"] = {"scaling": "lots"}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    result = cli("merge", "--config", "merge.yaml", "-o", "out2.safetensors")
    assert result.code == 2 and result.err.count("\n") == 1 and "merge.yaml: " in result.err, result.err
    assert "scaling must be a number, got lots" in result.err
