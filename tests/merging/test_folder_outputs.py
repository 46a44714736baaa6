"""Folder outputs are faithful (issue 26, class 7): what transformers loads from a soup folder is the soup, and
every file the output holds is the input's, or named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import soupkit
from soupkit.errors import OutputError


def llama(seed: int, tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=tie))


def test_an_untied_head_is_the_mean_as_transformers_loads_it(tmp_path: Path) -> None:
    folders = []
    for seed in (1, 2):
        llama(seed, tie=False).save_pretrained(tmp_path / f"m{seed}")
        folders.append(tmp_path / f"m{seed}")
    soupkit.merge(folders, "uniform", f"{tmp_path}/soup/")
    soup = LlamaForCausalLM.from_pretrained(tmp_path / "soup")
    heads = [load_file(str(f / "model.safetensors"))["lm_head.weight"] for f in folders]
    assert torch.allclose(soup.lm_head.weight, (heads[0] + heads[1]) / 2, atol=1e-6)
    assert not torch.equal(soup.lm_head.weight, soup.model.embed_tokens.weight)


def test_a_config_that_ties_a_distinct_head_is_refused(tmp_path: Path) -> None:
    """config.json says tie_word_embeddings, the weights hold a trained lm_head: transformers would load the soup's
    head as its embeddings. Refused, naming the config and the input."""
    folders = []
    for seed in (1, 2):
        llama(seed, tie=False).save_pretrained(tmp_path / f"m{seed}")
        config = json.loads((tmp_path / f"m{seed}" / "config.json").read_text())
        (tmp_path / f"m{seed}" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        folders.append(tmp_path / f"m{seed}")
    with pytest.raises(OutputError, match=r"m1/config.json: ties lm_head.weight to model.embed_tokens.weight .*"
                                          r"m1/model.safetensors stores a different lm_head.weight"):
        soupkit.merge(folders, "uniform", f"{tmp_path}/soup/")
    assert not (tmp_path / "soup").exists()
    out = soupkit.merge(folders, "uniform", tmp_path / "soup.safetensors")  # a file output has no config to lie
    assert "lm_head.weight" in load_file(str(out))


def test_an_honest_tie_is_left_out_and_rebuilt(tmp_path: Path) -> None:
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8)).save_pretrained(
            tmp_path / f"g{seed}")
        folders.append(tmp_path / f"g{seed}")
    soupkit.merge(folders, "uniform", f"{tmp_path}/soup/")
    assert "lm_head.weight" not in load_file(str(tmp_path / "soup" / "model.safetensors"))
    soup = GPT2LMHeadModel.from_pretrained(tmp_path / "soup")
    assert torch.equal(soup.lm_head.weight, soup.transformer.wte.weight)


def test_dtype_rewrites_only_the_dtype_of_config_json(tmp_path: Path) -> None:
    folders = []
    for seed in (1, 2):
        llama(seed, tie=True).save_pretrained(tmp_path / f"m{seed}")
        folders.append(tmp_path / f"m{seed}")
    original = json.loads((folders[0] / "config.json").read_text())
    soupkit.merge(folders, "uniform", f"{tmp_path}/soup/", dtype="bf16")
    written = json.loads((tmp_path / "soup" / "config.json").read_text())
    key = "torch_dtype" if "torch_dtype" in original else "dtype"
    assert written[key] == "bfloat16"
    assert list(written) == list(original) if key in original else list(written)[:-1] == list(original)
    assert {k: v for k, v in written.items() if k != key} == {k: v for k, v in original.items() if k != key}
    assert LlamaForCausalLM.from_pretrained(tmp_path / "soup").dtype == torch.bfloat16


def test_every_small_file_is_copied_byte_for_byte(tmp_path: Path) -> None:
    folders = []
    for seed in (1, 2):
        llama(seed, tie=True).save_pretrained(tmp_path / f"m{seed}")
        folders.append(tmp_path / f"m{seed}")
    extras = {"tokenizer.json": b"{" + b" " * (1 << 20) + b"}", "chat_template.jinja": "{{ x }}\u00e9".encode(),
              "vocab.txt": bytes(range(256)), "special_tokens_map.json": b"{}"}
    for name, data in extras.items():
        (folders[0] / name).write_bytes(data)
    soupkit.merge(folders, "uniform", f"{tmp_path}/soup/")
    for name, data in extras.items():
        assert (tmp_path / "soup" / name).read_bytes() == data, name
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "soup" / name).read_bytes() == (folders[0] / name).read_bytes()


def test_a_loose_file_with_a_distinct_head_beside_a_tying_folder_is_refused(tmp_path: Path) -> None:
    llama(1, tie=True).save_pretrained(tmp_path / "m1")
    state = {k: v.clone() for k, v in llama(2, tie=False).state_dict().items()}
    save_file(state, str(tmp_path / "ft.safetensors"))
    with pytest.raises(OutputError, match=r"ft.safetensors stores a different lm_head.weight"):
        soupkit.merge([tmp_path / "m1", tmp_path / "ft.safetensors"], "uniform", f"{tmp_path}/soup/")
