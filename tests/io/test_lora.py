"""PEFT LoRA adapters, checked against peft itself: tiny random transformers models and adapters made here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import soupkit
from soupkit.errors import CheckpointError, IncompatibleCheckpointsError
from soupkit.io import load_checkpoint, open_checkpoint
from soupkit.io.lora import (
    LoraDeltaReader,
    LoraMergedReader,
    check_adapter_mix,
    is_adapter,
    merge_adapters,
    merge_adapters_exact,
    open_adapter,
    refactor_lora,
)

LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want)
    num = sum(float((got[k].double() - want[k].double()).square().sum()) for k in want)
    den = sum(float(want[k].double().square().sum()) for k in want)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama") / "base"
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(folder)
    return folder


def load_base(folder: Path) -> torch.nn.Module:
    return LlamaForCausalLM.from_pretrained(folder)


def make_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


ADAPTERS = {
    "r4": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "r2-rslora": {"r": 2, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "o_proj", "up_proj"]},
    "patterns": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "down_proj"],
                 "rank_pattern": {"layers.0.self_attn.q_proj": 2, "down_proj": 6}, "alpha_pattern": {"k_proj": 11}},
}


@pytest.fixture(scope="module")
def adapters(llama: Path) -> dict[str, Path]:
    made = {name: make_adapter(llama, llama.parent / name, seed, **cfg)
            for seed, (name, cfg) in enumerate(ADAPTERS.items(), start=1)}
    (made["r4"] / "tokenizer_config.json").write_text("{}")  # adapters trained with new tokens ship a tokenizer
    return made


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapted_weights_match_peft_merge_and_unload(llama: Path, adapters: dict[str, Path], name: str) -> None:
    want = peft_merged(llama, adapters[name])
    with open_adapter(adapters[name], base=llama) as reader:
        assert isinstance(reader, LoraMergedReader)
        got = {k: reader.get(k) for k in reader.keys()}
        # chunked reads (what the merge engine streams) agree with whole reads
        key = f"model.layers.1.{'mlp.down_proj' if name == 'patterns' else 'self_attn.q_proj'}.weight"
        numel = got[key].numel()
        flat = torch.cat([reader.read_flat(key, s, min(s + 37, numel)) for s in range(0, numel, 37)])
        assert torch.equal(flat, got[key].reshape(-1))
    assert rel_err(got, want) <= 1e-5
    base = load_checkpoint(llama)
    changed = {k for k in base if not torch.equal(base[k], want[k])}
    assert changed and all(not torch.equal(base[k], got[k]) for k in changed)


def test_plain_open_gives_updates_keyed_by_base_names(llama: Path, adapters: dict[str, Path]) -> None:
    assert is_adapter(adapters["patterns"]) and is_adapter(adapters["patterns"] / "adapter_model.safetensors")
    assert not is_adapter(llama)
    want, base = peft_merged(llama, adapters["patterns"]), load_checkpoint(llama)
    with open_checkpoint(adapters["patterns"]) as reader:
        assert isinstance(reader, LoraDeltaReader)
        assert "model.layers.0.self_attn.q_proj.weight" in reader
        assert reader.info("model.layers.0.self_attn.q_proj.weight").shape == (32, 32)
        assert len(reader.keys()) == 6  # 3 modules x 2 layers
        for key in reader.keys():
            assert rel_err({key: reader.get(key)}, {key: want[key] - base[key]}) <= 1e-5


def test_uniform_soup_of_adapted_models_is_the_mean_of_peft_models(llama: Path, adapters: dict[str, Path]) -> None:
    names = ["r4", "r2-rslora", "patterns"]
    merged = [peft_merged(llama, adapters[n]) for n in names]
    mean = {k: sum(m[k] for m in merged) / len(merged) for k in merged[0]}
    soup = soupkit.merge([open_adapter(adapters[n], base=llama) for n in names], "uniform")
    assert rel_err(soup, mean) <= 1e-5
    # the same through updates: base + uniform soup of the updates
    deltas = soupkit.merge([open_checkpoint(adapters[n]) for n in ["r4", "patterns"]], "uniform",
                           allow_missing=True)
    assert set(deltas) == {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in
                           ("self_attn.q_proj", "self_attn.v_proj", "self_attn.k_proj", "mlp.down_proj")}


def test_wise_ft_of_an_adapter_scales_its_update(llama: Path, adapters: dict[str, Path]) -> None:
    base, adapted = load_checkpoint(llama), peft_merged(llama, adapters["r4"])
    wise = soupkit.wise_ft(llama, open_adapter(adapters["r4"], base=llama), alpha=0.3)
    assert rel_err(wise, {k: base[k] + 0.3 * (adapted[k] - base[k]) for k in base}) <= 1e-5


def test_exact_adapter_merge_loads_in_peft_and_gives_the_mean(llama: Path, adapters: dict[str, Path],
                                                              tmp_path: Path) -> None:
    names = ["r4", "r2-rslora", "patterns"]
    result = merge_adapters_exact([adapters[n] for n in names], None, tmp_path / "soup")
    config = json.loads((tmp_path / "soup" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and not config["use_rslora"]
    # q_proj of layer 0: 4 + 2 + 2 (rank_pattern) = 8; down_proj: 6 (patterns only); k_proj 4 (patterns only)
    assert result.ranks["model.layers.0.self_attn.q_proj.weight"] == 8
    assert result.ranks["model.layers.1.mlp.down_proj.weight"] == 6
    assert result.relative_error == 0.0
    merged = [peft_merged(llama, adapters[n]) for n in names]
    mean = {k: sum(m[k] for m in merged) / len(merged) for k in merged[0]}
    assert rel_err(peft_merged(llama, tmp_path / "soup"), mean) <= 1e-5
    written = {p.name for p in (tmp_path / "soup").iterdir()}
    assert written == {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"}  # no README
    metadata = json.loads(load_metadata(tmp_path / "soup" / "adapter_model.safetensors")["soupkit.ingredients"])
    assert [i["name"] for i in metadata] == names


def load_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_weighted_exact_merge_and_svd_refactorisation(llama: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    a, b = adapters["r4"], adapters["patterns"]
    with open_checkpoint(a) as ra, open_checkpoint(b) as rb:
        keys = {*ra.keys(), *rb.keys()}
        want = {k: (0.7 * ra.get(k) if k in ra else 0) + (0.3 * rb.get(k) if k in rb else 0) for k in keys}
    merge_adapters([a, b], [0.7, 0.3], tmp_path / "exact")
    assert rel_err(dict(load_checkpoint(tmp_path / "exact")), want) <= 1e-5
    full = merge_adapters([a, b], [0.7, 0.3], tmp_path / "svd8", rank=8)
    assert full.relative_error < 1e-5  # every summed update has rank <= 8: nothing is lost
    low = merge_adapters([a, b], [0.7, 0.3], tmp_path / "svd2", rank=2)
    got = load_checkpoint(tmp_path / "svd2")
    assert all(t.shape[0] == 2 for k, t in load_file(tmp_path / "svd2" / "adapter_model.safetensors").items()
               if k.endswith("lora_A.weight"))
    assert abs(rel_err(got, want) - low.relative_error) < 1e-4 and 0.05 < low.relative_error < 1
    assert rel_err(peft_merged(llama, tmp_path / "svd2"), {
        k: v + want.get(k, 0) for k, v in load_checkpoint(llama).items()}) < low.relative_error


def test_refactor_lora_reports_the_truncation_error() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 3, generator=g) @ torch.randn(3, 30, generator=g)
    b, a, error = refactor_lora(delta, 3)
    assert error < 1e-6 and torch.allclose(b @ a, delta, atol=1e-4)
    b, a, error = refactor_lora(delta, 1)
    assert error == pytest.approx(float((delta - b @ a).norm() / delta.norm()), rel=1e-4)


def test_reduce_factors_equals_the_svd_of_the_product_without_forming_it() -> None:
    from soupkit.io.lora import reduce_factors

    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(30, 6, generator=g), torch.randn(6, 50, generator=g)
    for rank in (1, 3, 6, 9):
        nb, na, error, energy = reduce_factors(b, a, rank)
        db, da, dense_error = refactor_lora(b @ a, rank)
        assert nb.shape == (30, min(rank, 6)) and na.shape == (min(rank, 6), 50)
        assert torch.allclose(nb @ na, db @ da, atol=1e-4) and error == pytest.approx(dense_error, abs=1e-6)
        assert energy == pytest.approx(float((b.double() @ a.double()).square().sum()), rel=1e-9)


def test_gpt2_conv1d_and_embedding_lora_match_peft(tmp_path: Path) -> None:
    torch.manual_seed(3)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), LoraConfig(
        r=3, lora_alpha=5, target_modules=["c_attn", "wte"], fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "ad")
    want = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "ad")
    want = {k: v.detach() for k, v in want.merge_and_unload().state_dict().items()}
    got = load_checkpoint(open_adapter(tmp_path / "ad", base=tmp_path / "gpt2"))
    want = {k: v for k, v in want.items() if k in got}  # peft's state dict has the tied lm_head too
    assert "lm_head.weight" in got  # tied to wte in config.json: read from it, with wte's update
    assert rel_err(got, want) <= 1e-5
    shutil.copytree(tmp_path / "ad", tmp_path / "ad2")  # one adapter given twice is refused: a copy
    merge_adapters_exact([tmp_path / "ad", tmp_path / "ad2"], [0.5, 0.5], tmp_path / "cat")
    again = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "cat")
    again = {k: v.detach() for k, v in again.merge_and_unload().state_dict().items() if k in want}
    assert rel_err(again, want) <= 1e-5


def test_conv_lora_matches_peft(tmp_path: Path) -> None:
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    base = {k: v.clone() for k, v in net.state_dict().items()}
    soupkit.save_checkpoint(base, tmp_path / "base.safetensors")
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "ad")
    want = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    assert rel_err(load_checkpoint(open_adapter(tmp_path / "ad", base=tmp_path / "base.safetensors")), want) <= 1e-5
    shutil.copytree(tmp_path / "ad", tmp_path / "ad2")
    merge_adapters_exact([tmp_path / "ad", tmp_path / "ad2"], [0.25, 0.75], tmp_path / "cat")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    net.load_state_dict(base)
    again = PeftModel.from_pretrained(net, tmp_path / "cat").merge_and_unload().state_dict()
    assert rel_err({k: v.detach() for k, v in again.items()}, want) <= 1e-5


def test_refused_adapters_and_mixes_are_one_line_errors(llama: Path, adapters: dict[str, Path],
                                                        tmp_path: Path) -> None:
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapters["r4"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((adapters["r4"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"dora/adapter_config.json: DoRA adapters .* are not supported "
                                              r"\(use_dora: true\)"):
        open_checkpoint(dora)
    other = tmp_path / "other.safetensors"
    soupkit.save_checkpoint({"x.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(IncompatibleCheckpointsError,
                       match=r"none of the 4 weights the adapter changes \(e.g. 'model.layers.0.self_attn.q_proj"):
        open_adapter(adapters["r4"], base=other)
    readers = [open_checkpoint(llama), open_checkpoint(adapters["r4"])]
    with pytest.raises(IncompatibleCheckpointsError, match=r"r4 is a LoRA adapter .*merged with full models "
                                                           r"\(.*base.*\); give its base model: --base BASE"):
        check_adapter_mix(readers)
    check_adapter_mix([open_checkpoint(adapters["r4"]), open_checkpoint(adapters["patterns"])])


def test_modules_to_save_heads_with_a_base(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(5)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    wants = []
    for seed in (6, 7):
        torch.manual_seed(seed)
        model = get_peft_model(BertForSequenceClassification.from_pretrained(tmp_path / "bert"), LoraConfig(
            r=2, target_modules=["query"], modules_to_save=["classifier"], init_lora_weights=False))
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.normal_()  # a trained head
        model.save_pretrained(tmp_path / f"cls{seed}")
        want = model.merge_and_unload().state_dict()
        wants.append({k: v.detach().clone() for k, v in want.items()})
    got = load_checkpoint(open_adapter(tmp_path / "cls6", base=tmp_path / "bert"))
    assert rel_err(got, {k: v for k, v in wants[0].items() if k in got}) <= 1e-5
    with pytest.raises(CheckpointError, match=r"cls6: a LoRA adapter that also saves full weights \(modules_to_save: "
                                              r"'classifier.bias'\); its updates need the base model: --base"):
        open_checkpoint(tmp_path / "cls6")
    merge_adapters_exact([tmp_path / "cls6", tmp_path / "cls7"], None, tmp_path / "soup")
    soup = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(tmp_path / "bert"),
                                     tmp_path / "soup").merge_and_unload().state_dict()
    mean = {k: (wants[0][k] + wants[1][k]) / 2 for k in got}
    assert rel_err({k: soup[k] for k in got}, mean) <= 1e-5


def test_any_method_on_updates_saved_as_an_adapter(llama: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from soupkit.io.lora import save_adapter

    inputs = [open_checkpoint(adapters[n]) for n in ("r4", "r2-rslora")]
    shapes = {k: r.info(k).shape for r in inputs for k in r.keys()}
    zero = {k: torch.zeros(shape) for k, shape in shapes.items()}  # updates are task vectors: their base is 0
    ties = soupkit.merge(inputs, "ties", base=zero, density=0.5, allow_missing=True)  # sparsified: full rank
    result = save_adapter(ties, [adapters["r4"], adapters["r2-rslora"]], tmp_path / "ties-r8", rank=8)
    assert set(result.ranks) == set(ties) and 0 < result.relative_error < 1
    got = load_checkpoint(tmp_path / "ties-r8")
    assert abs(rel_err(got, ties) - result.relative_error) < 1e-4
    base = load_checkpoint(llama)
    want = {k: v + ties.get(k, 0) for k, v in base.items()}
    assert rel_err(peft_merged(llama, tmp_path / "ties-r8"), want) < 2 * result.relative_error
    lossless = save_adapter(ties, [adapters["r4"], adapters["r2-rslora"]], tmp_path / "ties-full", rank=32)
    assert lossless.relative_error < 1e-6


def test_methods_declare_their_linearity_for_adapters() -> None:
    """The adapter writer asks the registry: a method's declared weights over a zero base (no formula in io)."""
    from soupkit.merging.registry import get_method

    def weights(name: str, params: dict, n: int):
        spec = get_method(name)
        return spec.linear_weights(spec.bind(params, n), n)

    assert weights("uniform", {}, 4) == [0.25] * 4
    assert weights("linear", {"weights": [1, 3]}, 2) == [0.25, 0.75]
    assert weights("linear", {"weights": [1, 3], "normalize": False}, 2) == [1.0, 3.0]
    assert weights("wise", {"alpha": 0.3}, 2) == pytest.approx([0.7, 0.3])
    assert weights("task_arithmetic", {"scaling": 0.5}, 3) == [0.5] * 3
    assert weights("dare_linear", {"drop_rate": 0.0, "scaling": 2.0}, 2) == [1.0, 1.0]  # no drops: linear
    assert weights("dare_linear", {}, 2) is None  # random drops are not linear
    assert weights("ties", {"density": 0.5}, 2) is None


def test_a_nonlinear_method_names_both_ways_out(tmp_path: Path, adapters: dict[str, Path]) -> None:
    from soupkit.errors import ParameterError

    with pytest.raises(ParameterError, match=r"method 'ties' cannot be written exactly as a LoRA adapter .*"
                                             r"give --base BASE .*, or --rank R"):
        soupkit.merge([adapters["r4"], adapters["r2-rslora"]], "ties", tmp_path / "x", density=0.5)
    assert not (tmp_path / "x").exists()
