"""Fuzz the Hugging Face folder readers: a model folder's ``config.json`` and an adapter folder's
``adapter_config.json``, mutated byte by byte and field by field, then read the way a merge to a folder output does
(``open_checkpoint`` of the folder with its ties, every tensor, the folder output's checks, tie omission and the
small-file copies into an aborted ``OutputSet``). Anything but success or a one-line ``SoupkitError`` is a finding,
and so is a file appearing outside the folder. A fixed, derandomised budget in CI; deselect with ``-m 'not slow'``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.mutations import JSON_VALUES, Finding, apply_byte_edit, byte_edit

EXAMPLES = 150
MODEL_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "tie_word_embeddings": True,
                "torch_dtype": "float32", "text_config": {"tie_word_embeddings": True}, "n_embd": 4}
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["h.0"],
                  "rank_pattern": {"h.0": 2}, "alpha_pattern": {}, "use_rslora": False, "fan_in_fan_out": False}
FIELDS = sorted({*MODEL_CONFIG, *ADAPTER_CONFIG, "tie_encoder_decoder", "modules_to_save", "layers_to_transform"})
SEEDS = {"config.json": MODEL_CONFIG, "adapter_config.json": ADAPTER_CONFIG}


@st.composite
def field_edit(draw: st.DrawFn) -> tuple:
    return "field", draw(st.sampled_from(FIELDS)), draw(st.sampled_from([*JSON_VALUES, "drop", float("nan")]))


def mutated(seed: str, edits: tuple) -> bytes:
    config = dict(SEEDS[seed])
    for edit in edits:
        if edit[0] == "field":
            if edit[2] == "drop":
                config.pop(edit[1], None)
            else:
                config[edit[1]] = edit[2]
    data = json.dumps(config).encode()
    for edit in edits:
        if edit[0] != "field":
            data = apply_byte_edit(data, edit)
    return data


def make_folder(root: Path, seed: str, config: bytes) -> Path:
    from safetensors.torch import save_file

    folder = root / "in"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    if seed == "config.json":
        save_file({"transformer.wte.weight": torch.randn(6, 4, generator=g), "lm_head.weight": torch.randn(
            6, 4, generator=g), "transformer.h.0.weight": torch.randn(4, 4, generator=g)},
            str(folder / "model.safetensors"))
    else:
        save_file({"base_model.model.h.0.lora_A.weight": torch.randn(2, 4, generator=g),
                   "base_model.model.h.0.lora_B.weight": torch.randn(4, 2, generator=g)},
                  str(folder / "adapter_model.safetensors"))
    (folder / seed).write_bytes(config)
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def read_folder(folder: Path, adapter: bool) -> Finding | None:
    from soupkit.errors import SoupkitError
    from soupkit.io import OutputSet, open_checkpoint
    from soupkit.io.hf_folder import plan_folder_output

    try:
        with open_checkpoint(folder) as reader:
            for key in reader.keys():
                reader.get(key)
            planned = plan_folder_output(f"{folder.parent / 'out'}/", [folder], adapter=adapter)
            assert planned is not None
            planned.check(list(getattr(reader, "files", None) or [folder]))
            planned.omitted_keys(reader.keys(), [reader])
            files = OutputSet()
            try:
                files.folder(planned.folder)
                planned.add_files(files, dtype="bfloat16")
            finally:
                files.abort()
    except SoupkitError as error:
        return Finding("multi-line message", str(error)[:500]) if "\n" in str(error) else None
    except Exception as error:  # a traceback users would see
        import traceback

        return Finding("exception", f"{type(error).__name__}: {error}\n" + traceback.format_exc(limit=-6))
    return None


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_unmutated_folders_read(seed: str, tmp_path: Path) -> None:
    folder = make_folder(tmp_path, seed, json.dumps(SEEDS[seed]).encode())
    assert read_folder(folder, seed == "adapter_config.json") is None


@pytest.mark.slow
@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_fuzz_folder_reader(seed: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("fuzz-folder")

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(edits=st.lists(st.one_of(field_edit(), byte_edit()), min_size=1, max_size=4))
    def fuzz(edits: list[tuple]) -> None:
        case = root / "case"
        case.mkdir()
        try:
            folder = make_folder(case, seed, mutated(seed, tuple(edits)))
            finding = read_folder(folder, seed == "adapter_config.json")
            others = sorted(p.name for p in case.iterdir() if p.name != "in")
        finally:
            shutil.rmtree(case)
        assert finding is None, f"{finding.kind}: {finding.detail}\nedits: {edits}"
        assert others == [], f"files appeared: {others}"

    fuzz()
