# ruff: noqa: F811  (pytest fixtures imported from tests.io.test_lora are parameters here)
"""LoRA adapters through `soupkit merge` / `soupkit wise` (the library's adapter readers wired into the CLI), checked
against peft itself and loaded back by transformers and peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from peft import PeftModel
from transformers import AutoModelForCausalLM

from soupkit.io import load_checkpoint
from tests.io.test_lora import ADAPTERS, adapters, llama, load_base, peft_merged, rel_err  # noqa: F401  (fixtures)


def mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}


def test_uniform_soup_of_adapters_over_a_base_is_a_folder_transformers_loads(
        tmp_path: Path, llama: Path, adapters: dict[str, Path], cli) -> None:
    a, b = adapters["r4"], adapters["r2-rslora"]
    result = cli("merge", a, b, "--base", llama, "-o", f"{tmp_path / 'soup'}/", "-q")
    assert result.code == 0, result.err
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "soup")
    got = {k: v.detach() for k, v in loaded.state_dict().items()}
    want = mean([peft_merged(llama, a), peft_merged(llama, b)])
    assert rel_err(got, {k: v.float() for k, v in want.items()}) <= 1e-5
    assert (tmp_path / "soup" / "config.json").exists()


def test_ties_of_adapters_acts_on_the_updates(tmp_path: Path, llama: Path, adapters: dict[str, Path],
                                              cli) -> None:
    a, b = adapters["r4"], adapters["patterns"]
    result = cli("merge", a, b, "--base", llama, "-m", "ties", "--density", "1", "-o", tmp_path / "t.safetensors")
    assert result.code == 0, result.err
    base = load_checkpoint(llama)
    soup = load_checkpoint(tmp_path / "t.safetensors")
    untouched = "model.layers.0.mlp.gate_proj.weight"  # no adapter touches it: exactly the base
    assert torch.equal(soup[untouched], base[untouched])


def test_wise_of_an_adapter_is_base_plus_alpha_update(tmp_path: Path, llama: Path, adapters: dict[str, Path],
                                                      cli) -> None:
    result = cli("wise", llama, adapters["r4"], "--alpha", "0.5", "-o", tmp_path / "w.safetensors", "-q")
    assert result.code == 0, result.err
    base = load_checkpoint(llama)
    full = peft_merged(llama, adapters["r4"])
    got = load_checkpoint(tmp_path / "w.safetensors")
    want = {k: base[k].double() + 0.5 * (full[k].double() - base[k].double()) for k in got}
    assert rel_err(got, {k: v.float() for k, v in want.items()}) <= 1e-5


def test_adapters_without_a_base_write_an_exact_adapter_peft_loads(
        tmp_path: Path, llama: Path, adapters: dict[str, Path], cli) -> None:
    a, b = adapters["r4"], adapters["r2-rslora"]
    result = cli("merge", a, b, "-o", tmp_path / "soup_adapter", "-q")
    assert result.code == 0, result.err
    merged = PeftModel.from_pretrained(load_base(llama), tmp_path / "soup_adapter").merge_and_unload()
    got = {k: v.detach() for k, v in merged.state_dict().items()}
    want = mean([peft_merged(llama, a), peft_merged(llama, b)])
    assert rel_err(got, {k: v.float() for k, v in want.items()}) <= 1e-5


def test_a_nonlinear_method_without_base_names_both_ways_out(tmp_path: Path, adapters: dict[str, Path],
                                                             cli) -> None:
    result = cli("merge", adapters["r4"], adapters["patterns"], "-m", "ties", "-o", tmp_path / "x")
    assert result.code == 2 and "--base BASE" in result.err and "--rank R" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    result = cli("merge", adapters["r4"], adapters["patterns"], "-m", "ties", "--rank", "4", "-o", tmp_path / "x")
    assert result.code == 0, result.err
    assert "relative reconstruction error" in result.err
    assert (tmp_path / "x" / "adapter_config.json").exists()


def test_an_adapter_mixed_with_a_full_model_needs_the_base(tmp_path: Path, llama: Path, adapters: dict[str, Path],
                                                           cli) -> None:
    result = cli("merge", llama, adapters["r4"], "-o", tmp_path / "m.safetensors")
    assert result.code == 2 and "LoRA adapter" in result.err and "--base" in result.err, result.err
    assert not (tmp_path / "m.safetensors").exists()
