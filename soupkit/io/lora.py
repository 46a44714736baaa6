"""PEFT LoRA adapters: read as the weight updates they stand for, written back as adapters peft loads.

An adapter stores two factors per module, ``lora_A`` (r x in) and ``lora_B`` (out x r); the model it stands for
is ``W + s * B @ A`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA; ``rank_pattern`` and
``alpha_pattern`` override r and alpha per module). Averaging factors separately is wrong (the mean of two
products is not the product of the means), so soupkit merges the updates ``dW = s * B @ A`` instead:

- ``open_adapter(path)`` -> a reader whose tensors are the updates, keyed by the base model's names
  (``base_model.model.x.q_proj.lora_A.weight`` -> ``x.q_proj.weight``): every merge method works on them.
- ``open_adapter(path, base=BASE)`` -> a reader of the adapted model's full weights ``W + dW`` (keys the adapter
  does not touch pass through from the base): WiSE-FT, soups, TIES... of adapted models.
- ``merge_adapters(adapters, weights, output)`` -> an adapter folder for a weighted sum of updates, exact by rank
  concatenation (as peft's ``add_weighted_adapter(combination_type="cat")``: ranks add up), or re-factorised to
  rank R (``rank=R``; the relative reconstruction error is reported) from the factors alone: the sum has rank
  <= sum of ranks, so a QR of the stacked factors and an SVD of the small core give it without the d x k update.
- ``save_adapter(deltas, template, output, rank)`` -> an adapter folder for any merged updates (TIES, DARE...).

Updates are computed lazily, per key and per flat range (only the elements asked for), so memory stays bounded
by one chunk whatever the adapter's size. Linear, Conv1D, embedding and convolution LoRA are supported; with a
base, a linear module is laid out as its layer holds its weight (peft decides ``fan_in_fan_out`` by the layer
class, not the flag). ``adapter_config.json`` is validated against a declared schema
(``soupkit.io.adapter_config``: every peft ``LoraConfig`` field honoured, ignored with a reason, or refused in
one line); factors are checked against each other, the config and the base before any update is computed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import CheckpointError, IncompatibleCheckpointsError, OutputError, ParameterError
from soupkit.io.adapter_config import FIELDS, AdapterConfig, PatternMatcher, read_adapter_config
from soupkit.io.atomic import check_derived_output
from soupkit.io.base import CheckpointReader, TensorInfo
from soupkit.io.hf_folder import FolderOutput, hf_folder_of
from soupkit.io.provenance import ingredient_record, provenance_metadata

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterResult", "LoraAdapter", "LoraDeltaReader", "LoraMergedReader",
    "check_adapter_mix", "check_adapter_output", "check_dense_merge", "check_rank",
    "find_adapter", "is_adapter", "merge_adapters", "merge_adapters_exact", "open_adapter", "reduce_factors",
    "refactor_lora", "save_adapter",
]  # fmt: skip

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


# --------------------------------------------------------------------------------------------- finding


def find_adapter(path: str | Path) -> tuple[Path, Path] | None:
    """``(adapter_config.json, weights file)`` when ``path`` is a PEFT adapter folder, its weights file, or its
    config; None otherwise. Cheap: looks at file names only."""
    p = Path(path)
    if p.is_dir():
        folder = p
    elif p.is_file() and (p.name in ADAPTER_WEIGHTS or p.name == ADAPTER_CONFIG):
        folder = p.parent
    elif p.is_file() and p.suffix in (".safetensors", ".bin", ".pt") and (
            (p.parent / ADAPTER_CONFIG).exists() or (p.parent / ADAPTER_CONFIG).is_symlink()):
        return p.parent / ADAPTER_CONFIG, p  # a renamed weights file beside its config
    else:
        return None
    config = folder / ADAPTER_CONFIG
    if not config.exists() and not config.is_symlink():  # any entry of that name: reading it refuses a bad one
        return None
    if p.is_file() and p.name != ADAPTER_CONFIG:
        return config, p
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return config, folder / name
    if p.is_dir() and any((folder / name).exists() for name in ("model.safetensors", "model.safetensors.index.json",
                                                                "pytorch_model.bin")):
        return None  # a full model saved beside the config of the adapter it was merged from
    raise CheckpointError(f"{folder}: has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")


def is_adapter(path: str | Path) -> bool:
    """True if ``path`` is a PEFT adapter folder (or its weights file, or its config)."""
    try:
        return find_adapter(path) is not None
    except CheckpointError:
        return True  # an adapter folder missing its weights: opening it says so


# --------------------------------------------------------------------------------------------- parsing

#: model types of transformers whose block layers are ``Conv1D`` (weight stored (in, out)); peft decides
#: ``fan_in_fan_out`` by the layer class, so a square module's layout is read from here when shapes cannot tell
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt"})
#: model types that mix Conv1D and nn.Linear layers: a square module's layout cannot be told from the type
MIXED_MODEL_TYPES = frozenset({"clvp", "convbert"})
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are, its scale, and how ``dW = s * left @ right`` is laid out.

    ``left`` is (rows, r) and ``right`` (r, cols) with ``dW.reshape(rows, cols)``: ``B`` and ``A`` for linear
    and convolution layers, ``A.T`` and ``B.T`` where peft transposes (Conv1D layers, embeddings).
    """

    key: str  # the base model's weight name, e.g. model.layers.0.self_attn.q_proj.weight
    module: str  # the module name peft matches rank_pattern / alpha_pattern against
    a_key: str
    b_key: str
    kind: str  # "linear", "embedding" or "conv"
    transposed: bool
    rank: int
    alpha: float
    scale: float
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def straight(self) -> tuple[int, ...]:
        """The shape of ``B @ A`` (a linear module's update when its layer is an nn.Linear)."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    def laid_out(self, transposed: bool) -> LoraModule:
        """This linear module with its update laid out as an nn.Linear (False) or a Conv1D (True) weight."""
        if self.kind != "linear" or transposed == self.transposed:
            return self
        return replace(self, transposed=transposed, shape=(self.shape[1], self.shape[0]))


def _module_name(adapter_key: str) -> str:
    return adapter_key[len(_PEFT_PREFIX):] if adapter_key.startswith(_PEFT_PREFIX) else adapter_key


# --------------------------------------------------------------------------------------------- the adapter


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter on disk: its config, its factor file (read lazily) and its adapted modules."""

    config_path: Path
    weights_path: Path
    config: dict[str, Any]  # the validated fields, as JSON (the template of written adapters)
    factors: CheckpointReader
    settings: AdapterConfig = field(default_factory=AdapterConfig)
    modules: dict[str, LoraModule] = field(default_factory=dict)
    #: full weights the adapter saves (``modules_to_save`` heads, ``bias: all / lora_only``): base name -> key
    full: dict[str, str] = field(default_factory=dict)
    _cache: tuple[str, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        """Parse the adapter at ``path`` (folder, weights file or config); raises ``CheckpointError``."""
        from soupkit.io import open_file  # cycle: soupkit.io re-exports this module

        found = find_adapter(path)
        if found is None:
            raise CheckpointError(f"{path}: not a PEFT adapter (no {ADAPTER_CONFIG} beside it)")
        config_path, weights_path = found
        settings = read_adapter_config(config_path)
        factors = open_file(weights_path)
        adapter = cls(config_path, weights_path, settings.model_dump(mode="json"), factors, settings)
        try:
            adapter._parse()
        except BaseException:
            factors.close()
            raise
        return adapter

    @property
    def name(self) -> str:
        """The adapter folder (what users name on the command line)."""
        return str(self.config_path.parent)

    def _parse(self) -> None:
        pairs: dict[str, dict[str, str]] = {}
        for key in self.factors.keys():
            match = _FACTOR.match(key)
            if match is None:
                self._full_weight(key)
                continue
            part = match["part"].replace("lora_embedding_", "embedding_").replace("lora_", "")
            parts = pairs.setdefault(match["module"], {})
            if part in parts:
                raise CheckpointError(f"{self.weights_path}: module {_module_name(match['module'])!r} has two "
                                      f"{match['part']} tensors ({parts[part]!r} and {key!r})")
            parts[part] = key
        matcher = PatternMatcher(self.settings, self.config_path)
        for module_key, parts in pairs.items():
            module = self._module(_module_name(module_key), parts, matcher)
            self.modules[module.key] = module
        if not self.modules:
            raise CheckpointError(f"{self.weights_path}: no lora_A/lora_B factors in this adapter")
        overlap = set(self.modules) & set(self.full)
        if overlap:
            raise CheckpointError(f"{self.weights_path}: {sorted(overlap)[0]!r} is both LoRA-adapted and saved in "
                                  f"full; peft would not adapt a module it saves")

    def _full_weight(self, key: str) -> None:
        name = _module_name(key)
        info = self.factors.info(key)
        saved = self.settings.modules_to_save or []
        in_saved = any(name == f"{m}.{name.rsplit('.', 1)[-1]}" or f".{m}." in f".{name}" for m in saved)
        bias = self.settings.bias != "none" and name.endswith(".bias") and ".modules_to_save." not in name
        if not (in_saved or bias):
            raise CheckpointError(f"{self.weights_path}: tensor {key!r} is neither a LoRA factor nor a weight of "
                                  f"modules_to_save {saved} (nor a bias, with bias: {self.settings.bias!r}); "
                                  f"soupkit cannot merge it")
        if info.dtype.is_complex:
            raise CheckpointError(f"{self.weights_path}: tensor {key!r} is {info.dtype}; soupkit merges real weights")
        # peft's names: a head's saved copy sits under .modules_to_save., a LoRA layer's own bias under .base_layer.
        base_name = name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
        if base_name in self.full:
            raise CheckpointError(f"{self.weights_path}: {base_name!r} is saved twice ({self.full[base_name]!r} "
                                  f"and {key!r})")
        self.full[base_name] = key

    def _factor_info(self, module: str, key: str, what: str, dims: tuple[int, ...]) -> TensorInfo:
        info = self.factors.info(key)
        if len(info.shape) not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise CheckpointError(f"{self.weights_path}: module {module!r}: {what} has shape {tuple(info.shape)}; "
                                  f"a LoRA factor is {want}")
        if info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{self.weights_path}: module {module!r}: {what} is {info.dtype}; LoRA factors "
                                  f"are floating point (fp16, bf16, fp32, fp64)")
        if 0 in info.shape:
            raise CheckpointError(f"{self.weights_path}: module {module!r}: {what} has an empty dimension "
                                  f"{tuple(info.shape)}")
        return info

    def _module(self, module: str, parts: dict[str, str], matcher: PatternMatcher) -> LoraModule:
        embedding = "embedding_A" in parts or "embedding_B" in parts
        a_key, b_key = (parts.get("embedding_A"), parts.get("embedding_B")) if embedding else (
            parts.get("A"), parts.get("B"))
        if a_key is None or b_key is None or (embedding and ("A" in parts or "B" in parts)):
            raise CheckpointError(f"{self.weights_path}: module {module!r} has only one of its two LoRA factors "
                                  f"(or lora_ and lora_embedding_ factors mixed): {sorted(parts.values())}")
        why = matcher.why_not_adapted(module)
        if why is not None:
            raise CheckpointError(f"{self.config_path}: the adapter has factors for {module!r} but peft would not "
                                  f"adapt it ({why}), so would not apply them; fix target_modules / "
                                  f"exclude_modules / layers_to_transform")
        a_name = "lora_embedding_A" if embedding else "lora_A"
        b_name = "lora_embedding_B" if embedding else "lora_B"
        a = self._factor_info(module, a_key, a_name, (2,) if embedding else (2, 3, 4, 5))
        conv = len(a.shape) > 2
        b = self._factor_info(module, b_key, b_name, (len(a.shape),))
        rank = a.shape[0]
        if b.shape[1] != rank or (conv and any(d != 1 for d in b.shape[2:])):
            raise CheckpointError(f"{self.weights_path}: module {module!r}: {a_name} {tuple(a.shape)} and {b_name} "
                                  f"{tuple(b.shape)} do not multiply (want A (r, in...) and B (out, r"
                                  f"{', 1' * (len(b.shape) - 2)}))")
        r = matcher.pattern_value("rank_pattern", module, self.settings.r)
        alpha = matcher.pattern_value("alpha_pattern", module, self.settings.lora_alpha)
        if r != rank:
            raise CheckpointError(f"{self.weights_path}: module {module!r} has rank {rank} but {ADAPTER_CONFIG} "
                                  f"says r={r} (r / rank_pattern)")
        scale = alpha / math.sqrt(r) if self.settings.use_rslora else alpha / r
        # without a base, the layer class is unknown: peft's flag stands for it (Conv1D: fan_in_fan_out true);
        # with a base, LoraMergedReader lays each module out by the base's own shape (as peft, by the layer)
        transposed = embedding or (self.settings.fan_in_fan_out and not conv)
        if conv:
            shape: tuple[int, ...] = (b.shape[0], *a.shape[1:])
        else:
            shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        kind = "embedding" if embedding else "conv" if conv else "linear"
        return LoraModule(f"{module}.weight", module, a_key, b_key, kind, transposed, rank, float(alpha),
                          float(scale), shape, b.dtype)

    def lay_out(self, base: CheckpointReader) -> None:
        """Lay each linear module's update out as its layer in ``base`` holds its weight, as peft does: an
        ``nn.Linear`` gets ``B @ A`` and a transformers ``Conv1D`` ``(B @ A).T``, whatever ``fan_in_fan_out``
        says (peft overrides the flag by the layer class). A square module is laid out like the adapter's
        other modules, else by the base's ``model_type``; one line when nothing tells."""
        decided: dict[str, bool] = {}
        square: list[str] = []
        for key, module in self.modules.items():
            if module.kind != "linear" or key not in base:
                continue
            have = tuple(base.info(key).shape)
            straight = module.straight
            if straight[0] == straight[1]:
                square.append(key)
            elif have == straight:
                decided[key] = False
            elif have == straight[::-1]:
                decided[key] = True
        if square:
            votes = set(decided.values())
            if len(votes) == 1:
                guess: bool | None = votes.pop()
            else:
                guess = _conv1d_model(base)
            if guess is None and self.settings.fan_in_fan_out:
                raise CheckpointError(
                    f"{self.config_path}: fan_in_fan_out is true and {square[0]!r} is square, so its base weight "
                    f"cannot tell a transformers Conv1D (B @ A transposed) from an nn.Linear layer; give --base as "
                    f"the model's Hugging Face folder (its config.json names the architecture)")
            decided.update({key: bool(guess) for key in square})
        for key, transposed in decided.items():
            self.modules[key] = self.modules[key].laid_out(transposed)
        self._cache = None

    def left_right(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` in float32 with ``dW = scale * left @ right`` (reshaped); cached for the last key,
        so the engine's consecutive chunk reads of one tensor read the factors once."""
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        module = self.modules[key]
        b, a = self.factors_of(key)
        left, right = (a.T, b.T) if module.transposed else (b, a)
        self._cache = (key, left, right)
        return left, right

    def factors_of(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of ``key`` as peft multiplies them (B (out, r), A (r, in...) flattened), float32."""
        module = self.modules[key]
        a = self.factors.get(module.a_key).float().reshape(module.rank, -1)
        b = self.factors.get(module.b_key).float().reshape(-1, module.rank)
        return b, a

    def delta_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened update of ``key``, float32, computing only those
        elements (a range inside one row computes that part of the row, not the whole row)."""
        module = self.modules[key]
        if stop <= start:
            return torch.zeros(0)
        left, right = self.left_right(key)
        cols = module.cols
        first, last = start // cols, (stop - 1) // cols
        if first == last:
            return _rank_sum(left[first : first + 1], right[:, start - first * cols : stop - first * cols],
                             module.scale).reshape(-1)
        pieces = [_rank_sum(left[first : first + 1], right[:, start - first * cols :], module.scale).reshape(-1)]
        if last > first + 1:
            pieces.append(_rank_sum(left[first + 1 : last], right, module.scale).reshape(-1))
        pieces.append(_rank_sum(left[last : last + 1], right[:, : stop - last * cols], module.scale).reshape(-1))
        return torch.cat(pieces)

    def delta(self, key: str) -> torch.Tensor:
        """The whole update of ``key``, float32, shaped like the base weight."""
        module = self.modules[key]
        return self.delta_flat(key, 0, math.prod(module.shape)).reshape(module.shape)

    def close(self) -> None:
        self.factors.close()


def _rank_sum(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * left @ right`` as a sum of rank-1 terms in a fixed order rather than a matmul: BLAS blocks a
    product differently for different shapes, and a tensor read in chunks must equal it read whole, bit for bit."""
    block = torch.zeros(left.shape[0], right.shape[1])
    for k in range(left.shape[1]):
        block.addcmul_(left[:, k : k + 1], right[k : k + 1])
    return block.mul_(scale)  # peft's order: (B @ A) * scaling


def _conv1d_model(base: CheckpointReader) -> bool | None:
    """True / False when the base's Hugging Face ``config.json`` names an architecture whose block layers are
    all Conv1D / all nn.Linear; None when there is no config or the architecture mixes both."""

    path = getattr(base, "path", None)
    folder = hf_folder_of(Path(path)) if path is not None else None
    if folder is None:
        return None
    try:
        with open(folder / "config.json", "rb") as handle:
            config = json.loads(handle.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or model_type in MIXED_MODEL_TYPES:
        return None
    return model_type in CONV1D_MODEL_TYPES


# --------------------------------------------------------------------------------------------- readers


class LoraDeltaReader(CheckpointReader):
    """The adapter's updates ``dW = s * B @ A``, keyed by the base model's weight names, in the factors' dtype.

    Any merge method applies to them unchanged (a uniform soup of updates, TIES on updates...). Adapters that
    also save full weights (``modules_to_save``) need the base to turn those into updates: ``open_adapter(path,
    base=...)`` or ``LoraDeltaReader(adapter, base)``.
    """

    #: what ``soupkit inspect`` calls the format
    format_name = "peft lora adapter: updates"

    def __init__(self, adapter: LoraAdapter, base: CheckpointReader | None = None):
        self.adapter = adapter
        self.name = adapter.name
        self.path = adapter.weights_path
        self._base = base
        if adapter.full and base is None:
            first = next(iter(adapter.full))
            raise CheckpointError(f"{adapter.name}: a LoRA adapter that also saves full weights "
                                  f"(modules_to_save: {first!r}); its updates need the base model: --base BASE")
        self._infos = {key: TensorInfo(key, m.shape, m.dtype) for key, m in adapter.modules.items()}
        for key in adapter.full:
            info = adapter.factors.info(adapter.full[key])
            self._infos[key] = TensorInfo(key, info.shape, info.dtype)

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def get(self, key: str) -> torch.Tensor:
        return self.read_flat(key, 0, self._infos[key].numel).reshape(self._infos[key].shape)

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        if key in self.adapter.full:
            assert self._base is not None
            saved = self.adapter.factors.read_flat(self.adapter.full[key], start, stop).float()
            return (saved - self._base.read_flat(key, start, stop).float()).to(self._infos[key].dtype)
        return self.adapter.delta_flat(key, start, stop).to(self._infos[key].dtype)

    @property
    def metadata(self) -> dict[str, str]:
        return {"soupkit.lora": json.dumps({"adapter": self.adapter.name, "r": self.adapter.config["r"]})}

    @property
    def file_size(self) -> int | None:
        return self.adapter.factors.file_size

    @property
    def files(self) -> list[Path]:
        return [self.adapter.config_path, self.adapter.weights_path]

    def close(self) -> None:
        self.adapter.close()


class LoraMergedReader(CheckpointReader):
    """The adapted model's full weights: the base's tensors, with ``W + dW`` where the adapter updates ``W``
    (computed in float32, returned in the base's dtype) and the adapter's ``modules_to_save`` weights."""

    format_name = "peft lora adapter + base"

    def __init__(self, adapter: LoraAdapter, base: CheckpointReader):
        self.adapter = adapter
        self.base = base
        self.name = adapter.name
        self.path = adapter.weights_path
        changed = [*adapter.modules, *adapter.full]
        if not any(key in base for key in changed):
            raise IncompatibleCheckpointsError(
                f"{adapter.name}: none of the {len(changed)} weights the adapter changes (e.g. {changed[0]!r}) is "
                f"in the base {base.name}; is it the adapter's base model?")
        for key in changed:
            if key not in base:
                raise IncompatibleCheckpointsError(
                    f"{adapter.name}: the adapter changes {key!r}, which the base {base.name} lacks; is it the "
                    f"adapter's base model?")
        adapter.lay_out(base)
        for key in changed:
            want = adapter.modules[key].shape if key in adapter.modules else adapter.factors.info(
                adapter.full[key]).shape
            if tuple(base.info(key).shape) != tuple(want):
                raise IncompatibleCheckpointsError(
                    f"{adapter.name}: the update of {key!r} has shape {tuple(want)} but the base {base.name} has "
                    f"{tuple(base.info(key).shape)}")
            if not base.info(key).dtype.is_floating_point:
                raise IncompatibleCheckpointsError(
                    f"{adapter.name}: the adapter changes {key!r}, which is {base.info(key).dtype} in the base "
                    f"{base.name}; only floating weights take an update")
        ties = base.tied_keys()
        self._delta_of = {key: key for key in adapter.modules}
        # a key tied to an adapted one (lm_head to embed_tokens) is that same tensor: it gets the update too
        self._delta_of.update({alias: canon for alias, canon in ties.items() if canon in adapter.modules})

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.base

    def info(self, key: str) -> TensorInfo:
        return self.base.info(key)

    def get(self, key: str) -> torch.Tensor:
        info = self.base.info(key)
        return self.read_flat(key, 0, info.numel).reshape(info.shape)

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        if key in self.adapter.full:
            return self.adapter.factors.read_flat(self.adapter.full[key], start, stop).to(self.info(key).dtype)
        weight = self.base.read_flat(key, start, stop)
        source = self._delta_of.get(key)
        if source is None:
            return weight
        return (weight.float() + self.adapter.delta_flat(source, start, stop)).to(weight.dtype)

    def tied_keys(self) -> dict[str, str]:
        return self.base.tied_keys()

    @property
    def metadata(self) -> dict[str, str]:
        return self.base.metadata

    @property
    def file_size(self) -> int | None:
        return (self.base.file_size or 0) + (self.adapter.factors.file_size or 0)

    @property
    def files(self) -> list[Path]:
        from soupkit.io import input_files  # cycle: soupkit.io re-exports this module

        return [*input_files(self.base), self.adapter.config_path, self.adapter.weights_path]

    def close(self) -> None:
        self.adapter.close()
        self.base.close()


def check_adapter_mix(readers: Sequence[CheckpointReader]) -> None:
    """Refuse LoRA updates merged with full models (a mean of a weight and an update means nothing): one line
    naming the adapter and a full model, and the fix (``--base``); and one adapter given twice (by any spelling:
    its folder and its weights file). Call it before ``check_compatible``."""
    adapters = [r.adapter for r in readers if isinstance(r, (LoraDeltaReader, LoraMergedReader))]
    for end in range(2, len(adapters) + 1):
        _refuse_twice(adapters[:end])
    deltas = [r for r in readers if isinstance(r, LoraDeltaReader)]
    full = [r for r in readers if not isinstance(r, LoraDeltaReader)]
    if deltas and full:
        raise IncompatibleCheckpointsError(
            f"{deltas[0].name} is a LoRA adapter (its tensors are weight updates) merged with full models "
            f"({full[0].name}); give its base model: --base BASE (base=...) to merge the adapted models")


def open_adapter(path: str | Path, base: Any = None, **base_options: Any) -> CheckpointReader:
    """Open a PEFT LoRA adapter: its updates ``dW`` keyed by base weight names, or, given ``base`` (a path,
    state dict or reader of the base model), the adapted model's full weights ``W + dW``. ``base_options`` go
    to ``open_checkpoint`` for the base (``ema``, ``strip_prefix``...)."""
    from soupkit.io import open_checkpoint  # cycle: soupkit.io re-exports this module

    adapter = LoraAdapter.open(path)
    try:
        if base is None:
            return LoraDeltaReader(adapter)
        base_reader = open_checkpoint(base, name="<base state dict>", **base_options)
        try:
            return LoraMergedReader(adapter, base_reader)
        except BaseException:
            if base_reader is not base:
                base_reader.close()
            raise
    except BaseException:
        adapter.close()
        raise


# --------------------------------------------------------------------------------------------- writing


@dataclass
class AdapterResult:
    """What ``merge_adapters`` / ``save_adapter`` wrote: the folder, the ranks, and for a re-factorisation the
    relative reconstruction error ``||dW - B A|| / ||dW||`` over all modules and per module."""

    folder: Path
    ranks: dict[str, int]
    relative_error: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)


def refactor_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of an update: ``(B, A, relative_error)`` with ``B @ A`` the best rank-``rank``
    approximation of ``delta`` reshaped to (rows, cols) (Eckart-Young), B (rows, R) and A (R, cols), float32,
    R = min(rank, rows, cols). Computed in float64 so the error reported is the truncation's, not rounding's."""
    _check_rank_value(rank)
    matrix = delta.detach().double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    del matrix
    keep = min(rank, s.numel())
    b, a = u[:, :keep] * s[:keep], vh[:keep]
    total = float(s.square().sum())
    error = math.sqrt(float(s[keep:].square().sum()) / total) if total else 0.0
    return b.float(), a.float(), error


def reduce_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-``rank`` approximation of ``b @ a`` (b (rows, k), a (k, cols)) from the factors alone,
    never forming the rows x cols product: QR of ``b`` and of ``a.T``, then an SVD of the k x k core
    ``R_b R_a^T`` (``b @ a = Q_b (R_b R_a^T) Q_a^T``, so its singular values are the product's). Returns ``(B, A,
    relative_error, energy)``, float32 factors of rank min(rank, k, rows, cols), energy ``||b @ a||_F^2``.
    Memory: O((rows + cols) k) in float64, where the product would take rows x cols."""
    _check_rank_value(rank)
    qb, rb = torch.linalg.qr(b.detach().double())
    qa, ra = torch.linalg.qr(a.detach().double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    keep = min(rank, s.numel())
    new_b = qb @ (u[:, :keep] * s[:keep])
    new_a = vh[:keep] @ qa.T
    energy = float(s.square().sum())
    error = math.sqrt(float(s[keep:].square().sum()) / energy) if energy else 0.0
    return new_b.float(), new_a.float(), error, energy


def _check_rank_value(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ParameterError(f"--rank must be a positive integer, got {rank!r}")


def check_rank(rank: int | None, adapters: Sequence[LoraAdapter]) -> None:
    """``--rank R`` against the adapters: a positive integer, and no larger than the full rank (the shorter side)
    of the largest adapted module; a rank above that asks for factors bigger than the update they stand for."""
    if rank is None:
        return
    _check_rank_value(rank)
    full = max(min(m.rows, m.cols) for a in adapters for m in a.modules.values())
    if rank > full:
        raise ParameterError(f"--rank {rank} is above the full rank of every adapted module (the largest, "
                             f"min(rows, cols), is {full}); give --rank {full} or less")


#: a merge without --base by a method that is not linear in the updates (TIES, DARE...) needs every module's
#: dense update d x k in memory, where the adapters hold only (d + k) x r; it is refused above the larger of
#: DENSE_FLOOR_BYTES and DENSE_RATIO x the largest input tensor, so that memory stays a small constant times
#: the inputs (the merge engine and the SVD take ~4x the dense updates). 64 MiB: one 4096 x 4096 fp32 update.
DENSE_FLOOR_BYTES = 64 << 20
DENSE_RATIO = 16


def check_dense_merge(sources: Sequence[Any], method: str, *, rank: int | None = None,
                      output: str | Path | None = None) -> None:
    """Before any work: refuse, in one line naming the size, a merge of adapters that would build dense updates
    (``method`` is not linear in them) bigger than the bound above (the fix is ``--base``: full weights,
    streamed, where the base holds tensors of that size anyway; or a method linear in the updates, reduced from
    the factors); and check ``rank`` and ``output`` as ``save_adapter`` will."""
    if output is not None:
        check_adapter_output(output)
    opened = _open_all([s for s in sources if isinstance(s, (str, Path, LoraAdapter))])
    try:
        check_rank(rank, opened)
        modules = {key: m for a in opened for key, m in a.modules.items()}
        dense = sum(4 * math.prod(m.shape) for m in modules.values())
        largest = max(a.factors.info(k).nbytes for a in opened for k in a.factors.keys())
        bound = max(DENSE_FLOOR_BYTES, DENSE_RATIO * largest)
        if dense > bound:
            big = max(modules.values(), key=lambda m: math.prod(m.shape))
            raise ParameterError(
                f"{method} over LoRA adapters without --base needs their dense updates, {_mib(dense)} (e.g. "
                f"{big.key!r}: {big.rows} x {big.cols}) from factors of at most {_mib(largest)}, above the bound "
                f"{_mib(bound)}; give --base BASE to merge the full weights streamed, or use a method linear in "
                f"the updates (uniform, linear, task_arithmetic) whose --rank works from the factors")
    finally:
        for adapter, source in zip(opened, [s for s in sources if isinstance(s, (str, Path, LoraAdapter))]):
            if adapter is not source:
                adapter.close()


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def _factor_tensors(module: LoraModule, b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype,
                    adapter_key_prefix: str) -> dict[str, torch.Tensor]:
    """peft's stored factors for the update ``b @ a`` (scale 1) as peft multiplies them (B (out, R), A (R, in),
    before the transpose peft applies to Conv1D and embedding layers), named as peft names them."""
    rank = a.shape[0]
    if module.kind == "conv":
        a = a.reshape(rank, *module.shape[1:])
        b = b.reshape(module.shape[0], rank, *([1] * (len(module.shape) - 2)))
    stem = adapter_key_prefix + module.module
    names = ("lora_embedding_A", "lora_embedding_B") if module.kind == "embedding" else (
        "lora_A.weight", "lora_B.weight")
    return {f"{stem}.{names[0]}": a.contiguous().to(dtype), f"{stem}.{names[1]}": b.contiguous().to(dtype)}


def _adapter_config(template: Mapping[str, Any], ranks: Mapping[str, int],
                    modules: Iterable[LoraModule]) -> dict[str, Any]:
    """The template's config with every written module at scale 1 (alpha = r) and targeted by its exact name
    (so peft adapts those modules and no other). The global r is the most common rank; the others go to
    rank_pattern / alpha_pattern under the module's escaped full name (peft matches ``(.*\\.)?pattern$``)."""
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    common = max(counts, key=lambda r: (counts[r], r))
    names = {m.key: m.module for m in modules}
    pattern = {re.escape(names[key]): rank for key, rank in ranks.items() if rank != common}
    config = {k: v for k, v in template.items() if k in FIELDS}  # never an unknown field (they are all off)
    config.update(r=common, lora_alpha=common, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
                  target_modules=[names[key] for key in ranks], layers_to_transform=None, layers_pattern=None,
                  exclude_modules=None)
    config.pop("runtime_config", None)  # peft does not save it either
    return config


#: suffixes of checkpoint files: an adapter (a folder) is never written under such a name
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".json", ".index.json")


def _write_adapter(output: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   metadata: Mapping[str, str], *, template: Path, protect: Sequence[Path], force: bool) -> Path:
    """An adapter folder (``adapter_model.safetensors`` + ``adapter_config.json`` + the small files of the
    ``template`` adapter folder, e.g. its tokenizer), published atomically."""
    from soupkit.io import CheckpointSink, OutputSet, plan_of  # cycle: soupkit.io re-exports this module

    folder = Path(output)
    check_adapter_output(folder)
    planned = FolderOutput(folder, template, adapter=True)
    planned.check(protect, force=force)
    config_path = folder / ADAPTER_CONFIG
    check_derived_output(config_path, inputs=protect, force=force)
    with OutputSet(replace=force) as files:
        files.watch(protect)
        files.folder(folder)  # built beside its name, published by one rename
        sink = CheckpointSink(planned.weights, plan_of(tensors), {"format": "pt", **metadata}, files)
        for key, tensor in tensors.items():
            sink.write(key, tensor.reshape(-1))
        sink.finish()
        files.open(config_path).write(json.dumps(dict(config), indent=2, sort_keys=True).encode() + b"\n")
        planned.add_files(files)
    return folder


def check_adapter_output(output: str | Path) -> None:
    """An adapter is a folder: refuse an output path that is a file, or named like a checkpoint file
    (``-o soup.safetensors`` would otherwise become a directory of that name)."""
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: an adapter is written as a folder; this path is a file")
    if folder.name.lower().endswith(_FILE_SUFFIXES) and not folder.is_dir():
        raise OutputError(f"{folder}: a soup of LoRA adapters is written as an adapter folder (adapter_config.json "
                          f"+ adapter_model.safetensors), not as a {folder.suffix} file; give a folder name "
                          f"(e.g. {folder.with_suffix('')}/), or --base BASE for the full weights in {folder.name}")


def _open_all(adapters: Sequence[str | Path | LoraAdapter]) -> list[LoraAdapter]:
    """Open every adapter, refusing one given twice (the same weights file, by any spelling)."""
    opened: list[LoraAdapter] = []
    try:
        for adapter in adapters:
            opened.append(adapter if isinstance(adapter, LoraAdapter) else LoraAdapter.open(adapter))
            _refuse_twice(opened)
    except BaseException:
        for adapter, source in zip(opened, adapters):
            if adapter is not source:
                adapter.close()
        raise
    return opened


def _refuse_twice(adapters: Sequence[LoraAdapter]) -> None:
    last = adapters[-1]
    for number, other in enumerate(adapters[:-1]):
        if _same_file(other.weights_path, last.weights_path):
            raise ParameterError(f"{last.name}: the same adapter given twice (inputs #{number + 1} and "
                                 f"#{len(adapters)}); weight it instead with --weights")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ParameterError(f"--weights: {len(values)} value(s) for {count} adapter(s)")
    if not all(math.isfinite(w) for w in values):
        raise ParameterError(f"--weights must be finite numbers, got {values}")
    return values


def _layouts(adapters: Sequence[LoraAdapter]) -> dict[str, list[tuple[LoraAdapter, int]]]:
    """Module key -> the (adapter, position) pairs holding it, after checking they agree on its layout."""
    holders: dict[str, list[tuple[LoraAdapter, int]]] = {}
    for position, adapter in enumerate(adapters):
        for key, module in adapter.modules.items():
            first = holders.setdefault(key, [(adapter, position)])[0][0].modules[key]
            if (first.straight, first.kind) != (module.straight, module.kind) or (
                    first.kind == "conv" and first.shape != module.shape):
                raise IncompatibleCheckpointsError(
                    f"{key!r}: {first_name(holders[key])} updates it as {first.kind} {first.shape}, {adapter.name} "
                    f"as {module.kind} {module.shape}; are they adapters of the same base model?")
            if holders[key][0][0] is not adapter:
                holders[key].append((adapter, position))
    return holders


def first_name(holders: Sequence[tuple[LoraAdapter, int]]) -> str:
    return holders[0][0].name


def merge_adapters(adapters: Sequence[str | Path | LoraAdapter], weights: Sequence[float] | None, output: str | Path,
                   *, rank: int | None = None, force: bool = False,
                   metadata: Mapping[str, str] | None = None) -> AdapterResult:
    """Write an adapter whose update is ``sum_i weights[i] * dW_i`` (default weights: the mean).

    ``rank=None``: exact, by rank concatenation (peft's ``cat``): ``A = [A_1; A_2; ...]``, ``B = [w_1 s_1 B_1,
    w_2 s_2 B_2, ...]``, so each module's rank is the sum of the ranks that adapt it and its scale 1.
    ``rank=R``: each summed update reduced to rank R from those factors (``reduce_factors``: never the dense
    update; ``relative_error`` reports the loss). Full weights (``modules_to_save``) are summed with the same
    weights. Modules adapted by only some adapters are summed over those. Returns what was written.
    """
    check_adapter_output(output)
    opened = _open_all(adapters)
    try:
        values = _check_weights(weights, len(opened))
        check_rank(rank, opened)
        holders = _layouts(opened)
        protect = [p for a in opened for p in (a.config_path, a.weights_path)]
        modules = [holders[key][0][0].modules[key] for key in holders]
        dtype = opened[0].modules[next(iter(opened[0].modules))].dtype
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        errors: dict[str, float] = {}
        num = den = 0.0
        for module in modules:
            # factors as peft multiplies them (B @ A, before any Conv1D / embedding transpose): the same for
            # every adapter of this module whatever its fan_in_fan_out says, so they concatenate
            pairs = [(a.factors_of(module.key), values[i] * a.modules[module.key].scale)
                     for a, i in holders[module.key]]
            b = torch.cat([ba[0] * w for ba, w in pairs], dim=1)
            a = torch.cat([ba[1] for ba, _ in pairs], dim=0)
            if rank is not None:
                b, a, errors[module.key], energy = reduce_factors(b, a, rank)
                num, den = num + errors[module.key] ** 2 * energy, den + energy
            ranks[module.key] = a.shape[0]
            tensors.update(_factor_tensors(module, b, a, dtype, _PEFT_PREFIX))
        tensors.update(_summed_full_weights(opened, values))
        config = _adapter_config(opened[0].config, ranks, modules)
        meta = _provenance(opened, values, rank, metadata)
        folder = _write_adapter(output, tensors, config, meta, template=opened[0].config_path.parent,
                                protect=protect, force=force)
        return AdapterResult(folder, ranks, math.sqrt(num / den) if den else 0.0, errors)
    finally:
        for adapter, source in zip(opened, adapters):
            if adapter is not source:
                adapter.close()


def merge_adapters_exact(adapters: Sequence[str | Path | LoraAdapter], weights: Sequence[float] | None,
                         output: str | Path, **options: Any) -> AdapterResult:
    """``merge_adapters`` without re-factorisation: the exact weighted sum of updates, ranks concatenated."""
    return merge_adapters(adapters, weights, output, rank=None, **options)


def _summed_full_weights(adapters: Sequence[LoraAdapter], values: Sequence[float]) -> dict[str, torch.Tensor]:
    keys = list(dict.fromkeys(k for a in adapters for k in a.full))
    summed = {}
    for key in keys:
        lacking = [a.name for a in adapters if key not in a.full]
        if lacking:
            raise IncompatibleCheckpointsError(f"{lacking[0]}: lacks the full weight {key!r} (modules_to_save / "
                                               f"bias) that {next(a.name for a in adapters if key in a.full)} saves")
        shapes = {tuple(a.factors.info(a.full[key]).shape) for a in adapters}
        if len(shapes) > 1:
            raise IncompatibleCheckpointsError(f"{key!r}: the adapters save it with different shapes {sorted(shapes)}")
        total = sum(w * a.factors.get(a.full[key]).double() for a, w in zip(adapters, values))
        summed[adapters[0].full[key]] = total.to(adapters[0].factors.info(adapters[0].full[key]).dtype)
    return summed


def _provenance(adapters: Sequence[LoraAdapter], values: Sequence[float], rank: int | None,
                metadata: Mapping[str, str] | None) -> dict[str, str]:

    ingredients = [ingredient_record(a.name, a.weights_path, a.factors.nbytes) for a in adapters]
    params = {"weights": list(values), "rank": rank, "combination": "cat" if rank is None else "svd"}
    return provenance_metadata("linear", params, ingredients, dict(metadata or {}))


def save_adapter(deltas: Mapping[str, torch.Tensor] | CheckpointReader,
                 adapters: Sequence[str | Path | LoraAdapter] | str | Path | LoraAdapter, output: str | Path,
                 rank: int, *, force: bool = False, metadata: Mapping[str, str] | None = None) -> AdapterResult:
    """Write merged updates (any method's output over ``LoraDeltaReader``s: TIES, DARE...) as a rank-``rank``
    adapter, each update re-factorised by truncated SVD. ``adapters`` are the input adapters: they give each
    module's layout (the first holding it), and the first gives the config's other fields. Keys no adapter
    adapts are refused (they are not LoRA updates)."""
    check_adapter_output(output)
    sources = [adapters] if isinstance(adapters, (str, Path, LoraAdapter)) else list(adapters)
    opened = _open_all(sources)
    try:
        check_rank(rank, opened)
        layouts = {key: a.modules[key] for a in reversed(opened) for key in a.modules}
        for adapter in opened:
            for key, module in adapter.modules.items():
                if module.transposed != layouts[key].transposed:
                    raise IncompatibleCheckpointsError(
                        f"{adapter.name}: lays out the update of {key!r} transposed from {opened[0].name}'s "
                        f"(fan_in_fan_out differs); give --base BASE so each is laid out by the base's layer")
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        errors: dict[str, float] = {}
        num = den = 0.0
        for key in deltas.keys():
            module = layouts.get(key)
            if module is None:
                raise ParameterError(f"{key!r} is not a LoRA-adapted module of {opened[0].name}; an adapter "
                                     f"output holds updates of adapted modules only (use --base for full weights)")
            delta = deltas.get(key) if isinstance(deltas, CheckpointReader) else deltas[key]
            if tuple(delta.shape) != tuple(module.shape):
                raise IncompatibleCheckpointsError(f"{key!r}: the merged update has shape {tuple(delta.shape)}, "
                                                   f"the adapters' {tuple(module.shape)}")
            left, right, errors[key] = refactor_lora(delta, rank)
            energy = float(delta.double().square().sum())
            num, den = num + errors[key] ** 2 * energy, den + energy
            ranks[key] = right.shape[0]
            b, a = (right.T, left.T) if module.transposed else (left, right)  # back to peft's B @ A
            tensors.update(_factor_tensors(module, b, a, module.dtype, _PEFT_PREFIX))
        config = _adapter_config(opened[0].config, ranks, layouts.values())
        protect = [p for a in opened for p in (a.config_path, a.weights_path)]
        folder = _write_adapter(output, tensors, config, {"format": "pt", **(metadata or {})},
                                template=opened[0].config_path.parent, protect=protect, force=force)
        return AdapterResult(folder, ranks, math.sqrt(num / den) if den else 0.0, errors)
    finally:
        for adapter, source in zip(opened, sources):
            if adapter is not source:
                adapter.close()
