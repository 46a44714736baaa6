"""Round three of the bad-input corpus, LoRA adapters (issues 22 and 26): hostile ``adapter_config.json`` fields
(types, ranges, NaN, patterns that backtrack, peft variants soupkit does not merge, fields peft would apply
differently), factor files whose tensors do not make a LoRA update, adapters that disagree with their base or
with each other, and options that ask for unbounded work (``--rank``, dense updates of lopsided adapters).

Registered into ``corpus.CASES`` (imported at the end of ``corpus.py``), so ``test_corpus.py`` gives every case
the same treatment: exit 2, one line naming the file / field / option, no traceback, nothing under the output's
name, inputs byte-identical, no canary. ``ADAPTER_CASES`` lists them; ``tests/io/test_lora_memory.py`` runs them all
in one child process and bounds its peak memory.

The adapters are written by hand (a safetensors file of factors beside a JSON config, as peft lays them out), so a
case builds in milliseconds; ``tests/io/test_lora*.py`` checks the same layout against real peft.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.hostile.corpus import Expect, Workspace
from tests.hostile.corpus import case as register

#: every case this module adds
ADAPTER_CASES: list[str] = []

PREFIX = "base_model.model."
#: the tiny base: two layers, a square q_proj and a non-square v_proj each
BASE_SHAPES = {f"model.layers.{i}.self_attn.{m}.weight": shape for i in (0, 1)
               for m, shape in (("q_proj", (8, 8)), ("v_proj", (4, 8)))}
GOOD_CONFIG: dict[str, Any] = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
                               "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "rank_pattern": {},
                               "alpha_pattern": {}, "modules_to_save": None, "task_type": "CAUSAL_LM"}


def case(name: str) -> Callable[[Callable[[Workspace], Expect]], Callable[[Workspace], Expect]]:
    ADAPTER_CASES.append(name)
    return register(name)


def factors(seed: int = 0, rank: int = 2, shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """peft's stored factors for ``shapes`` (base key -> (out, in)): lora_A (r, in), lora_B (out, r)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (rows, cols) in (shapes or BASE_SHAPES).items():
        stem = PREFIX + key.removesuffix(".weight")
        out[f"{stem}.lora_A.weight"] = torch.randn(rank, cols, generator=g)
        out[f"{stem}.lora_B.weight"] = torch.randn(rows, rank, generator=g)
    return out


def adapter(w: Workspace, name: str = "ad", config: dict | None = None, tensors: dict | None = None, *,
            raw_config: bytes | None = None, seed: int = 0) -> Path:
    """An adapter folder ``name`` holding ``tensors`` (default: good factors) and ``config`` (default: good)."""
    from safetensors.torch import save_file

    folder = w.root / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else factors(seed), str(folder / "adapter_model.safetensors"))
    data = raw_config if raw_config is not None else json.dumps(
        GOOD_CONFIG if config is None else config, allow_nan=True).encode()
    (folder / "adapter_config.json").write_bytes(data)
    return folder


def base(w: Workspace, shapes: dict[str, tuple[int, ...]] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    state = {k: torch.randn(s, generator=g).to(dtype) for k, s in (shapes or BASE_SHAPES).items()}
    path = w.root / "base.safetensors"
    save_file(state, str(path))
    return path


def inspect_config(w: Workspace, field: str, value: Any, *needles: str) -> Expect:
    """``soupkit inspect`` of an adapter whose config sets ``field`` to ``value``."""
    folder = adapter(w, config={**GOOD_CONFIG, field: value})
    return Expect(["inspect", str(folder)], (str(folder / "adapter_config.json"), *needles), w.canary)


def merge_config(w: Workspace, field: str, value: Any, *needles: str) -> Expect:
    """``soupkit merge GOOD BAD --base BASE`` where BAD's config sets ``field`` to ``value``."""
    good = adapter(w, "good", seed=1)
    bad = adapter(w, "bad", config={**GOOD_CONFIG, field: value}, seed=2)
    return Expect(["merge", str(good), str(bad), "--base", str(base(w)), "-o", w.out],
                  (str(bad / "adapter_config.json"), *needles), w.canary)


# --- adapter_config.json: field types and ranges -------------------------------------------------------------------

for _field, _value, _needles in [
    ("alpha_pattern", {"q_proj": "16"}, ("field 'alpha_pattern.q_proj'", "valid number")),
    ("alpha_pattern", {"q_proj": float("nan")}, ("field 'alpha_pattern.q_proj'", "finite")),
    ("rank_pattern", {"q_proj": 0}, ("field 'rank_pattern.q_proj'",)),
    ("rank_pattern", {"q_proj": 2.5}, ("field 'rank_pattern.q_proj'",)),
    ("rank_pattern", ["q_proj"], ("field 'rank_pattern'",)),
    ("rank_pattern", {"(q_proj": 2}, ("field 'rank_pattern'", "not a valid regular expression")),
    ("r", 0, ("field 'r'", "greater than or equal to 1")),
    ("r", -3, ("field 'r'",)),
    ("r", 2**40, ("field 'r'", "less than or equal to 65536")),
    ("r", "2", ("field 'r'", "valid integer")),
    ("r", True, ("field 'r'",)),
    ("lora_alpha", float("nan"), ("field 'lora_alpha'", "finite")),
    ("lora_alpha", float("inf"), ("field 'lora_alpha'", "finite")),
    ("lora_alpha", "16", ("field 'lora_alpha'", "valid number")),
    ("lora_alpha", None, ("field 'lora_alpha'",)),
    ("peft_type", "LOHA", ("field 'peft_type'", "LoRA adapters only")),
    ("peft_type", 7, ("field 'peft_type'",)),
    ("modules_to_save", "classifier", ("field 'modules_to_save'",)),
    ("modules_to_save", [3], ("field 'modules_to_save.0'",)),
    ("target_modules", 5, ("field 'target_modules'",)),
    ("target_modules", "(q|v_proj", ("field 'target_modules'", "not a valid regular expression")),
    ("exclude_modules", {"q_proj": 1}, ("field 'exclude_modules'",)),
    ("layers_to_transform", -1, ("field 'layers_to_transform'",)),
    ("layers_to_transform", ["0"], ("field 'layers_to_transform",)),
    ("fan_in_fan_out", "yes", ("field 'fan_in_fan_out'",)),
    ("use_rslora", "true", ("field 'use_rslora'",)),
    ("bias", "some", ("field 'bias'",)),
    ("lora_dropout", 2.0, ("field 'lora_dropout'",)),
    ("init_lora_weights", 3, ("field 'init_lora_weights'",)),
]:
    case(f"adapter config {_field}: {json.dumps(_value)[:30]}")(
        lambda w, f=_field, v=_value, n=_needles: inspect_config(w, f, v, *n))


# --- adapter_config.json: variants and fields peft would apply differently -----------------------------------------

for _field, _value, _needles in [
    ("use_dora", True, ("DoRA", "use_dora: true")),
    ("lora_bias", True, ("lora_bias",)),
    ("use_qalora", True, ("QA-LoRA", "use_qalora")),
    ("alora_invocation_tokens", [1, 2], ("activated LoRA", "alora_invocation_tokens")),
    ("trainable_token_indices", [0, 3], ("trainable_token_indices",)),
    ("layer_replication", [[0, 2]], ("layer_replication",)),
    ("target_parameters", ["experts.gate_up_proj"], ("target_parameters",)),
    ("megatron_config", {"tensor_model_parallel_size": 2}, ("megatron_config",)),
    ("init_lora_weights", "pissa", ("init_lora_weights", "rewriting the base weight")),
    ("init_lora_weights", "olora", ("init_lora_weights",)),
    ("loftq_config", {"loftq_bits": 4}, ("LoftQ", "loftq_config")),
    ("ensure_weight_tying", True, ("ensure_weight_tying",)),
    ("frobnicate", {"level": 3}, ("unknown field", "frobnicate")),
]:
    case(f"adapter config refused {_field}: {json.dumps(_value)[:30]} (merge --base)")(
        lambda w, f=_field, v=_value, n=_needles: merge_config(w, f, v, *n))


@case("adapter config: factors for a module target_modules does not name")
def _untargeted(w: Workspace) -> Expect:
    return merge_config(w, "target_modules", ["q_proj"], "v_proj", "peft would not adapt it", "target_modules")


@case("adapter config: null target_modules")
def _null_targets(w: Workspace) -> Expect:
    return merge_config(w, "target_modules", None, "target_modules is null")


@case("adapter config: empty target_modules")
def _no_targets(w: Workspace) -> Expect:
    return merge_config(w, "target_modules", [], "peft would not adapt it", "target_modules")


@case("adapter config: exclude_modules names an adapted module")
def _excluded(w: Workspace) -> Expect:
    return merge_config(w, "exclude_modules", ["v_proj"], "v_proj", "exclude_modules names it")


@case("adapter config: exclude_modules regex matches an adapted module")
def _excluded_regex(w: Workspace) -> Expect:
    return merge_config(w, "exclude_modules", r".*layers\.1\..*", "exclude_modules matches it")


@case("adapter config: layers_to_transform leaves out an adapted layer")
def _layers(w: Workspace) -> Expect:
    return merge_config(w, "layers_to_transform", [0], "layers.1", "layers_to_transform")


@case("adapter config: layers_pattern matching no layer")
def _layers_pattern(w: Workspace) -> Expect:
    good = adapter(w, "good", seed=1)
    bad = adapter(w, "bad", config={**GOOD_CONFIG, "layers_to_transform": [0, 1], "layers_pattern": "blocks"})
    return Expect(["merge", str(good), str(bad), "--base", str(base(w)), "-o", w.out],
                  (str(bad / "adapter_config.json"), "layers_pattern"), w.canary)


@case("adapter config: rank_pattern disagrees with the factors")
def _rank_pattern_lies(w: Workspace) -> Expect:
    folder = adapter(w, config={**GOOD_CONFIG, "rank_pattern": {"v_proj": 4}})
    return Expect(["inspect", str(folder)], (str(folder / "adapter_model.safetensors"), "v_proj", "rank 2",
                                             "r=4"), w.canary)


@case("adapter config: r disagrees with the factors")
def _rank_lies(w: Workspace) -> Expect:
    folder = adapter(w, config={**GOOD_CONFIG, "r": 16})
    return Expect(["inspect", str(folder)], (str(folder / "adapter_model.safetensors"), "r=16"), w.canary)


@case("adapter config: rank_pattern key that backtracks catastrophically")
def _backtracking(w: Workspace) -> Expect:
    # module names with long runs of 'a': (a|a)*[bc] tries 2^n ways at each before failing; peft's re hangs
    shapes = {f"model.{'a' * 40}.layers.{i}.q_proj.weight": (8, 8) for i in (0, 1)}
    folder = adapter(w, config={**GOOD_CONFIG, "target_modules": ["q_proj"], "rank_pattern": {"(a|a)*[bc]": 2}},
                     tensors=factors(shapes=shapes))
    return Expect(["inspect", str(folder)], (str(folder / "adapter_config.json"), "rank_pattern key",
                                             "catastrophic backtracking"), w.canary)


@case("adapter config: target_modules regex that backtracks catastrophically")
def _backtracking_targets(w: Workspace) -> Expect:
    shapes = {f"model.{'a' * 40}.q_proj.weight": (8, 8)}
    folder = adapter(w, config={**GOOD_CONFIG, "target_modules": r"model\.(a|a)*[bc].*"},
                     tensors=factors(shapes=shapes))
    return Expect(["inspect", str(folder)], (str(folder / "adapter_config.json"), "target_modules pattern",
                                             "catastrophic backtracking"), w.canary)


@case("adapter config: not JSON")
def _config_garbage(w: Workspace) -> Expect:
    folder = adapter(w, raw_config=b"{'r': 8,")
    return Expect(["inspect", str(folder)], (str(folder / "adapter_config.json"), "not valid JSON"), w.canary)


@case("adapter config: a JSON list")
def _config_list(w: Workspace) -> Expect:
    folder = adapter(w, raw_config=b"[1, 2]")
    return Expect(["inspect", str(folder)], (str(folder / "adapter_config.json"), "not a JSON object"), w.canary)


@case("adapter config: 2 MiB")
def _config_huge(w: Workspace) -> Expect:
    folder = adapter(w, raw_config=json.dumps({**GOOD_CONFIG, "task_type": "x" * (2 << 20)}).encode())
    return Expect(["inspect", str(folder)], (str(folder / "adapter_config.json"), "at most 1,048,576 bytes"),
                  w.canary)


@case("adapter config: nested 100k deep")
def _config_deep(w: Workspace) -> Expect:
    folder = adapter(w, raw_config=b'{"auto_mapping": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    return Expect(["inspect", str(folder)], (str(folder / "adapter_config.json"),), w.canary)


@case("adapter config: a symlink out of the adapter folder")
def _config_link(w: Workspace) -> Expect:
    secret = w.root / "secret.json"
    secret.write_text(json.dumps({**GOOD_CONFIG, "token": "hf_SECRET_TOKEN_123"}))
    secret.chmod(0o600)
    folder = adapter(w)
    (folder / "adapter_config.json").unlink()
    os.symlink(secret, folder / "adapter_config.json")
    return Expect(["inspect", str(folder)], (str(folder / "adapter_config.json"), "outside the folder"),
                  w.canary, absent=("hf_SECRET",))


# --- the factor file ---------------------------------------------------------------------------------------------


def inspect_factors(w: Workspace, tensors: dict[str, torch.Tensor], *needles: str) -> Expect:
    folder = adapter(w, tensors=tensors)
    return Expect(["inspect", str(folder)], (str(folder / "adapter_model.safetensors"), *needles), w.canary)


Q = PREFIX + "model.layers.0.self_attn.q_proj"


@case("adapter factors: 1-D lora_A")
def _one_d(w: Workspace) -> Expect:
    return inspect_factors(w, {**factors(), f"{Q}.lora_A.weight": torch.ones(16)}, "lora_A", "(16,)", "2-D")


@case("adapter factors: lora_A and lora_B do not multiply")
def _mismatch(w: Workspace) -> Expect:
    return inspect_factors(w, {**factors(), f"{Q}.lora_B.weight": torch.ones(8, 3)}, "do not multiply")


@case("adapter factors: lora_A without lora_B")
def _half(w: Workspace) -> Expect:
    tensors = factors()
    del tensors[f"{Q}.lora_B.weight"]
    return inspect_factors(w, tensors, "only one of its two LoRA factors")


@case("adapter factors: integer lora_B")
def _int_factor(w: Workspace) -> Expect:
    return inspect_factors(w, {**factors(), f"{Q}.lora_B.weight": torch.ones(8, 2, dtype=torch.int32)},
                           "lora_B", "floating point")


@case("adapter factors: rank 0")
def _rank_zero(w: Workspace) -> Expect:
    tensors = {**factors(), f"{Q}.lora_A.weight": torch.ones(0, 8), f"{Q}.lora_B.weight": torch.ones(8, 0)}
    return inspect_factors(w, tensors, "empty dimension")


@case("adapter factors: a stray tensor")
def _stray(w: Workspace) -> Expect:
    return inspect_factors(w, {**factors(), "base_model.model.lm_head.weight": torch.ones(4, 4)},
                           "lm_head.weight", "neither a LoRA factor")


@case("adapter factors: none at all")
def _none(w: Workspace) -> Expect:
    return inspect_factors(w, {"something": torch.ones(2)}, "something")


@case("adapter factors: 5-D conv factor with a non-1 B kernel")
def _conv_b(w: Workspace) -> Expect:
    tensors = {f"{Q}.lora_A.weight": torch.ones(2, 3, 3, 3), f"{Q}.lora_B.weight": torch.ones(4, 2, 3, 3)}
    return inspect_factors(w, tensors, "do not multiply")


# --- adapters against their base, and against each other ----------------------------------------------------------


@case("adapter update shape disagrees with the base (--base)")
def _base_shape(w: Workspace) -> Expect:
    good = adapter(w, "good")
    shapes = {**BASE_SHAPES, "model.layers.1.self_attn.v_proj.weight": (6, 8)}
    return Expect(["merge", str(good), str(adapter(w, "other", seed=3)), "--base", str(base(w, shapes)),
                   "-o", w.out], ("model.layers.1.self_attn.v_proj.weight", "has shape (4, 8)", "(6, 8)"), w.canary)


@case("adapter matching nothing in the base (--base)")
def _base_nothing(w: Workspace) -> Expect:
    a, b = adapter(w, "a", seed=1), adapter(w, "b", seed=2)
    other = base(w, {"encoder.layer.0.weight": (8, 8)})
    return Expect(["merge", str(a), str(b), "--base", str(other), "-o", w.out], ("none of the 4 weights",
                  str(other)), w.canary)


@case("adapter changes an integer base tensor (--base)")
def _base_int(w: Workspace) -> Expect:
    a, b = adapter(w, "a", seed=1), adapter(w, "b", seed=2)
    return Expect(["merge", str(a), str(b), "--base", str(base(w, dtype=torch.int64)), "-o", w.out],
                  ("torch.int64", "only floating weights"), w.canary)


@case("adapters disagreeing on a module's shape (no base)")
def _each_other(w: Workspace) -> Expect:
    a = adapter(w, "a", seed=1)
    b = adapter(w, "b", tensors=factors(2, shapes={**BASE_SHAPES, "model.layers.0.self_attn.q_proj.weight": (8, 6)}))
    return Expect(["merge", str(a), str(b), "-o", str(w.root / "soup")], ("model.layers.0.self_attn.q_proj.weight",
                  "same base model"), w.canary)


@case("adapter given twice: its folder and its weights file")
def _twice(w: Workspace) -> Expect:
    a = adapter(w, "a")
    return Expect(["merge", str(a), str(a / "adapter_model.safetensors"), "-o", str(w.root / "soup")],
                  ("given twice",), w.canary)


@case("adapter given twice with --base")
def _twice_base(w: Workspace) -> Expect:
    a = adapter(w, "a")
    return Expect(["merge", str(a), str(a / "adapter_model.safetensors"), "--base", str(base(w)), "-o", w.out],
                  ("given twice",), w.canary)


@case("adapter soup without --base to -o soup.safetensors")
def _file_output(w: Workspace) -> Expect:
    a, b = adapter(w, "a", seed=1), adapter(w, "b", seed=2)
    return Expect(["merge", str(a), str(b), "-o", w.out], (w.out, "adapter folder"), w.canary)


@case("adapter soup without --base with --rank to -o soup.safetensors")
def _file_output_rank(w: Workspace) -> Expect:
    a, b = adapter(w, "a", seed=1), adapter(w, "b", seed=2)
    return Expect(["merge", str(a), str(b), "--rank", "2", "-o", w.out], (w.out, "adapter folder"), w.canary)


@case("adapter fan_in_fan_out on square modules of a bare base file")
def _fan_in_square(w: Workspace) -> Expect:
    shapes = {k: (8, 8) for k in BASE_SHAPES}
    config = {**GOOD_CONFIG, "fan_in_fan_out": True}
    a = adapter(w, "a", config=config, tensors=factors(1, shapes=shapes))
    b = adapter(w, "b", config=config, tensors=factors(2, shapes=shapes))
    return Expect(["merge", str(a), str(b), "--base", str(base(w, shapes)), "-o", w.out],
                  ("fan_in_fan_out", "Conv1D", "nn.Linear"), w.canary)


@case("adapter modules_to_save head that the other adapter lacks")
def _head_lacking(w: Workspace) -> Expect:
    tensors = {**factors(1), "base_model.model.score.modules_to_save.weight": torch.ones(2, 8)}
    a = adapter(w, "a", config={**GOOD_CONFIG, "modules_to_save": ["score"]}, tensors=tensors)
    b = adapter(w, "b", seed=2)
    return Expect(["merge", str(a), str(b), "-o", str(w.root / "soup")], (str(b), "lacks the full weight",
                  "score.weight"), w.canary)


@case("adapter modules_to_save head read without --base")
def _head_no_base(w: Workspace) -> Expect:
    tensors = {**factors(1), "base_model.model.score.modules_to_save.weight": torch.ones(2, 8)}
    a = adapter(w, "a", config={**GOOD_CONFIG, "modules_to_save": ["score"]}, tensors=tensors)
    return Expect(["inspect", str(a)], ("modules_to_save", "--base"), w.canary)


# --- options that ask for unbounded work ---------------------------------------------------------------------------

for _rank, _needles in [("0", ("--rank",)), ("-1", ("--rank",)), ("65537", ("--rank",)), ("9", ("--rank 9",
                        "above the full rank", "8"))]:
    case(f"adapter soup --rank {_rank}")(lambda w, r=_rank, n=_needles: Expect(
        ["merge", str(adapter(w, "a", seed=1)), str(adapter(w, "b", seed=2)), "--rank", r, "-o",
         str(w.root / "soup")], n, w.canary))


@case("adapter soup --weights count differs")
def _weights(w: Workspace) -> Expect:
    return Expect(["merge", str(adapter(w, "a", seed=1)), str(adapter(w, "b", seed=2)), "-m", "linear", "--weights",
                   "1,2,3", "-o", str(w.root / "soup")], ("--weights",), w.canary)


#: a lopsided pair: factors of 1 x 600k (2.3 MiB each) whose dense updates are 32 x 600k (73 MiB)
LOPSIDED = {"model.wide.weight": (32, 600_000)}


@case("adapter TIES --rank without --base on lopsided adapters (dense updates refused)")
def _dense(w: Workspace) -> Expect:
    config = {**GOOD_CONFIG, "r": 1, "lora_alpha": 1, "target_modules": ["wide"]}
    a = adapter(w, "a", config=config, tensors=factors(1, rank=1, shapes=LOPSIDED))
    b = adapter(w, "b", config=config, tensors=factors(2, rank=1, shapes=LOPSIDED))
    return Expect(["merge", str(a), str(b), "-m", "ties", "--density", "0.5", "--rank", "1", "-o",
                   str(w.root / "soup")], ("ties", "dense updates", "MiB", "--base"), w.canary)
