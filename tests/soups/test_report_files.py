"""A soup's report files (its JSON record and plots) follow the checkpoints' rule: named after the output, so two
soups in one folder keep their own; an existing one is replaced only with ``force`` (refused before any work);
and every file a run writes is listed at its end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from soupkit import greedy_soup, wise_sweep
from soupkit.errors import OutputError
from soupkit.io import save_checkpoint


def score(state: dict) -> float:
    """A deterministic held-out 'accuracy' in [0, 1]: closeness of the weights to 1."""
    return float(1.0 / (1.0 + (state["w"] - 1.0).abs().mean()))


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    torch.manual_seed(0)
    return [save_checkpoint({"w": torch.rand(8) + i * 0.1}, tmp_path / f"ft_{i}.safetensors") for i in range(3)]


def test_two_soups_in_one_folder_keep_their_own_reports(inputs, tmp_path: Path) -> None:
    first = greedy_soup(inputs, score, output=tmp_path / "a.safetensors", report_dir=tmp_path)
    second = greedy_soup(inputs, score, output=tmp_path / "b.safetensors", report_dir=tmp_path)
    assert first.report_files == [tmp_path / "a_steps.png", tmp_path / "a.json"]
    assert second.report_files == [tmp_path / "b_steps.png", tmp_path / "b.json"]
    assert all(p.exists() for p in first.report_files + second.report_files)
    sweep = wise_sweep(inputs[0], inputs[1], [0.0, 1.0], score, output=tmp_path / "w.safetensors",
                       report_dir=tmp_path)
    assert sweep.report_files == [tmp_path / "w_curve.png", tmp_path / "w.json"]


def test_an_existing_report_is_replaced_only_with_force(inputs, tmp_path: Path) -> None:
    greedy_soup(inputs, score, output=tmp_path / "soup.safetensors", report_dir=tmp_path)
    (tmp_path / "soup.safetensors").unlink()  # the soup is gone, its report is still there
    before = (tmp_path / "soup.json").read_bytes()
    with pytest.raises(OutputError, match=r"soup\.json exists .*--force"):
        greedy_soup(inputs, score, output=tmp_path / "soup.safetensors", report_dir=tmp_path)
    assert not (tmp_path / "soup.safetensors").exists()  # refused before any work: no partial output
    assert (tmp_path / "soup.json").read_bytes() == before
    result = greedy_soup(inputs, score, output=tmp_path / "soup.safetensors", report_dir=tmp_path, force=True)
    assert result.path.exists() and (tmp_path / "soup.json").exists()
    # without an output the report is named after the algorithm, under the same rule
    greedy_soup(inputs, score, report_dir=tmp_path / "r")
    assert (tmp_path / "r" / "greedy.json").exists()
    with pytest.raises(OutputError, match="greedy.json exists"):
        greedy_soup(inputs, score, report_dir=tmp_path / "r")


def test_every_file_written_is_listed(tmp_path: Path, cli) -> None:
    from soupkit.demo_train import digits_cnn

    torch.manual_seed(0)
    paths = [save_checkpoint(digits_cnn().state_dict(), tmp_path / f"cnn_{i}.safetensors") for i in range(2)]
    out = tmp_path / "out" / "soup.safetensors"
    out.parent.mkdir()
    result = cli("merge", "-m", "greedy", *paths, "--eval", "digits", "-o", out, "--cache-dir", tmp_path / "c")
    assert result.code == 0, result.err
    written = {p.name for p in out.parent.iterdir()}
    assert written == {"soup.safetensors", "soup.json", "soup_steps.png", "soup_scatter.png"}
    listed = set(re.findall(r"wrote (\S+)", " ".join(result.err.split())))
    assert {Path(p).name for p in listed} == written, result.err
    import json

    command = json.loads((out.parent / "soup.json").read_text())["command"]
    assert command.startswith("soupkit merge -m greedy ") and command.endswith(str(tmp_path / "c"))
    again = cli("merge", "-m", "greedy", *paths, "--eval", "digits", "-o", out, "--cache-dir", tmp_path / "c")
    assert again.code == 2 and "exists" in again.err and "--force" in again.err
