"""The doctor on degenerate inputs (issue 22): identical contents, zero task vectors (0/0 cosines), tensors
enormous or tiny in count. Each gives a clear result, never a NaN shown as a finding or a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

import soupkit
from soupkit.diagnosis.stats import MAX_MODULES, module_of


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file(state, str(path))
    return path


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(8, 8, generator=g) * scale, "b.weight": torch.randn(8, generator=g) * scale}


def _finite_or_none(value) -> bool:
    if isinstance(value, list):
        return all(_finite_or_none(v) for v in value)
    if isinstance(value, dict):
        return all(_finite_or_none(v) for v in value.values())
    return value is None or not isinstance(value, float) or math.isfinite(value)


def test_an_ingredient_equal_to_the_base_is_a_duplicate_of_it(tmp_path: Path) -> None:
    base = _state(0)
    paths = [_save(tmp_path / "same.safetensors", base),
             _save(tmp_path / "ft.safetensors", {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()})]
    report = soupkit.doctor(paths, base=_save(tmp_path / "base.safetensors", base), json=tmp_path / "r.json")
    assert report.verdict[str(paths[0])] == "duplicate"
    assert "task vector is zero" in report.reason[str(paths[0])]
    assert report.verdict[str(paths[1])] == "soupable" and report.overall == "will not soup"
    document = json.loads((tmp_path / "r.json").read_text())
    assert _finite_or_none(document)  # the 0/0 cosines are null, never NaN


def test_every_ingredient_equal_to_the_base_is_a_clear_result(tmp_path: Path) -> None:
    base = _state(0)
    paths = [_save(tmp_path / f"copy{i}.safetensors", base) for i in range(3)]
    report = soupkit.doctor(paths, base=_save(tmp_path / "base.safetensors", base))
    assert set(report.verdict.values()) == {"duplicate"} and report.overall == "will not soup"
    assert "0 of 3" in report.overall_reason


def test_identical_contents_under_different_names_are_duplicates(tmp_path: Path) -> None:
    paths = [_save(tmp_path / "a.safetensors", _state(1)), _save(tmp_path / "b.safetensors", _state(1))]
    report = soupkit.doctor(paths)
    assert report.verdict[str(paths[1])] == "duplicate" and "bit-identical" in report.reason[str(paths[1])]


def test_huge_finite_weights_give_finite_numbers(tmp_path: Path) -> None:
    paths = [_save(tmp_path / f"m{i}.safetensors", _state(i, 1e30)) for i in range(3)]
    report = soupkit.doctor(paths, json=tmp_path / "r.json")
    assert _finite_or_none(json.loads((tmp_path / "r.json").read_text()))
    assert all(v is not None and math.isfinite(v) for v in report.norm)


def test_ten_thousand_tiny_tensors_keep_a_bounded_module_table(tmp_path: Path) -> None:
    keys = [f"t{i}.w" for i in range(10_000)]
    assert len(set(module_of(keys, dict.fromkeys(keys, 2)).values())) == MAX_MODULES
    g = torch.Generator().manual_seed(0)
    first = {k: torch.randn(2, generator=g) for k in keys}
    paths = [_save(tmp_path / "a.safetensors", first),
             _save(tmp_path / "b.safetensors", {k: v + 0.01 for k, v in first.items()})]
    report = soupkit.doctor(paths)
    assert len(report.modules) == MAX_MODULES and any("others" in m for m in report.modules)
    assert report.stats["parameters"] == 20_000
