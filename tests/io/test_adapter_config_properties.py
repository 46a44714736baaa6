"""Property tests (hypothesis) of the adapter reader over hostile ``adapter_config.json`` files (issue 22):

- any JSON value in any field: the adapter opens and every update reads back with the shape and finiteness its
  factors promise, equal to ``scale * B @ A`` with the scale peft computes (peft's own ``get_pattern_key`` is the
  oracle for rank_pattern / alpha_pattern); or opening raises one ``SoupkitError`` line naming the adapter's
  config or weights file. Never another exception, never a multi-line message;
- soupkit's bounded pattern engine (``regex`` under a time budget) picks the same rank_pattern / alpha_pattern
  key as peft's ``re`` on sane patterns, and the same targets as peft's ``check_target_module_exists``.

Kept fast: ~100 examples each, no deadline (the machine is shared).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from soupkit.errors import SoupkitError
from soupkit.io.adapter_config import AdapterConfig, PatternMatcher
from soupkit.io.lora import LoraAdapter
from tests.hostile.corpus_adapters import BASE_SHAPES, GOOD_CONFIG, factors

peft_other = pytest.importorskip("peft.utils.other")
peft_tuners = pytest.importorskip("peft.tuners.tuners_utils")

HOSTILE = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])
MODULES = [k.removesuffix(".weight") for k in BASE_SHAPES]
#: what a field may hold instead of the right thing
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(), st.text(max_size=6),
                 st.just([]), st.just({}), st.lists(st.integers(-2, 3), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(-1, 4), max_size=2))
#: pattern keys: module-name pieces, regex syntax, and junk
PATTERN_KEYS = st.one_of(st.sampled_from(["q_proj", "v_proj", "layers.0.self_attn.q_proj", r"layers\.1\..*",
                                          "self_attn.q_proj", ".*", "q_proj|v_proj", "(", "[", "*", "a{3}",
                                          r"(a|a)*[bc]", "", "q_pro", "proj"]), st.text(max_size=8))
FIELD_VALUES = {
    "r": st.one_of(st.integers(-2, 4), JUNK),
    "lora_alpha": st.one_of(st.floats(-8, 8), st.integers(0, 16), JUNK),
    "use_rslora": st.one_of(st.booleans(), JUNK),
    "rank_pattern": st.one_of(st.dictionaries(PATTERN_KEYS, st.one_of(st.integers(0, 4), JUNK), max_size=3), JUNK),
    "alpha_pattern": st.one_of(st.dictionaries(PATTERN_KEYS, st.one_of(st.floats(-4, 4), JUNK), max_size=3), JUNK),
    "target_modules": st.one_of(st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "self_attn.q_proj"]),
                                         max_size=3), PATTERN_KEYS, JUNK),
    "exclude_modules": st.one_of(st.lists(st.sampled_from(["q_proj", "layers.0.self_attn.v_proj"]), max_size=2),
                                 JUNK),
    "layers_to_transform": st.one_of(st.lists(st.integers(0, 2), max_size=2), st.integers(0, 2), JUNK),
    "fan_in_fan_out": st.one_of(st.booleans(), JUNK),
    "bias": st.one_of(st.sampled_from(["none", "all", "lora_only"]), JUNK),
    "peft_type": st.one_of(st.sampled_from(["LORA", "lora", "LOHA", "IA3"]), JUNK),
    "use_dora": st.one_of(st.booleans(), JUNK),
    "init_lora_weights": st.one_of(st.sampled_from([True, False, "gaussian", "pissa", "eva", "loftq"]), JUNK),
    "modules_to_save": st.one_of(st.none(), st.lists(st.text(max_size=4), max_size=2), JUNK),
    "unknown_field": JUNK,
}


@st.composite
def hostile_config(draw: st.DrawFn) -> dict[str, Any]:
    config = dict(GOOD_CONFIG)
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=4, unique=True)):
        value = draw(FIELD_VALUES[name])
        if draw(st.integers(0, 5)) == 0:
            config.pop(name, None)  # a missing field takes peft's default
        else:
            config[name] = value
    return config


def oracle_scale(config: dict[str, Any], module: str) -> float:
    """peft's scale of ``module`` (``LoraModel._create_and_replace`` with peft's ``get_pattern_key``)."""
    r_key = peft_other.get_pattern_key(list(config.get("rank_pattern") or {}), module)
    a_key = peft_other.get_pattern_key(list(config.get("alpha_pattern") or {}), module)
    r = (config.get("rank_pattern") or {}).get(r_key, config.get("r", 8))
    alpha = (config.get("alpha_pattern") or {}).get(a_key, config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def open_folder(config: dict[str, Any], root: Path) -> tuple[Path, LoraAdapter | None, SoupkitError | None]:
    from safetensors.torch import save_file

    folder = root / "ad"
    folder.mkdir(exist_ok=True)
    save_file(factors(), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
    try:
        return folder, LoraAdapter.open(folder), None
    except SoupkitError as error:
        return folder, None, error


@HOSTILE
@given(config=hostile_config())
@example(config={**GOOD_CONFIG, "alpha_pattern": {"q_proj": "16"}})
@example(config={**GOOD_CONFIG, "lora_alpha": float("nan")})
@example(config={**GOOD_CONFIG, "modules_to_save": "head"})
def test_hostile_configs_open_correctly_or_fail_in_one_line(config: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder, adapter, error = open_folder(config, Path(tmp))
        if error is not None:
            message = str(error)
            assert "\n" not in message and "\r" not in message, message
            assert str(folder) in message, message
            return
        assert adapter is not None
        try:
            stored = factors()
            for key, module in adapter.modules.items():
                name = key.removesuffix(".weight")
                stem = f"base_model.model.{name}"
                b, a = stored[f"{stem}.lora_B.weight"], stored[f"{stem}.lora_A.weight"]
                want = (b.double() @ a.double()) * oracle_scale(config, name)
                got = adapter.delta(key).double()
                want = want.T if module.transposed else want
                assert got.shape == want.shape == module.shape
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), key
        finally:
            adapter.close()


def test_the_rank_pattern_that_hangs_peft_matches_nothing_at_once(tmp_path: Path) -> None:
    """Issue 26: ``([\\w.]+)+!`` makes peft's ``re`` backtrack for minutes on a module name (it has no '!');
    soupkit's engine finds it matches nothing, so every module keeps the global r, as peft would."""
    config = {**GOOD_CONFIG, "rank_pattern": {r"([\w.]+)+!": 4}, "alpha_pattern": {r"([\w.]+)+!": 1}}
    _, adapter, error = open_folder(config, tmp_path)
    assert error is None and adapter is not None
    assert {m.rank for m in adapter.modules.values()} == {2} and {m.scale for m in adapter.modules.values()} == {2.0}
    adapter.close()


#: sane patterns: literal pieces of module names, alternations, classes and single quantifiers
SANE = st.lists(st.sampled_from(["q_proj", "v_proj", "proj", r"\d", r"\.", ".*", "[qv]", "layers", "self_attn",
                                 "(q|v)", "_", "0", "1", "+", "?", ".", "model"]), min_size=1, max_size=5).map("".join)


@HOSTILE
@given(keys=st.lists(SANE, min_size=1, max_size=3, unique=True), module=st.sampled_from(MODULES))
def test_bounded_engine_picks_the_pattern_key_peft_picks(keys: list[str], module: str) -> None:
    keys = [k for k in keys if _compiles(k)]
    config = AdapterConfig(rank_pattern={k: i + 1 for i, k in enumerate(keys)})
    matcher = PatternMatcher(config, Path("adapter_config.json"))
    want = peft_other.get_pattern_key(keys, module)
    got = matcher.pattern_value("rank_pattern", module, None)
    assert got == (config.rank_pattern.get(want)), (keys, module)


@HOSTILE
@given(targets=st.one_of(st.lists(st.sampled_from(["q_proj", "v_proj", "self_attn.q_proj", "layers.1.self_attn.v_proj",
                                                   "k_proj"]), min_size=1, max_size=3), SANE),
       exclude=st.one_of(st.none(), st.lists(st.sampled_from(["q_proj", "layers.0.self_attn.v_proj"]), max_size=2)),
       layers=st.one_of(st.none(), st.lists(st.integers(0, 2), max_size=2), st.integers(0, 2)),
       module=st.sampled_from(MODULES))
def test_bounded_engine_targets_what_peft_targets(targets: Any, exclude: Any, layers: Any, module: str) -> None:
    from peft import LoraConfig

    if isinstance(targets, str) and not _compiles(targets):
        return
    from pydantic import ValidationError

    fields = {"target_modules": targets, "exclude_modules": exclude, "layers_to_transform": layers}
    try:
        peft_config = LoraConfig(**fields)
    except ValueError:  # peft refuses the combination: so does soupkit
        with pytest.raises(ValidationError):
            AdapterConfig(**fields)
        return
    ours = PatternMatcher(AdapterConfig(**fields), Path("adapter_config.json")).why_not_adapted(module) is None
    theirs = peft_tuners.check_target_module_exists(peft_config, module)
    assert ours == (bool(theirs) and not isinstance(theirs, peft_tuners._ExcludedModule)), (fields, module)


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True
