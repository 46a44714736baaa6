"""LoRA adapters as evaluation inputs: scored as W + ΔW over the recipe model's own weights, and soups of adapters
(greedy) written as the adapted models' full weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2LMHeadModel

from soupkit.eval import Evaluator
from soupkit.io import load_checkpoint
from tests.eval.text_models import TextKit, lm_recipe, make_causal_lm


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextKit, list[Path]]:
    kit = make_causal_lm(tmp_path_factory.mktemp("lora-eval"))
    adapters = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(kit.folder),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False,
                                          fan_in_fan_out=True))
        adapters.append(kit.folder.parent / f"adapter{seed}")
        model.save_pretrained(adapters[-1])
    return kit, adapters


def merged(kit: TextKit, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(kit.folder), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_an_adapter_is_scored_as_the_adapted_model(kit, tmp_path: Path) -> None:
    text, adapters = kit
    evaluator = Evaluator.from_recipe(lm_recipe(text), use_cache=False)
    by_adapter = evaluator(adapters[0])
    by_weights = evaluator(merged(text, adapters[0]))
    for name in evaluator.dataset_names:
        assert by_adapter[name].correct == by_weights[name].correct
        if by_adapter[name].loss is not None:
            assert by_adapter[name].loss == pytest.approx(by_weights[name].loss, rel=1e-5)


def test_greedy_soup_of_adapters_writes_full_weights(kit, tmp_path: Path, cli) -> None:
    text, adapters = kit
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(lm_recipe(text)))
    out = tmp_path / "soup.safetensors"
    result = cli("merge", "-m", "greedy", *adapters, "-e", recipe, "-o", out, "-q")
    assert result.code == 0, result.err
    soup = load_checkpoint(out)
    assert "transformer.h.0.attn.c_attn.weight" in soup  # full weights, keyed like the model
    selected = [Path(p).name for p in __import__("json").loads(
        __import__("soupkit").open_checkpoint(out).metadata["soupkit.greedy"])["selected"]]
    states = [merged(text, next(a for a in adapters if a.name == name)) for name in selected]
    want = {k: sum(s[k].double() for s in states) / len(states) for k in soup}
    for key in soup:
        assert torch.allclose(soup[key].double(), want[key], atol=1e-5), key


def test_wise_sweep_of_an_adapter_is_base_plus_alpha_update(kit, tmp_path: Path, cli) -> None:
    text, adapters = kit
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(lm_recipe(text)))
    out = tmp_path / "wise.safetensors"
    result = cli("wise", text.folder, adapters[0], "--alpha", "0:1:0.5", "-e", recipe, "-o", out, "-q")
    assert result.code == 0, result.err
    alpha = __import__("json").loads(__import__("soupkit").open_checkpoint(out).metadata["soupkit.params"])["alpha"]
    base, full = load_checkpoint(text.folder), merged(text, adapters[0])
    soup = load_checkpoint(out)
    for key in soup:
        want = base[key].double() + alpha * (full[key].double() - base[key].double())
        assert torch.allclose(soup[key].double(), want, atol=1e-5), key
