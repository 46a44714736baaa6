"""``soupkit extract-lora`` / ``extract_lora``: adapters real peft loads over the real base model.

At full rank the adapted model is the fine-tune (to fp32 rounding): LoRA factors for linear and GPT-2 Conv1D
layers, embeddings and norms whole in ``modules_to_save`` (or embeddings factorised with ``embed_lora``). At a
lower rank every module's reported error is the truncated SVD's (Eckart-Young: the tail of its singular values),
and equals the error of what peft reconstructs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.golden.models import build_models


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("extract_models"))


def _peft_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def _logits(model, tokens=((1, 5, 9, 2, 33),)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


@pytest.mark.parametrize(("arch", "embed_lora"), [("llama", False), ("mistral", True), ("gpt2", False),
                                                  ("gpt2", True)])
def test_full_rank_gives_back_the_finetune(tmp_path: Path, models: dict[str, Path], arch: str,
                                           embed_lora: bool) -> None:
    from transformers import AutoModelForCausalLM

    from soupkit.merging.extract import extract_lora

    result = extract_lora(models[f"{arch}_ft1"], models[f"{arch}_base"], tmp_path / "adapter", rank=64,
                          embed_lora=embed_lora)
    assert result.errors and max(result.errors.values()) < 1e-6
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    saved = config["modules_to_save"] or []
    # GPT-2 ties its head to wte and has biases (peft's lora_bias has no embedding layer): embeddings whole
    assert any("embed" in m or "wte" in m for m in saved) is not (embed_lora and arch != "gpt2")
    adapted = _peft_model(models[f"{arch}_base"], tmp_path / "adapter")
    finetune = AutoModelForCausalLM.from_pretrained(models[f"{arch}_ft1"]).eval()
    torch.testing.assert_close(_logits(adapted), _logits(finetune), rtol=1e-4, atol=1e-4)
    merged = adapted.merge_and_unload().state_dict()
    for key, tensor in finetune.state_dict().items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-5, atol=1e-5, msg=key)


def test_low_rank_errors_are_the_svd_tail_and_what_peft_rebuilds(tmp_path: Path, models: dict[str, Path],
                                                                 cli) -> None:
    from safetensors.torch import load_file

    result = cli("extract-lora", models["llama_ft1"], models["llama_base"], "--rank", 3, "-o", tmp_path / "ad")
    assert result.code == 0, result.err
    table = {line.split()[0]: line.split() for line in result.out.splitlines()[1:]}
    assert len(table) == 6 * 7 and "overall relative error" in result.err
    base = load_file(models["llama_base"] / "model.safetensors")
    tuned = load_file(models["llama_ft1"] / "model.safetensors")
    merged = _peft_model(models["llama_base"], tmp_path / "ad").merge_and_unload().state_dict()
    for key, (_, shape, rank, error) in table.items():
        delta = (tuned[key] - base[key]).double()
        s = torch.linalg.svdvals(delta)
        tail = (s[3:].square().sum() / s.square().sum()).sqrt().item()
        rebuilt = ((merged[key].double() - base[key].double()) - delta).norm() / delta.norm()
        assert rank == "3" and shape == "x".join(map(str, delta.shape))
        assert float(error) == pytest.approx(tail, rel=1e-3)
        assert rebuilt.item() == pytest.approx(tail, rel=1e-3), key
    for key in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):  # saved whole: exact
        torch.testing.assert_close(merged[key], tuned[key], rtol=0, atol=0)


def test_unchanged_modules_are_left_out(tmp_path: Path, models: dict[str, Path]) -> None:
    """A fine-tune that only moved some modules: the others are not written (peft keeps the base's)."""
    from safetensors.torch import load_file, save_file

    from soupkit.merging.extract import extract_lora

    base = load_file(models["llama_base"] / "model.safetensors")
    tuned = dict(base)
    tuned["model.layers.2.self_attn.q_proj.weight"] = base["model.layers.2.self_attn.q_proj.weight"] + 0.1
    save_file(tuned, str(tmp_path / "ft.safetensors"))
    result = extract_lora(tmp_path / "ft.safetensors", models["llama_base"] / "model.safetensors",
                          tmp_path / "adapter", rank=2)
    assert list(result.ranks) == ["model.layers.2.self_attn.q_proj.weight"]
    assert result.ranks["model.layers.2.self_attn.q_proj.weight"] == 1 or result.errors[
        "model.layers.2.self_attn.q_proj.weight"] < 1e-6  # a constant shift has rank 1
    assert not result.saved_whole and len(result.unchanged) == len(base) - 1


@pytest.mark.parametrize(("args", "needle"), [
    (["--rank", "0"], "--rank must be a positive integer, got 0"),
    (["--rank", "4", "--device", "tpu"], "tpu"),
])
def test_bad_options_are_one_line(tmp_path: Path, models: dict[str, Path], cli, args: list[str],
                                  needle: str) -> None:
    result = cli("extract-lora", models["llama_ft1"], models["llama_base"], *args, "-o", tmp_path / "ad")
    assert result.code == 2 and needle in result.err and result.err.count("\n") == 1
    assert not (tmp_path / "ad").exists()


def test_mismatched_models_are_refused(tmp_path: Path, models: dict[str, Path], cli) -> None:
    result = cli("extract-lora", models["llama_ft1"], models["gpt2_base"], "--rank", 4, "-o", tmp_path / "ad")
    assert result.code == 2 and result.err.count("\n") == 1 and "lacks" in result.err
    assert not (tmp_path / "ad").exists()
