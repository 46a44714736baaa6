# ruff: noqa: F811  (pytest fixtures imported from tests.io.test_lora are parameters here)
"""Every field of peft's ``LoraConfig`` is handled as declared in ``soupkit.io.adapter_config.FIELDS``: honoured
fields give what peft's own ``merge_and_unload`` gives (tiny random transformers models, real peft adapters),
ignored ones change nothing, refused ones are one line naming the field. A field a new peft adds fails
``test_every_peft_lora_config_field_is_declared`` until it is declared."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from soupkit.errors import CheckpointError
from soupkit.io import load_checkpoint
from soupkit.io.adapter_config import FIELDS, AdapterConfig
from soupkit.io.lora import open_adapter
from tests.io.test_lora import adapters, llama, load_base, make_adapter, peft_merged, rel_err  # noqa: F401

#: a non-off value for every refused field (what a config of that variant holds)
REFUSED_VALUES: dict[str, Any] = {
    "use_dora": True, "lora_bias": True, "use_qalora": True, "alora_invocation_tokens": [5, 6],
    "megatron_config": {"tensor_model_parallel_size": 2}, "trainable_token_indices": [1, 2],
    "loftq_config": {"loftq_bits": 4}, "velora_config": {"rank": 1}, "monteclora_config": {"n": 2},
    "layer_replication": [[0, 1]], "target_parameters": ["mlp.experts.gate_up_proj"], "use_bdlora": {"blocks": 2},
    "arrow_config": {"top_k": 2}, "kasa_config": {"beta": 1}, "ensure_weight_tying": True,
}
#: a valid non-default value for every ignored field: none of them may change the merged weights
IGNORED_VALUES: dict[str, Any] = {
    "task_type": "SEQ_CLS", "auto_mapping": {"base_model_class": "LlamaForCausalLM", "parent_library": "evil"},
    "peft_version": "99.0", "base_model_name_or_path": "someone/elsewhere", "revision": "deadbeef",
    "inference_mode": False, "lora_dropout": 0.25, "runtime_config": {"ephemeral_gpu_offload": False},
    "megatron_core": "not.a.module", "qalora_group_size": 8, "eva_config": None, "corda_config": None,
    "lora_ga_config": None,
}


def test_every_peft_lora_config_field_is_declared() -> None:
    """peft's fields and soupkit's table are the same set, each entry with a reason; the schema model knows each."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert fields - set(FIELDS) == set(), "new peft LoraConfig fields: declare how soupkit handles them in FIELDS"
    assert set(FIELDS) - fields == set(), "FIELDS declares fields this peft does not have"
    assert all(h.how in ("honoured", "ignored", "refused") and len(h.why) > 10 for h in FIELDS.values())
    assert set(FIELDS) <= set(AdapterConfig.model_fields)
    refused = {name for name, h in FIELDS.items() if h.how == "refused"}
    ignored = {name for name, h in FIELDS.items() if h.how == "ignored"}
    assert refused == set(REFUSED_VALUES) and ignored == set(IGNORED_VALUES)  # each one is exercised below


def edited(source: Path, target: Path, **changes: Any) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize("field", sorted(REFUSED_VALUES))
def test_refused_fields_are_one_line_naming_the_field(field: str, adapters: dict[str, Path], tmp_path: Path) -> None:
    bad = edited(adapters["r4"], tmp_path / "bad", **{field: REFUSED_VALUES[field]})
    with pytest.raises(CheckpointError, match=rf"bad/adapter_config.json: .*\({field}: ") as raised:
        open_adapter(bad)
    assert "\n" not in str(raised.value)


def test_ignored_fields_change_nothing_and_peft_agrees(llama: Path, adapters: dict[str, Path],
                                                       tmp_path: Path) -> None:
    loose = edited(adapters["r4"], tmp_path / "ignored", **IGNORED_VALUES)
    with open_adapter(adapters["r4"], base=llama) as plain, open_adapter(loose, base=llama) as other:
        assert all(torch.equal(plain.get(k), other.get(k)) for k in plain.keys())
    peft_loose = edited(adapters["r4"], tmp_path / "for-peft", **{k: v for k, v in IGNORED_VALUES.items()
                                                                    if k not in ("auto_mapping", "runtime_config")})
    assert rel_err(load_checkpoint(open_adapter(loose, base=llama)), peft_merged(llama, peft_loose)) <= 1e-5


def check_against_peft(base: Path, adapter: Path, load: Any = load_base) -> None:
    """soupkit's W + dW equals peft's merge_and_unload of the same adapter on the same base."""
    model = PeftModel.from_pretrained(load(base), adapter).merge_and_unload()
    want = {k: v.detach() for k, v in model.state_dict().items()}
    got = load_checkpoint(open_adapter(adapter, base=base))
    assert rel_err(got, {k: v for k, v in want.items() if k in got}) <= 1e-5
    base_state = load_checkpoint(base)
    assert any(not torch.equal(got[k], base_state[k]) for k in got)


def test_fan_in_fan_out_on_linear_layers_is_ignored_as_peft_ignores_it(llama: Path, adapters: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """issue 26: fan_in_fan_out true on nn.Linear layers. peft warns and uses B @ A; so does soupkit, for the square
    q_proj (laid out like the adapter's non-square v_proj) and v_proj (by its shape in the base)."""
    flipped = edited(adapters["r4"], tmp_path / "fifo", fan_in_fan_out=True)
    check_against_peft(llama, flipped)
    straight = load_checkpoint(open_adapter(adapters["r4"], base=llama))
    assert rel_err(load_checkpoint(open_adapter(flipped, base=llama)), straight) == 0


def test_a_square_only_adapter_with_fan_in_fan_out_is_laid_out_by_the_base_config(llama: Path,
                                                                                  tmp_path: Path) -> None:
    made = make_adapter(llama, tmp_path / "q", 11, r=2, lora_alpha=3, target_modules=["q_proj"])
    check_against_peft(llama, edited(made, tmp_path / "q-fifo", fan_in_fan_out=True))  # config.json: llama


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("gpt2") / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8)).save_pretrained(folder)
    return folder


def load_gpt2(folder: Path) -> torch.nn.Module:
    return GPT2LMHeadModel.from_pretrained(folder)


@pytest.mark.parametrize("flag", [False, True])
def test_conv1d_layers_are_transposed_whatever_the_flag_says(gpt2: Path, tmp_path: Path, flag: bool) -> None:
    """peft sets fan_in_fan_out true for transformers' Conv1D; c_proj of attention is square (16 x 16)."""
    torch.manual_seed(12)
    model = get_peft_model(load_gpt2(gpt2), LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_proj"],
                                                       fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "made")
    check_against_peft(gpt2, edited(tmp_path / "made", tmp_path / "ad", fan_in_fan_out=flag), load_gpt2)


def test_layers_to_transform_and_layers_pattern_match_peft(llama: Path, tmp_path: Path) -> None:
    made = make_adapter(llama, tmp_path / "layers", 13, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                        layers_to_transform=[1], layers_pattern="layers")
    with open_adapter(made) as reader:
        assert {k.split(".")[2] for k in reader.keys()} == {"1"}
    check_against_peft(llama, made)


def test_exclude_modules_and_regex_target_modules_match_peft(llama: Path, tmp_path: Path) -> None:
    made = make_adapter(llama, tmp_path / "exclude", 14, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                        exclude_modules=["model.layers.0.self_attn.v_proj"])
    check_against_peft(llama, made)
    regex = make_adapter(llama, tmp_path / "regex", 15, r=3, lora_alpha=2,
                         target_modules=r".*layers\.1\.(self_attn\.k_proj|mlp\.up_proj)")
    with open_adapter(regex) as reader:
        assert sorted(reader.keys()) == ["model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    check_against_peft(llama, regex)


def test_gaussian_init_and_rslora_with_patterns_match_peft(llama: Path, tmp_path: Path) -> None:
    made = make_adapter(llama, tmp_path / "rs", 16, r=4, lora_alpha=6, use_rslora=True,
                        target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2}, alpha_pattern={"q_proj": 9})
    check_against_peft(llama, edited(made, tmp_path / "gaussian", init_lora_weights="gaussian"))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_replace_the_base_biases_as_peft_loads_them(tmp_path: Path, bias: str) -> None:
    torch.manual_seed(17)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24)
    BertModel(config).save_pretrained(tmp_path / "bert")
    model = get_peft_model(BertModel.from_pretrained(tmp_path / "bert"), LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], bias=bias, init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") and parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))  # trained biases
    model.save_pretrained(tmp_path / "ad")
    check_against_peft(tmp_path / "bert", tmp_path / "ad", BertModel.from_pretrained)
