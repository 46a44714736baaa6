"""The declared schema of a PEFT LoRA ``adapter_config.json``, and how soupkit handles each of its fields.

peft's ``LoraConfig`` has ~40 fields. Each changes what ``merge_and_unload`` computes, or not; soupkit must do the
same or say it cannot. ``FIELDS`` declares, for every field peft knows, one of:

- ``honoured``: soupkit computes exactly what peft does with it (``tests/io/test_adapter_config.py`` checks each
  against peft's own ``merge_and_unload``);
- ``ignored``: it cannot change the merged weights (training-, init- or bookkeeping-only), with the reason;
- ``refused``: any value but the off one is refused in one line naming the file and field.

A field in a config that is in neither peft's ``LoraConfig`` nor ``FIELDS`` (a newer peft's) is accepted only
while it holds an "off" value (null, false, {}, []); anything else is refused, since soupkit cannot know what it
would change. ``tests/io/test_adapter_config.py`` iterates over ``dataclasses.fields(peft.LoraConfig)``: a field a new
peft adds fails it until it is declared here.

Values are checked by a pydantic model (``AdapterConfig``): types are strict (``"16"`` is not a number, ``true``
is not a rank), numbers finite, ranks bounded. Module-name patterns (``rank_pattern`` / ``alpha_pattern`` keys,
a string ``target_modules`` / ``exclude_modules``, ``layers_pattern``) are regular expressions peft runs with
``re``; soupkit checks their syntax with ``re`` too, but runs them with the ``regex`` engine under a time budget
(``PatternMatcher``), so a pattern that backtracks catastrophically is one line, never a hang. On patterns that
finish, ``regex`` (its default VERSION0 is ``re``-compatible) gives the same matches as ``re``: a property test
compares the two.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from soupkit.errors import CheckpointError
from soupkit.io.small_files import read_small_file

__all__ = ["FIELDS", "LEGACY_FIELDS", "MAX_CONFIG_BYTES", "MAX_RANK", "AdapterConfig", "Handling", "PatternMatcher",
           "read_adapter_config"]

#: adapter configs are ~1-2 KB; anything bigger is not one (and is never read whole)
MAX_CONFIG_BYTES = 1 << 20
#: the largest rank a config may declare: 64k is 16x the hidden size of a 7B model; factors of higher rank
#: than their layer's sides are legal in peft but never useful, and the factors themselves must hold it anyway
MAX_RANK = 1 << 16
#: total wall-clock budget for all pattern matching of one adapter (thousands of modules x a few patterns take
#: milliseconds; a pattern that needs more is backtracking catastrophically)
PATTERN_BUDGET_S = 2.0


class Handling(NamedTuple):
    """How soupkit treats one ``LoraConfig`` field: ``how`` is honoured / ignored / refused; ``why`` says how."""

    how: Literal["honoured", "ignored", "refused"]
    why: str


def _h(why: str) -> Handling:
    return Handling("honoured", why)


def _i(why: str) -> Handling:
    return Handling("ignored", why)


def _r(why: str) -> Handling:
    return Handling("refused", why)


#: every LoraConfig field of peft (0.21), and how soupkit handles it
FIELDS: dict[str, Handling] = {
    # bookkeeping
    "task_type": _i("names the model head peft wraps; the weights do not depend on it"),
    "peft_type": _h("must be LORA: any other peft type is refused"),
    "auto_mapping": _i("names the base model's class for peft's AutoPeftModel; soupkit never imports a class "
                       "named by a file (the base is what --base names)"),
    "peft_version": _i("the peft version that saved the adapter"),
    "base_model_name_or_path": _i("where the base came from; soupkit never downloads: the base is --base"),
    "revision": _i("the base's hub revision; soupkit never downloads"),
    "inference_mode": _i("a training switch (frozen or trainable factors)"),
    # what is adapted, and by how much
    "r": _h("each module's rank (the factors must agree); scale alpha / r"),
    "lora_alpha": _h("scale alpha / r (alpha / sqrt(r) with use_rslora)"),
    "use_rslora": _h("scale alpha / sqrt(r)"),
    "rank_pattern": _h("per-module r, first matching key as peft's get_pattern_key: (.*\\.)?(key)$"),
    "alpha_pattern": _h("per-module alpha, matched as rank_pattern"),
    "target_modules": _h("a factor for a module peft would not adapt (list: name or .suffix; string: full regex "
                         "match) is refused, since peft would not apply it; null (peft's per-model default) is "
                         "refused"),
    "exclude_modules": _h("a factor for an excluded module is refused, since peft would not apply it"),
    "layers_to_transform": _h("a factor outside these layer indices is refused, as peft would not apply it"),
    "layers_pattern": _h("where the layer index is read from (with layers_to_transform), as peft reads it"),
    "fan_in_fan_out": _h("as peft: decided by the layer, not the flag (nn.Linear: B @ A; transformers' Conv1D: "
                         "(B @ A).T); with a base, each module's layout is read from the base's shape"),
    "modules_to_save": _h("the saved full weights of those modules replace the base's"),
    "bias": _h("'all' / 'lora_only': the saved biases replace the base's, as peft loads them"),
    "lora_dropout": _i("training only (dropout is off at merge)"),
    "init_lora_weights": _h("true / false / 'gaussian' / 'eva' only initialise the factors, which are saved: "
                            "ignored; inits that rewrite the base weight (pissa, olora, corda, loftq, lora_ga, "
                            "orthogonal) are refused"),
    "runtime_config": _i("runtime-only (GPU offload); peft does not even save it"),
    "megatron_core": _i("only read with megatron_config (refused); soupkit never imports it"),
    "qalora_group_size": _i("only read with use_qalora (refused)"),
    "eva_config": _i("EVA initialisation settings; the saved factors are what counts"),
    "corda_config": _i("CorDA initialisation settings; init_lora_weights 'corda' itself is refused"),
    "lora_ga_config": _i("LoRA-GA initialisation settings; init_lora_weights 'lora_ga' itself is refused"),
    # variants soupkit does not merge (the message reads "<why> are not supported (<field>: <value>)")
    "use_dora": _r("DoRA adapters (W rescaled by a learned magnitude, not W + s * B @ A)"),
    "lora_bias": _r("LoRA biases (lora_bias)"),
    "use_qalora": _r("QA-LoRA adapters (pooled inputs)"),
    "alora_invocation_tokens": _r("activated LoRA adapters, which peft itself refuses to merge,"),
    "megatron_config": _r("adapters of Megatron parallel layers"),
    "trainable_token_indices": _r("trainable token rows (a separate delta of the embedding)"),
    "loftq_config": _r("LoftQ adapters (the base quantised and rewritten)"),
    "velora_config": _r("VeLoRA adapters"),
    "monteclora_config": _r("MonteCLoRA adapters (sampled factors)"),
    "layer_replication": _r("adapters of replicated layers the base does not have"),
    "target_parameters": _r("LoRA adapters of raw parameters (MoE experts)"),
    "use_bdlora": _r("block-diagonal LoRA adapters"),
    "arrow_config": _r("Arrow routing between adapters"),
    "kasa_config": _r("KaSA adapters"),
    "ensure_weight_tying": _r("adapters tied across tied layers (ensure_weight_tying)"),
}

#: fields older peft versions saved that peft no longer has: their handling, as for FIELDS
LEGACY_FIELDS: dict[str, Handling] = {
    "merge_weights": _i("peft < 0.3: whether to merge in eval mode, a runtime switch"),
    "enable_lora": _r("peft < 0.3 MergedLinear adapters (enable_lora)"),
}

#: init_lora_weights values that only initialise the factors (the merge uses the saved ones)
FACTOR_ONLY_INITS = (True, False, "gaussian", "eva")

Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]
Name = Annotated[str, Field(min_length=1, max_length=4096)]


def _off(value: Any) -> bool:
    """An "off" value: what a field holds when the feature it controls is unused."""
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


class AdapterConfig(BaseModel):
    """``adapter_config.json`` of a LoRA adapter, as soupkit reads it (defaults as peft's ``LoraConfig``)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True, allow_inf_nan=False)

    peft_type: str = "LORA"
    task_type: str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    r: Rank = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    rank_pattern: dict[Name, Rank] = {}
    alpha_pattern: dict[Name, float] = {}
    target_modules: Annotated[list[Name], Field(max_length=100_000)] | Name | None = None
    exclude_modules: Annotated[list[Name], Field(max_length=100_000)] | Name | None = None
    layers_to_transform: Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]] | None = None
    layers_pattern: Name | list[Name] | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[Name] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_dropout: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    init_lora_weights: bool | str = True
    runtime_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    qalora_group_size: int = 16
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    lora_ga_config: dict[str, Any] | None = None
    # refused unless off: any JSON value parses, the check below names the field
    use_dora: Any = False
    lora_bias: Any = False
    use_qalora: Any = False
    alora_invocation_tokens: Any = None
    megatron_config: Any = None
    trainable_token_indices: Any = None
    loftq_config: Any = None
    velora_config: Any = None
    monteclora_config: Any = None
    layer_replication: Any = None
    target_parameters: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: Any = False

    @field_validator("peft_type")
    @classmethod
    def _lora_only(cls, value: str) -> str:
        if value.upper() != "LORA":
            raise ValueError(f"a {value[:40]!r} adapter; soupkit merges LoRA adapters only (peft_type LORA)")
        return "LORA"

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns_compile(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            _compile(key)
        return value

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _string_is_a_regex(cls, value: Any) -> Any:
        if isinstance(value, str):  # a string is a regex peft full-matches; list items are plain names
            _compile(value)
        return value

    @field_validator("layers_pattern", "modules_to_save")
    @classmethod
    def _items_are_regexes(cls, value: Any) -> Any:
        for item in [value] if isinstance(value, str) else value or []:
            _compile(item)  # peft interpolates these into its own regexes unescaped
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AdapterConfig:
        """The combinations peft's own ``LoraConfig.__post_init__`` refuses (so peft cannot load the adapter)."""
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used with a string (regex) target_modules, as in peft")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be used with a string (regex) target_modules, as in peft")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is set without layers_to_transform, which peft refuses")
        return self

    def refusal(self) -> tuple[str, str] | None:
        """``(field, why)`` for the first field whose value soupkit refuses, or None."""
        for name, handling in FIELDS.items():
            if handling.how == "refused" and not _off(getattr(self, name)):
                return name, f"{handling.why} are not supported ({name}: {_short(getattr(self, name))})"
        if self.target_modules is None:
            return "target_modules", ("target_modules is null: peft would adapt its default modules for the base's "
                                      "model type, which soupkit cannot tell from the adapter; name them in "
                                      "target_modules")
        if self.init_lora_weights not in FACTOR_ONLY_INITS:
            return "init_lora_weights", (f"init_lora_weights {_short(self.init_lora_weights)} initialises by "
                                         f"rewriting the base weight, so the factors are relative to a base soupkit "
                                         f"does not have; convert the adapter with peft's save_pretrained("
                                         f"path_initial_model_for_weight_conversion=...) first")
        for name, value in (self.model_extra or {}).items():
            legacy = LEGACY_FIELDS.get(name)
            if legacy is not None and legacy.how == "ignored":
                continue
            if legacy is not None and not _off(value):
                return name, f"{legacy.why} are not supported ({name}: {_short(value)})"
            if not _off(value):  # its value is never echoed: the file may not be what it claims
                return name, (f"unknown field {_short(name)} is set (not a LoraConfig field of the peft soupkit "
                              f"knows); soupkit cannot tell what it would change")
        return None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _compile(pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"{pattern[:60]!r} is not a valid regular expression ({err})") from None


# --------------------------------------------------------------------------------------------- reading


def read_adapter_config(path: Path) -> AdapterConfig:
    """Parse and validate ``adapter_config.json``: one ``CheckpointError`` line naming the file and the field.
    The file must be a regular file of at most ``MAX_CONFIG_BYTES`` (never read further), inside its folder: a
    symlink is followed only to a file in the same folder or to a Hugging Face hub cache blob
    (``snapshots/REV/adapter_config.json`` -> ``../../blobs/HASH``)."""
    data = read_small_file(path.parent, path.name, limit=MAX_CONFIG_BYTES)  # a bounded regular file in the folder
    if data is None:
        raise CheckpointError(f"{path}: cannot read: No such file or directory")
    try:
        raw = json.loads(data.decode("utf-8"))  # NaN / Infinity parse: the schema then names the field
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    try:
        config = AdapterConfig(**{str(k): v for k, v in raw.items()})
    except ValidationError as err:
        raise CheckpointError(f"{path}: {_describe(err)}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply") from None
    refused = config.refusal()
    if refused is not None:
        raise CheckpointError(f"{path}: {refused[1]}; merge the adapter into its base with peft first"
                              if refused[0] in FIELDS else f"{path}: {refused[1]}")
    return config


def _describe(err: ValidationError) -> str:
    """The first pydantic error as ``field 'a.b': message (got VALUE)``, on one line."""
    first = err.errors(include_url=False)[0]
    # union members add their type name to the location (``target_modules.list[...]``): keep the data path
    loc = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES)))
    if not loc:  # a check across fields names them itself
        return first["msg"].replace("\n", " ").removeprefix("Value error, ")
    message = first["msg"].replace("\n", " ")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    got = first.get("input")
    shown = "" if first["type"] == "value_error" else f" (got {_short(got) if _jsonable(got) else type(got)})"
    return f"field {loc!r}: {message}{shown}"


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str", "constrained-int",
               "literal['none','all','lora_only']"}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------- patterns


class PatternMatcher:
    """peft's module-name matching (``get_pattern_key``, ``check_target_module_exists``), run with the ``regex``
    engine under one shared time budget per adapter; a pattern that exhausts it is one ``CheckpointError``."""

    def __init__(self, config: AdapterConfig, path: Path, budget_s: float = PATTERN_BUDGET_S):
        self.config = config
        self.path = path
        self._deadline = time.monotonic() + budget_s
        self._budget = budget_s

    def _match(self, pattern: str, name: str, field: str, *, full: bool = False) -> Any:
        left = max(self._deadline - time.monotonic(), 1e-3)
        try:
            return (regex.fullmatch if full else regex.match)(pattern, name, timeout=left)
        except TimeoutError:
            raise CheckpointError(
                f"{self.path}: {field} pattern {_short(pattern)} takes more than {self._budget:g} s to match the "
                f"module names (catastrophic backtracking); write it without nested repetition") from None
        except (regex.error, RecursionError, OverflowError) as err:  # compiled by re, refused by regex: rare
            raise CheckpointError(f"{self.path}: {field} pattern {_short(pattern)} cannot be run: {err}") from None

    def pattern_value(self, field: str, module: str, default: Any) -> Any:
        """``rank_pattern`` / ``alpha_pattern``: the value of the first key ``k`` with ``(.*\\.)?(k)$`` matching
        the module name (peft's ``get_pattern_key``, in the config's key order), else ``default``."""
        patterns: Mapping[str, Any] = getattr(self.config, field)
        for key, value in patterns.items():
            if self._match(rf"(.*\.)?({key})$", module, f"{field} key") is not None:
                return value
        return default

    def why_not_adapted(self, module: str) -> str | None:
        """Why peft would not adapt ``module`` (so would not apply its saved factors), or None when it would;
        ``check_target_module_exists`` of peft, field by field."""
        c = self.config
        if isinstance(c.exclude_modules, str):
            if self._match(c.exclude_modules, module, "exclude_modules", full=True) is not None:
                return "exclude_modules matches it"
        elif c.exclude_modules and (module in c.exclude_modules or
                                    any(module.endswith(f".{e}") for e in c.exclude_modules)):
            return "exclude_modules names it"
        for saved in c.modules_to_save or []:
            if self._match(rf"(^|.*\.){saved}($|\..*)", module, "modules_to_save") is not None:
                return f"it lies in modules_to_save {saved!r}"
        targets = c.target_modules
        if targets is None or targets == "all-linear":
            return None  # null is refused when reading; all-linear: every linear layer (peft saves the expansion)
        if isinstance(targets, str):
            return None if self._match(targets, module, "target_modules", full=True) is not None else (
                "the target_modules pattern does not match it")
        if module in targets:
            return None
        if not any(module.endswith(f".{t}") for t in targets):
            return "target_modules does not name it"
        return self._layer_check(module)

    def _layer_check(self, module: str) -> str | None:
        c = self.config
        indices = c.layers_to_transform
        if indices is None or indices == []:
            return None
        patterns = c.layers_pattern
        found = None
        if not patterns:
            found = self._match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module, "layers_to_transform")
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                found = self._match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module, "layers_pattern")
                if found is not None:
                    break
        if found is None:
            return "layers_to_transform is set and its layer index cannot be found (layers_pattern)"
        index = int(found["idx"])
        wanted = [indices] if isinstance(indices, int) else indices
        return None if index in wanted else f"its layer {index} is not in layers_to_transform {wanted}"

