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
  rank R by truncated SVD (``rank=R``; the relative reconstruction error is reported).
- ``save_adapter(deltas, template, output, rank)`` -> an adapter folder for any merged updates (TIES, DARE...).

Updates are computed lazily, per key and per flat range (only the rows asked for), so memory stays bounded by
one tensor whatever the adapter's size. Linear, Conv1D (``fan_in_fan_out``), embedding and convolution LoRA are
supported; DoRA, LoRA biases and non-LoRA peft types are refused in one line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import CheckpointError, IncompatibleCheckpointsError, OutputError, ParameterError
from soupkit.io.atomic import check_derived_output
from soupkit.io.base import CheckpointReader, TensorInfo
from soupkit.io.hf_folder import FolderOutput
from soupkit.io.provenance import ingredient_record, provenance_metadata
from soupkit.io.small_files import read_json_file

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterResult", "LoraAdapter", "LoraDeltaReader", "LoraMergedReader",
    "check_adapter_mix", "find_adapter", "is_adapter", "merge_adapters", "merge_adapters_exact",
    "open_adapter", "refactor_lora", "save_adapter",
]  # fmt: skip

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
_REFUSED_FLAGS = {"use_dora": "DoRA", "lora_bias": "LoRA biases (lora_bias)", "use_qalora": "QA-LoRA"}


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


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are, its scale, and how ``dW = s * left @ right`` is laid out.

    ``left`` is (rows, r) and ``right`` (r, cols) with ``dW.reshape(rows, cols)``: ``B`` and ``A`` for linear
    and convolution layers, ``A.T`` and ``B.T`` where peft transposes (Conv1D ``fan_in_fan_out``, embeddings).
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


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern ``p`` with ``(.*\\.)?p$`` matching the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _read_config(config_path: Path) -> dict[str, Any]:

    config = read_json_file(config_path.parent, config_path.name)  # a regular file inside the folder, bounded
    if config is None:
        raise CheckpointError(f"{config_path}: cannot read: No such file or directory")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{config_path}: a {peft_type} adapter; soupkit merges LoRA adapters only")
    for flag, what in _REFUSED_FLAGS.items():
        if config.get(flag):
            raise CheckpointError(f"{config_path}: {what} adapters are not supported ({flag}: true); merge the "
                                  f"adapter into its base with peft first")
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{config_path}: 'r' must be a positive integer and 'lora_alpha' a number "
                              f"(got r={r!r}, lora_alpha={alpha!r})")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise CheckpointError(f"{config_path}: {name!r} must be a mapping of module pattern -> value")
    return config


def _module_name(adapter_key: str) -> str:
    return adapter_key[len(_PEFT_PREFIX):] if adapter_key.startswith(_PEFT_PREFIX) else adapter_key


# --------------------------------------------------------------------------------------------- the adapter


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter on disk: its config, its factor file (read lazily) and its adapted modules."""

    config_path: Path
    weights_path: Path
    config: dict[str, Any]
    factors: CheckpointReader
    modules: dict[str, LoraModule] = field(default_factory=dict)
    #: full weights peft saves for ``modules_to_save`` (a classifier head): base name -> adapter key
    full: dict[str, str] = field(default_factory=dict)
    _cache: tuple[str, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        """Parse the adapter at ``path`` (folder, weights file or config); raises ``CheckpointError``."""
        from soupkit.io import open_file

        found = find_adapter(path)
        if found is None:
            raise CheckpointError(f"{path}: not a PEFT adapter (no {ADAPTER_CONFIG} beside it)")
        config_path, weights_path = found
        config = _read_config(config_path)
        factors = open_file(weights_path)
        adapter = cls(config_path, weights_path, config, factors)
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
            pairs.setdefault(match["module"], {})[part] = key
        for module_key, parts in pairs.items():
            module = self._module(_module_name(module_key), parts)
            self.modules[module.key] = module
        if not self.modules:
            raise CheckpointError(f"{self.weights_path}: no lora_A/lora_B factors in this adapter")

    def _full_weight(self, key: str) -> None:
        name = _module_name(key)
        saved = self.config.get("modules_to_save") or []
        if not any(name == f"{m}.{name.rsplit('.', 1)[-1]}" or f".{m}." in f".{name}" for m in saved):
            raise CheckpointError(f"{self.weights_path}: tensor {key!r} is neither a LoRA factor nor a weight of "
                                  f"modules_to_save {saved}; soupkit cannot merge it")
        self.full[name.replace(".modules_to_save.", ".")] = key

    def _module(self, module: str, parts: dict[str, str]) -> LoraModule:
        embedding = "embedding_A" in parts or "embedding_B" in parts
        a_key, b_key = (parts.get("embedding_A"), parts.get("embedding_B")) if embedding else (
            parts.get("A"), parts.get("B"))
        if a_key is None or b_key is None:
            raise CheckpointError(f"{self.weights_path}: module {module!r} has only one of its two LoRA factors")
        a, b = self.factors.info(a_key), self.factors.info(b_key)
        rank = a.shape[0]
        conv = len(a.shape) > 2
        if len(b.shape) < 2 or b.shape[1] != rank or (conv and any(d != 1 for d in b.shape[2:])):
            raise CheckpointError(f"{self.weights_path}: module {module!r}: lora_A {tuple(a.shape)} and lora_B "
                                  f"{tuple(b.shape)} do not multiply")
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", r))
        if r != rank:
            raise CheckpointError(f"{self.weights_path}: module {module!r} has rank {rank} but {ADAPTER_CONFIG} "
                                  f"says r={r} (rank_pattern)")
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        transposed = embedding or (bool(self.config.get("fan_in_fan_out")) and not conv)
        if conv:
            shape: tuple[int, ...] = (b.shape[0], *a.shape[1:])
        else:
            shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        kind = "embedding" if embedding else "conv" if conv else "linear"
        return LoraModule(f"{module}.weight", module, a_key, b_key, kind, transposed, rank, float(alpha),
                          float(scale), shape, b.dtype)

    def left_right(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` in float32 with ``dW = scale * left @ right`` (reshaped); cached for the last key,
        so the engine's consecutive chunk reads of one tensor read the factors once."""
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        module = self.modules[key]
        a = self.factors.get(module.a_key).float().reshape(module.rank, -1)
        b = self.factors.get(module.b_key).float().reshape(-1, module.rank)
        left, right = (a.T, b.T) if module.transposed else (b, a)
        self._cache = (key, left, right)
        return left, right

    def delta_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened update of ``key``, float32, computing only those rows."""
        module = self.modules[key]
        left, right = self.left_right(key)
        cols = module.cols
        first, last = start // cols, -(-stop // cols)
        # a sum of rank-1 terms in a fixed order rather than a matmul: BLAS blocks a product differently for
        # different row counts, and a tensor read in chunks must equal the tensor read whole, bit for bit
        rows = left[first:last]
        block = torch.zeros(rows.shape[0], cols)
        for k in range(module.rank):
            block.addcmul_(rows[:, k : k + 1], right[k : k + 1])
        block.mul_(module.scale)  # peft's order: (B @ A) * scaling
        return block.reshape(-1)[start - first * cols : stop - first * cols]

    def delta(self, key: str) -> torch.Tensor:
        """The whole update of ``key``, float32, shaped like the base weight."""
        module = self.modules[key]
        return self.delta_flat(key, 0, math.prod(module.shape)).reshape(module.shape)

    def close(self) -> None:
        self.factors.close()


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
        ties = base.tied_keys()
        self._delta_of = {key: key for key in adapter.modules}
        # a key tied to an adapted one (lm_head to embed_tokens) is that same tensor: it gets the update too
        self._delta_of.update({alias: canon for alias, canon in ties.items() if canon in adapter.modules})
        for key in [*adapter.modules, *adapter.full]:
            if key not in base:
                raise IncompatibleCheckpointsError(
                    f"{adapter.name}: the adapter changes {key!r}, which the base {base.name} lacks; is it the "
                    f"adapter's base model?")
            want = adapter.modules[key].shape if key in adapter.modules else adapter.factors.info(
                adapter.full[key]).shape
            if tuple(base.info(key).shape) != tuple(want):
                raise IncompatibleCheckpointsError(
                    f"{adapter.name}: the update of {key!r} has shape {tuple(want)} but the base {base.name} has "
                    f"{tuple(base.info(key).shape)}")

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
        from soupkit.io import input_files

        return [*input_files(self.base), self.adapter.config_path, self.adapter.weights_path]

    def close(self) -> None:
        self.adapter.close()
        self.base.close()


def check_adapter_mix(readers: Sequence[CheckpointReader]) -> None:
    """Refuse LoRA updates merged with full models (a mean of a weight and an update means nothing): one line
    naming the adapter and a full model, and the fix (``--base``). Call it before ``check_compatible``."""
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
    from soupkit.io import open_checkpoint

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
    if not isinstance(rank, int) or rank <= 0:
        raise ParameterError(f"--rank must be a positive integer, got {rank!r}")
    matrix = delta.detach().double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = min(rank, s.numel())
    b, a = u[:, :keep] * s[:keep], vh[:keep]
    total = float(s.square().sum())
    error = math.sqrt(float(s[keep:].square().sum()) / total) if total else 0.0
    return b.float(), a.float(), error


def _factor_tensors(module: LoraModule, b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype,
                    adapter_key_prefix: str) -> dict[str, torch.Tensor]:
    """peft's stored factors for ``dW.reshape(rows, cols) = b @ a`` (scale 1), named as peft names them."""
    rank = a.shape[0]
    if module.transposed:  # peft computes (B @ A).T: store A = b.T, B = a.T
        a, b = b.T, a.T
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
    config = dict(template)
    config.update(r=common, lora_alpha=common, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
                  target_modules=[names[key] for key in ranks], layers_to_transform=None, layers_pattern=None,
                  exclude_modules=None)
    return config


def _write_adapter(output: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   metadata: Mapping[str, str], *, template: Path, protect: Sequence[Path], force: bool) -> Path:
    """An adapter folder (``adapter_model.safetensors`` + ``adapter_config.json`` + the small files of the
    ``template`` adapter folder, e.g. its tokenizer), published atomically."""
    from soupkit.io import CheckpointSink, OutputSet, plan_of

    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: an adapter is written as a folder; this path is a file")
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


def _open_all(adapters: Sequence[str | Path | LoraAdapter]) -> list[LoraAdapter]:
    opened: list[LoraAdapter] = []
    try:
        for adapter in adapters:
            opened.append(adapter if isinstance(adapter, LoraAdapter) else LoraAdapter.open(adapter))
    except BaseException:
        for adapter in opened:
            adapter.close()
        raise
    return opened


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ParameterError(f"--weights: {len(values)} value(s) for {count} adapter(s)")
    return values


def _layouts(adapters: Sequence[LoraAdapter]) -> dict[str, list[tuple[LoraAdapter, int]]]:
    """Module key -> the (adapter, position) pairs holding it, after checking they agree on its layout."""
    holders: dict[str, list[tuple[LoraAdapter, int]]] = {}
    for position, adapter in enumerate(adapters):
        for key, module in adapter.modules.items():
            first = holders.setdefault(key, [(adapter, position)])[0][0].modules[key]
            if (first.shape, first.kind, first.transposed) != (module.shape, module.kind, module.transposed):
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
    ``rank=R``: each summed update re-factorised by truncated SVD to rank R (``relative_error`` reports the loss).
    Full weights (``modules_to_save``) are summed with the same weights. Modules adapted by only some adapters
    are summed over those. Returns what was written.
    """
    opened = _open_all(adapters)
    try:
        values = _check_weights(weights, len(opened))
        holders = _layouts(opened)
        protect = [p for a in opened for p in (a.config_path, a.weights_path)]
        modules = [holders[key][0][0].modules[key] for key in holders]
        dtype = opened[0].modules[next(iter(opened[0].modules))].dtype
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        errors: dict[str, float] = {}
        for module in modules:
            pairs = [(a.left_right(module.key), values[i] * a.modules[module.key].scale)
                     for a, i in holders[module.key]]
            left = torch.cat([lr[0] * w for lr, w in pairs], dim=1)
            right = torch.cat([lr[1] for lr, _ in pairs], dim=0)
            if rank is not None:
                left, right, errors[module.key] = refactor_lora(left @ right, rank)
            ranks[module.key] = right.shape[0]
            tensors.update(_factor_tensors(module, left, right, dtype, _PEFT_PREFIX))
        tensors.update(_summed_full_weights(opened, values))
        config = _adapter_config(opened[0].config, ranks, modules)
        meta = _provenance(opened, values, rank, metadata)
        folder = _write_adapter(output, tensors, config, meta, template=opened[0].config_path.parent,
                                protect=protect, force=force)
        return AdapterResult(folder, ranks, _overall_error(errors, opened, holders, values), errors)
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
            raise IncompatibleCheckpointsError(f"{lacking[0]}: lacks the full weight {key!r} (modules_to_save) "
                                               f"that {next(a.name for a in adapters if key in a.full)} saves")
        total = sum(w * a.factors.get(a.full[key]).double() for a, w in zip(adapters, values))
        summed[adapters[0].full[key]] = total.to(adapters[0].factors.info(adapters[0].full[key]).dtype)
    return summed


def _overall_error(errors: Mapping[str, float], adapters: Sequence[LoraAdapter],
                   holders: Mapping[str, list[tuple[LoraAdapter, int]]], values: Sequence[float]) -> float:
    """The whole adapter's relative error: per-module errors weighted by each summed update's energy."""
    if not errors:
        return 0.0
    num = den = 0.0
    for key, error in errors.items():
        energy = float(sum((values[i] * a.delta(key).double()) for a, i in holders[key]).square().sum())
        num, den = num + error * error * energy, den + energy
    return math.sqrt(num / den) if den else 0.0


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
    sources = [adapters] if isinstance(adapters, (str, Path, LoraAdapter)) else list(adapters)
    opened = _open_all(sources)
    try:
        layouts = {key: a.modules[key] for a in reversed(opened) for key in a.modules}
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
            left, right, errors[key] = refactor_lora(delta, rank)
            energy = float(delta.double().square().sum())
            num, den = num + errors[key] ** 2 * energy, den + energy
            ranks[key] = right.shape[0]
            tensors.update(_factor_tensors(module, left, right, module.dtype, _PEFT_PREFIX))
        config = _adapter_config(opened[0].config, ranks, layouts.values())
        protect = [p for a in opened for p in (a.config_path, a.weights_path)]
        folder = _write_adapter(output, tensors, config, {"format": "pt", **(metadata or {})},
                                template=opened[0].config_path.parent, protect=protect, force=force)
        return AdapterResult(folder, ranks, math.sqrt(num / den) if den else 0.0, errors)
    finally:
        for adapter, source in zip(opened, sources):
            if adapter is not source:
                adapter.close()
