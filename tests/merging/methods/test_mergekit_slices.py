"""Frankenmerges from mergekit ``slices:`` configs: the output folder loads with ``from_pretrained`` and has the
layer count of its slices; the CLI runs them; file outputs, overrides and refusals before any work.

(Bit identity with mergekit's own output is checked on the golden configs by test_mergekit_golden.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.golden.models import build_models, substitute

STACK = {"merge_method": "passthrough", "dtype": "float32", "slices": [
    {"sources": [{"model": "@llama_ft1", "layer_range": [0, 4]}]},
    {"sources": [{"model": "@llama_ft2", "layer_range": [2, 6]}]}]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("slice_models"))


def write(folder: Path, config: dict, models: dict[str, Path]) -> Path:
    path = folder / "frankenmerge.yaml"
    path.write_text(yaml.safe_dump(substitute(config, models)))
    return path


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_stacked_layers_load_with_from_pretrained(tmp_path: Path, models: dict[str, Path], cli, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    config = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": f"@{arch}_ft1", "layer_range": [0, 4]}]},
        {"sources": [{"model": f"@{arch}_ft2", "layer_range": [1, 6]}]}]}
    result = cli("merge", "--config", write(tmp_path, config, models), "-o", f"{tmp_path / 'out'}/")
    assert result.code == 0, result.err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 9
    first = AutoModelForCausalLM.from_pretrained(models[f"{arch}_ft1"]).state_dict()
    second = AutoModelForCausalLM.from_pretrained(models[f"{arch}_ft2"]).state_dict()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    ours = {k: v for k, v in model.state_dict().items() if k not in tied}
    for key, tensor in ours.items():  # layer j < 4 is ft1's j, layer 4 + i is ft2's 1 + i; the rest ft1's / ft2's
        parts = key.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None:
            source = first if "embed" in key or ".wte." in key or ".wpe." in key else second
            if key in source:
                assert torch.equal(tensor, source[key]), key
            continue
        layer = int(parts[index])
        source, at = (first, layer) if layer < 4 else (second, layer - 3)
        assert torch.equal(tensor, source[".".join([*parts[:index], str(at), *parts[index + 1:]])]), key
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_file_output_and_in_memory(tmp_path: Path, models: dict[str, Path]) -> None:
    from soupkit.merging.config import merge_from_config

    path = write(tmp_path, STACK, models)
    state = merge_from_config(path)
    assert sum(".layers." in k for k in state) == 8 * 9
    written = merge_from_config(path, tmp_path / "frank.safetensors")
    assert sorted(load_file(written)) == sorted(state)
    scaled = merge_from_config(path, scale=0.5)  # a method parameter overrides the config's for every tensor
    assert all(torch.equal(scaled[k], state[k] * 0.5) for k in state)


def test_layer_types_follow_their_layers(tmp_path: Path, models: dict[str, Path]) -> None:
    """A config that lists one attention type per layer gets the list of the layers it is made of."""
    import shutil

    for name in ("llama_ft1", "llama_ft2"):
        shutil.copytree(models[name], tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["layer_types"] = [f"{name}:{i}" for i in range(6)]
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    local = {**models, "llama_ft1": tmp_path / "llama_ft1", "llama_ft2": tmp_path / "llama_ft2"}
    from soupkit.merging.config import merge_from_config

    merge_from_config(write(tmp_path, STACK, local), f"{tmp_path / 'out'}/")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
    assert config["layer_types"] == [f"llama_ft1:{i}" for i in range(4)] + [f"llama_ft2:{i}" for i in range(2, 6)]


def test_refused_before_any_work(tmp_path: Path, models: dict[str, Path], cli) -> None:
    """An existing output without --force: exit 2, one line, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"keep")
    result = cli("merge", "--config", write(tmp_path, STACK, models), "-o", f"{out}/")
    assert result.code == 2 and result.err.count("\n") == 1 and "Traceback" not in result.err
    assert (out / "model.safetensors").read_bytes() == b"keep" and sorted(p.name for p in out.iterdir()) == [
        "model.safetensors"]


def test_streams_one_layer_at_a_time(tmp_path: Path, models: dict[str, Path], monkeypatch) -> None:
    """Each merge inside a frankenmerge holds one output layer (or the embeddings / final tensors), never the model:
    counted on the merges made, every tensor written exactly once."""
    import soupkit.merging.api as api
    from soupkit.merging.config import merge_from_config

    real, sizes = api.merge_variants, []

    def counting(checkpoints, *args, **kwargs):
        sizes.append(len(checkpoints[0].keys()))
        return real(checkpoints, *args, **kwargs)

    monkeypatch.setattr(api, "merge_variants", counting)
    written = merge_from_config(write(tmp_path, STACK, models), tmp_path / "frank.safetensors")
    assert len(sizes) == 8 + 2 and max(sizes) == 9  # 8 layers of 9 tensors, then embeddings and norm + head
    assert sum(sizes) == len(load_file(written)) == 8 * 9 + 3
