"""Hugging Face folders: tied keys save_pretrained omits, folder outputs transformers loads, provenance, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
    T5Config,
    T5ForConditionalGeneration,
)

import soupkit
from soupkit import inspection
from soupkit.errors import OutputError
from soupkit.io import load_checkpoint, open_checkpoint
from soupkit.io.hf_folder import DEFAULT_SHARD_SIZE, plan_folder_output, save_folder
from tests.conftest import digest


def gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["the", "a", "soup", "of", "weights", "is", "good"])}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("hf")
    paths = []
    for seed in (1, 2):
        path = root / f"run-{seed}"
        gpt2(seed).save_pretrained(path)
        paths.append(path)
    tokenizer().save_pretrained(paths[0])
    return paths


ARCHITECTURES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       tie_word_embeddings=True)),
    "bert-mlm": lambda: BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=24)),
    "roberta-mlm": lambda: RobertaForMaskedLM(RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                            num_attention_heads=2, intermediate_size=24)),
    "t5": lambda: T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_ff=24, num_layers=1,
                                                      num_heads=2, d_kv=8)),
    "bart": lambda: BartForConditionalGeneration(BartConfig(vocab_size=40, d_model=16, encoder_layers=1,
                                                            decoder_layers=1, encoder_attention_heads=2,
                                                            decoder_attention_heads=2, encoder_ffn_dim=24,
                                                            decoder_ffn_dim=24, max_position_embeddings=16)),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_tied_keys_omitted_by_save_pretrained_read_from_their_partner(arch: str, tmp_path: Path) -> None:
    model = ARCHITECTURES[arch]()
    model.save_pretrained(tmp_path)
    full = model.state_dict()
    with open_checkpoint(tmp_path) as reader:
        assert set(reader.keys()) == set(full), "the tie rules miss a key transformers ties"
        assert set(reader.tied_keys()) == set(getattr(model, "all_tied_weights_keys", model._tied_weights_keys))
        for key in full:
            assert torch.equal(reader.get(key), full[key])


def test_untied_config_adds_no_alias(tmp_path: Path) -> None:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=False))
    model.save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as reader:
        assert "lm_head.weight" in reader and reader.tied_keys() == {}
        assert torch.equal(reader.get("lm_head.weight"), model.state_dict()["lm_head.weight"])


def test_soup_of_a_folder_and_a_state_dict_file_averages_the_tied_head(folders: list[Path], tmp_path: Path) -> None:
    other = gpt2(3)
    torch.save(other.state_dict(), tmp_path / "other.bin")  # torch.save keeps lm_head (sharing wte's storage)
    soup = soupkit.merge([folders[0], tmp_path / "other.bin"], "uniform")
    wte = (load_checkpoint(folders[0])["transformer.wte.weight"] + other.state_dict()["transformer.wte.weight"]) / 2
    assert torch.allclose(soup["transformer.wte.weight"], wte)
    assert torch.allclose(soup["lm_head.weight"], wte)  # never one input's stale copy


def test_folder_output_loads_with_from_pretrained(folders: list[Path], tmp_path: Path) -> None:
    soup = soupkit.merge(folders, "uniform")
    before = {p: digest(p) for f in folders for p in f.iterdir()}
    out = save_folder(soup, tmp_path / "soup", folders, protect=[f / "model.safetensors" for f in folders])
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json",
                                               "tokenizer.json", "tokenizer_config.json"}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # tied: left out as save_pretrained does
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for key, value in soup.items():
        assert torch.equal(state[key], value)
    assert AutoTokenizer.from_pretrained(out)("the soup is good")["input_ids"] == [1, 3, 6, 7]
    assert {p: digest(p) for f in folders for p in f.iterdir()} == before
    assert not list(out.glob(".*soupkit-tmp"))


def test_sharded_folder_output(folders: list[Path], tmp_path: Path) -> None:
    soup = soupkit.merge(folders, "uniform")
    out = save_folder(soup, tmp_path / "sharded", folders, shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(state[k], v) for k, v in soup.items())


def test_plan_folder_output_decides_by_path_and_inputs(folders: list[Path], tmp_path: Path) -> None:
    assert plan_folder_output(tmp_path / "soup.safetensors", folders) is None
    planned = plan_folder_output(f"{tmp_path}/soup/", [tmp_path / "x.safetensors"])
    assert planned is not None and planned.template is None
    assert planned.weights == tmp_path / "soup" / "model.safetensors"
    planned = plan_folder_output(tmp_path / "soup", folders)  # no suffix, folder inputs
    assert planned is not None and planned.template == folders[0] and planned.shard_size == DEFAULT_SHARD_SIZE
    assert plan_folder_output(tmp_path / "soup", [tmp_path / "a.safetensors"]) is None
    assert plan_folder_output(tmp_path, [tmp_path / "a.safetensors"]) is not None  # an existing directory
    adapter = plan_folder_output(f"{tmp_path}/ad/", folders, adapter=True)
    assert adapter is not None and adapter.weights.name == "adapter_model.safetensors"


def test_folder_output_refusals(folders: list[Path], tmp_path: Path) -> None:
    inputs = [f / "model.safetensors" for f in folders]
    with pytest.raises(OutputError, match=r"run-1: output folder holds the input .*run-1/model.safetensors"):
        plan_folder_output(folders[0], folders).check(inputs)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "pytorch_model.bin").write_bytes(b"old")
    with pytest.raises(OutputError, match=r"stale: output folder already holds weights \(pytorch_model.bin\)"):
        plan_folder_output(stale, folders).check(inputs)
    done = save_folder({"w": torch.ones(2)}, tmp_path / "done", folders)
    with pytest.raises(OutputError, match=r"done/model.safetensors: output exists; use --force"):
        plan_folder_output(done, folders).check(inputs)
    plan_folder_output(done, folders).check(inputs, force=True)


def test_provenance_names_folder_ingredients_by_folder(folders: list[Path], tmp_path: Path) -> None:
    soupkit.merge(folders, "uniform", tmp_path / "soup.safetensors")
    meta = inspection.describe(tmp_path / "soup.safetensors")["metadata"]
    assert [i["name"] for i in meta["soupkit.ingredients"]] == ["run-1", "run-2"]


def test_inspect_counts_tied_parameters_once(folders: list[Path], tmp_path: Path) -> None:
    model = gpt2(4)
    real = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    info = inspection.describe(folders[0])
    assert info["parameters"] == real and info["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    torch.save(model.state_dict(), tmp_path / "tied.bin")  # storage shared: the .bin ties them too
    info = inspection.describe(tmp_path / "tied.bin")
    assert info["parameters"] == real and info["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert info["ema"] is False
