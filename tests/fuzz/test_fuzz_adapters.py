"""Fuzz the LoRA adapter reader (issue 22): a valid adapter folder (config + factors, a real safetensors file and
a config as peft writes it) mutated at three levels: JSON fields of ``adapter_config.json`` set to odd values,
raw bytes of the config, and the factor file's safetensors header and bytes (``mutations.py``). The target opens
the folder as soupkit does, alone and over a base, and reads every update whole and in a range. Every outcome but
success or a one-line ``SoupkitError`` is a finding, and so is a new file in the folder (a payload ran).
Deselect with ``-m 'not slow'``."""

from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.mutations import JSON_VALUES, apply_byte_edit, apply_header_edit, byte_edit, header_edit
from tests.hostile.corpus_adapters import BASE_SHAPES, GOOD_CONFIG, factors

EXAMPLES = 300
#: fields a mutation sets: every field soupkit reads, a refused one, and an unknown one
FIELDS = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
          "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "modules_to_save", "peft_type",
          "init_lora_weights", "use_dora", "lora_dropout", "something_new"]
ODD = [*JSON_VALUES, float("nan"), float("inf"), "q_proj", ["q_proj"], {"q_proj": 4}, {"v_proj": "8"},
       {r"(a|a)*[bc]": 2}, "(", [0, 1], {"(": 1}, "all", "pissa", 2**63, -(2**63)]


@st.composite
def adapter_mutant(draw: st.DrawFn) -> tuple[str, tuple]:
    level = draw(st.sampled_from(["field", "config-bytes", "header", "factor-bytes"]))
    if level == "field":
        edits = draw(st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(ODD)), min_size=1, max_size=3))
    elif level == "header":
        edits = draw(st.lists(header_edit(), min_size=1, max_size=3))
    else:
        edits = draw(st.lists(byte_edit(), min_size=1, max_size=3))
    return level, tuple(edits)


def build(folder: Path, mutant: tuple[str, tuple]) -> None:
    from safetensors.torch import save

    level, edits = mutant
    config: dict[str, Any] = dict(GOOD_CONFIG)
    config_bytes = json.dumps(config).encode()
    weights = save(factors())
    if level == "field":
        for name, value in edits:
            config[name] = value
        config_bytes = json.dumps(config, allow_nan=True).encode()
    elif level == "config-bytes":
        for edit in edits:
            config_bytes = apply_byte_edit(config_bytes, edit)
    elif level == "header":
        for edit in edits:
            weights = apply_header_edit(weights, edit)
    else:
        for edit in edits:
            weights = apply_byte_edit(weights, edit)
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(config_bytes)
    (folder / "adapter_model.safetensors").write_bytes(weights)


def read_everything(folder: Path, base: Path) -> str | None:
    """What soupkit does with an adapter; anything but success or a one-line SoupkitError, as a finding."""
    from soupkit.errors import SoupkitError
    from soupkit.io import open_checkpoint

    try:
        for kwargs in ({}, {"base": base}):
            with open_checkpoint(folder, **kwargs) as reader:
                for key in reader.keys():
                    info = reader.info(key)
                    tensor = reader.get(key)
                    if tuple(tensor.shape) != info.shape:
                        return f"{key}: get() gave {tuple(tensor.shape)}, info said {info.shape}"
                    reader.read_flat(key, 1, min(info.numel, 5))
    except SoupkitError as error:
        return None if "\n" not in str(error) else f"multi-line message: {error}"
    except Exception as error:  # a traceback users would see
        return f"{type(error).__name__}: {error}\n" + traceback.format_exc(limit=-6)
    return None


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("fuzz-base") / "base.safetensors"
    save_file({k: torch.zeros(s) for k, s in BASE_SHAPES.items()}, str(path))
    return path


def test_unmutated_adapter_reads(tmp_path: Path, base: Path) -> None:
    build(tmp_path / "ad", ("field", ()))
    assert read_everything(tmp_path / "ad", base) is None


@pytest.mark.slow
def test_fuzz_adapter_reader(tmp_path_factory: pytest.TempPathFactory, base: Path) -> None:
    root = tmp_path_factory.mktemp("fuzz-adapters")

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutant=adapter_mutant())
    def fuzz(mutant: tuple[str, tuple]) -> None:
        folder = root / "ad"
        shutil.rmtree(folder, ignore_errors=True)
        build(folder, mutant)
        finding = read_everything(folder, base)
        extra = sorted(p.name for p in folder.iterdir()) != ["adapter_config.json", "adapter_model.safetensors"]
        assert finding is None and not extra, f"{finding or 'files appeared'}\nmutant: {mutant!r}"[:3000]

    fuzz()
