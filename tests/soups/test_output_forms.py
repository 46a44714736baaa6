"""The soups' command lines write every output form as ``soupkit merge`` does (the merge plan's writers): shards
with an index (the summary names what was written), Hugging Face folders, ``.pt``; a refused option is one line
before any work. The issue's own command lines, through the real CLI and a real digits recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from soupkit.io import load_checkpoint

RECIPE = """
model: {kind: python, factory: "soupkit.demo_train:digits_cnn", num_classes: 10}
data:
  heldout: {kind: digits, split: heldout, size: 16, holdout: 0.1}
  test:
    clean: {kind: digits, split: heldout, size: 16, holdout: 0.1}
batch_size: 256
device: cpu
precision: fp32
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    from soupkit.demo_train import digits_cnn

    folder = tmp_path_factory.mktemp("forms")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        paths.append(folder / f"ck{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in digits_cnn().state_dict().items()}, str(paths[-1]))
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE)
    return paths, recipe


def test_greedy_with_shards_reports_what_was_written(setup, tmp_path: Path, cli) -> None:
    paths, recipe = setup
    out = tmp_path / "out" / "g.safetensors"
    result = cli("merge", "--method", "greedy", *paths, "--eval", recipe, "--shard-size", "20KB", "-o", out,
                 "--no-cache")
    assert result.code == 0, result.err
    index = out.with_name("g.safetensors.index.json")
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1 and all((out.parent / s).exists() for s in shards) and not out.exists()
    summary = "".join(result.err.split())  # rich wraps long paths
    assert f"wrote{index}" in summary and f"{len(shards) + 1}files)" in summary
    assert set(load_checkpoint(index)) == set(load_checkpoint(paths[0]))


def test_greedy_writes_a_hugging_face_folder(setup, tmp_path: Path, cli) -> None:
    """(The learned soup's folder output: tests/merging/test_output_matrix.py, through the library.)"""
    paths, recipe = setup
    result = cli("merge", "-m", "greedy", *paths[:2], "-e", recipe, "-o", f"{tmp_path}/soup/", "-q", "--no-cache")
    assert result.code == 0, result.err
    assert (tmp_path / "soup" / "model.safetensors").exists()
    assert set(load_checkpoint(tmp_path / "soup")) == set(load_checkpoint(paths[0]))


def test_wise_sweep_writes_a_folder_and_a_pt(setup, tmp_path: Path, cli) -> None:
    paths, recipe = setup
    result = cli("wise", paths[0], paths[1], "--alpha", "0:1:0.5", "-e", recipe, "-o", f"{tmp_path}/wise/", "-q",
                 "--no-cache")
    assert result.code == 0, result.err
    assert (tmp_path / "wise" / "model.safetensors").exists()
    result = cli("wise", paths[0], paths[1], "--alpha", "0,1", "-e", recipe, "-o", tmp_path / "w.pt", "-q",
                 "--no-cache")
    assert result.code == 0, result.err
    assert set(torch.load(tmp_path / "w.pt", weights_only=True)) == set(load_checkpoint(paths[0]))


def test_wise_alphas_into_folders(setup, tmp_path: Path, cli) -> None:
    paths, _ = setup
    result = cli("wise", paths[0], paths[1], "--alpha", "0.3,0.7", "-o", f"{tmp_path}/wise/", "-q")
    assert result.code == 0, result.err
    for alpha in ("0.30", "0.70"):
        assert (tmp_path / f"wise_alpha{alpha}" / "model.safetensors").exists()


def test_a_refused_option_is_one_line_before_any_work(setup, tmp_path: Path, cli) -> None:
    paths, recipe = setup
    result = cli("merge", "-m", "greedy", *paths, "-e", recipe, "--shard-size", "20KB", "-o", tmp_path / "g.pt")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "--shard-size does not apply to a .pt/.pth/.bin file" in result.err
    assert not any(tmp_path.iterdir())
