"""The output options: everything about how a checkpoint is written, declared once.

Every command and library call that writes a checkpoint (``merge`` with any method, greedy / learned soups,
``wise`` and its sweeps, ``convert``, ``zeroshot``) takes one ``OutputOptions``. The CLI flags, their help and
their validation are generated from the fields below (``soupkit.cli.options``), so a new option is one field
here. Torch-free: ``soupkit --help`` imports this.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from soupkit.errors import ParameterError, suggest
from soupkit.options_parse import parse_size

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------------------------- vocabulary
# The one home of the dtype and device names every command, recipe and library call accepts.

#: the floating dtypes soupkit writes: the canonical name (``--dtype``, provenance) -> torch's name
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
#: every name users may give -> the canonical one (torch's own names and the usual short forms)
DTYPE_NAMES = {**{name: name for name in DTYPES}, **{torch_name: name for name, torch_name in DTYPES.items()},
               "half": "fp16", "double": "fp64"}
#: where arithmetic can run; "auto" is this process's CUDA device when there is one, else the CPU
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def dtype_name(value: Any) -> str | None:
    """A dtype as users give it (``"bfloat16"``, ``"bf16"``, ``torch.bfloat16``) -> its canonical name
    (``"bf16"``); None stays None. ``ValueError`` names the choices."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.") if type(value).__name__ == "dtype" else value
    if not isinstance(name, str) or name.lower() not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {str(name)!r}; choose fp32, fp16, bf16 or fp64 (floating dtypes)")
    return DTYPE_NAMES[name.lower()]


def torch_dtype_name(value: Any) -> str | None:
    """``"bf16"`` -> ``"bfloat16"``: how torch, config.json and provenance name a dtype."""
    name = dtype_name(value)
    return None if name is None else DTYPES[name]


def device_name(value: Any) -> str:
    """A device as users give it (``"cuda:1"``, ``torch.device("cpu")``) checked against the vocabulary; returns
    its text. ``ValueError`` names the choices. Whether this machine has it is ``resolve_device``'s question."""
    text = str(value) if type(value).__name__ == "device" else value
    if not isinstance(text, str):
        raise ValueError(f"unknown device {value!r}; use {DEVICE_CHOICES}")
    kind, colon, index = text.partition(":")
    if kind not in DEVICE_KINDS or (colon and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"unknown device {text!r}; use {DEVICE_CHOICES}")
    return text


def parse_dtype(value: Any) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16``; None keeps each tensor's dtype. One-line ``ParameterError``."""
    try:
        name = torch_dtype_name(value)
    except ValueError as error:
        raise ParameterError(f"{user_name('dtype')}: {error}") from None
    if name is None:
        return None
    import torch  # lazy: this module stays torch-free for soupkit --help

    return getattr(torch, name)


def resolve_device(value: Any, local_rank: int = 0) -> torch.device:
    """A device name -> a torch device this machine has: ``auto`` is CUDA device ``local_rank`` when CUDA is
    available, else the CPU; ``cuda`` without an index is device ``local_rank`` (torchrun's process). One-line
    ``ParameterError`` naming the device otherwise."""
    import torch  # lazy: this module stays torch-free for soupkit --help

    where = user_name("device")
    try:
        text = device_name("auto" if value is None else value)
    except ValueError as error:
        raise ParameterError(f"{where}: {error}") from None
    if text == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(f"{where} {text}: CUDA is not available on this machine; use cpu")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ParameterError(f"{where} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ParameterError(f"{where} {text}: MPS is not available on this machine; use cpu")
    return device


class OutputOptions(BaseModel):
    """How a checkpoint is computed and written. Each field's description is its CLI help."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    dtype: Annotated[str | None, Field(description=f"Output dtype of floating tensors: {', '.join(DTYPES)} "
                                                   "[default: each tensor's input dtype].")] = None
    precise: Annotated[bool, Field(description="Accumulate in float64 instead of float32.")] = False
    device: Annotated[str, Field(description=f"Where the arithmetic runs: {DEVICE_CHOICES}.")] = "cpu"
    shard_size: Annotated[int | None, Field(description="Write Hugging Face-style shards of at most this size "
                                                        "(e.g. 5GB) plus an index.")] = None
    include: Annotated[tuple[str, ...], Field(description="Merge only tensors matching this glob (repeatable); "
                                                          "the others are copied from the first input.")] = ()
    exclude: Annotated[tuple[str, ...], Field(description="Do not merge tensors matching this glob (repeatable); "
                                                          "they are copied from the first input.")] = ()
    allow_missing: Annotated[bool, Field(description="Keep keys present in only some inputs (merged over the "
                                                     "inputs that have them).")] = False
    allow_nonfinite: Annotated[bool, Field(description="Merge even if an input holds NaN/Inf.")] = False
    ema: Annotated[bool, Field(description="Read the EMA weights (state_dict_ema, model_ema) of .pt "
                                           "inputs.")] = False
    force: Annotated[bool, Field(description="Replace an existing output (never an input).")] = False
    strip_prefix: Annotated[str | None, Field(description="Read tensor names without this prefix, e.g. model. of "
                                                          "a Lightning checkpoint (keys without it are left "
                                                          "out).")] = None
    add_prefix: Annotated[str | None, Field(description="Write tensor names with this prefix (e.g. model. "
                                                        "back for a Lightning .ckpt).")] = None
    rank: Annotated[int | None, Field(description="LoRA adapters without --base: write the soup as an adapter of "
                                                  "this rank (truncated SVD; its error is reported).",
                                      gt=0, le=65536)] = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> str | None:
        return dtype_name(value)

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> str:
        return device_name(value)

    @field_validator("shard_size", mode="before")
    @classmethod
    def _shard_size(cls, value: Any) -> int | None:
        return None if value is None else parse_size(value, user_name("shard_size"))

    @field_validator("strip_prefix", "add_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(not c.isprintable() for c in value)):
            raise ValueError(f"expected a printable tensor-name prefix such as 'model.', got {value!r}")
        return value

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _globs(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, Iterable) or not all(isinstance(v, str) and v for v in items):
            raise ValueError("expected a glob or a list of globs")
        return tuple(items)

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> OutputOptions:
        """Validate ``values`` (library keyword arguments or CLI flags) with one-line errors naming the option."""
        unknown = [k for k in values if k not in cls.model_fields]
        if unknown:
            raise ParameterError(f"unknown output option {unknown[0]!r}.{suggest(unknown[0], cls.model_fields)} "
                                 f"Options: {', '.join(cls.model_fields)}")
        try:
            return cls.model_validate(dict(values))
        except ValidationError as error:
            first = error.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "options"
            message = first["msg"].removeprefix("Value error, ")
            raise ParameterError(f"{user_name(name)}: {message[0].lower()}{message[1:]}") from None

    def changed(self) -> list[str]:
        """Names of the options set to something other than their default."""
        return [name for name, info in type(self).model_fields.items() if getattr(self, name) != info.default]


@dataclass(frozen=True)
class Command:
    """What a command's own computation honours among the ``OutputOptions`` fields (``None``: whatever the
    output's writer does, as for a merge), and ``why`` it takes no other: the merge plan refuses the rest in
    one line (``soupkit.merging.writers.check_options``). Declared positively, so a new field is refused until
    a command says it honours it."""

    title: str
    honours: frozenset[str] | None = None
    why: str = ""


def flag(name: str) -> str:
    """The CLI flag of an option or parameter name: ``shard_size`` -> ``--shard-size``."""
    return "--" + name.replace("_", "-")


_CLI_NAMES = contextvars.ContextVar("soupkit_cli_names", default=False)


def user_name(name: str) -> str:
    """How to name an option or parameter in a message: ``--shard-size`` on the command line, ``shard_size`` in
    library calls (each user sees their own syntax)."""
    return flag(name) if _CLI_NAMES.get() else name


@contextlib.contextmanager
def cli_names() -> Iterator[None]:
    """Messages raised inside name options as CLI flags (the CLI's entry point runs commands in this)."""
    token = _CLI_NAMES.set(True)
    try:
        yield
    finally:
        _CLI_NAMES.reset(token)


def split_options(kwargs: Mapping[str, Any]) -> tuple[OutputOptions, dict[str, Any]]:
    """Library keyword arguments -> (the output options among them, the rest)."""
    fields = OutputOptions.model_fields
    given = kwargs.get("options")
    if given is not None and not isinstance(given, OutputOptions):
        raise ParameterError(f"options: expected an OutputOptions, got {type(given).__name__}")
    own = {k: v for k, v in kwargs.items() if k in fields}
    rest = {k: v for k, v in kwargs.items() if k not in fields and k != "options"}
    if given is not None:
        options = given.model_copy(update=OutputOptions.build(own).model_dump(include=set(own))) if own else given
    else:
        options = OutputOptions.build(own)
    return options, rest
