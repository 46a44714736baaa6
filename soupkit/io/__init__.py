"""Checkpoint I/O: one small surface used by everything else in soupkit.

- ``open_checkpoint(source)`` -> a lazy ``CheckpointReader`` (keys, shapes, dtypes, metadata, ``get(key)``)
  for ``.safetensors`` files, Hugging Face sharded checkpoints (an ``*.index.json`` or a folder holding one),
  torch files (``.pt/.pth/.bin/.ckpt``: zip or legacy ``torch.save``, or a pickled ``nn.Module``, read by a
  restricted unpickler that never runs foreign code), in-memory state dicts, and PEFT LoRA adapters (as their
  weight updates, or with ``base=`` the adapted model: ``lora``). Hugging Face folders read the tied keys
  ``save_pretrained`` omits (``hf_folder``); ``strip_prefix`` / ``add_prefix`` rename keys (``views``).
- ``load_checkpoint(source)`` -> a plain ``dict[str, Tensor]``.
- ``save_checkpoint(state_dict, path)`` -> an atomic safetensors (or ``.pt``) file, optionally sharded.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import CheckpointError, OutputError
from soupkit.io import lora
from soupkit.io.atomic import OutputSet, check_derived_output, check_output_path
from soupkit.io.base import CheckpointReader, TensorInfo, refuse_complex, refuse_expansion
from soupkit.io.hf_folder import with_ties
from soupkit.io.lightning import save_lightning_checkpoint
from soupkit.io.provenance import creation_time, fingerprint, provenance_metadata, quick_fingerprint
from soupkit.io.safetensors_io import SafetensorsReader, SafetensorsWriter, looks_like_safetensors
from soupkit.io.sharded import ShardedReader, index_path, plan_shards, shard_names
from soupkit.io.torch_io import TorchReader, save_torch
from soupkit.io.unwrap import unwrap_state_dict
from soupkit.io.views import with_prefix

__all__ = [
    "CheckpointReader", "CheckpointSink", "CheckpointSource", "OutputSet", "StateDictReader", "TensorInfo",
    "check_output_path", "creation_time", "fingerprint", "input_files", "load_checkpoint", "open_checkpoint",
    "open_file",
    "provenance_metadata", "quick_fingerprint", "save_checkpoint",
]  # fmt: skip

#: anything soupkit accepts where a checkpoint is expected
CheckpointSource = str | Path | Mapping[str, torch.Tensor] | CheckpointReader

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_DIRECTORY_CANDIDATES = (
    "model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors",
    "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
)  # fmt: skip


class StateDictReader(CheckpointReader):
    """An in-memory ``{name: tensor}`` mapping behind the reader interface (tensors are never copied)."""

    def __init__(self, state: Mapping[str, Any], name: str = "<state dict>"):
        self.name = name
        self.path = None
        self._state = unwrap_state_dict(state, source=name, is_tensor=torch.is_tensor)
        for key, tensor in self._state.items():
            _check_in_memory(name, key, tensor)
        self._contiguous: tuple[str | None, torch.Tensor | None] = (None, None)  # the last view read, made whole

    def keys(self) -> list[str]:
        return list(self._state)

    def info(self, key: str) -> TensorInfo:
        tensor = self._state[key]
        return TensorInfo(key, tuple(tensor.shape), tensor.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self._state[key].detach()

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        tensor = self._state[key].detach()
        if not tensor.is_contiguous():  # a view: made contiguous once per key, not once per chunk
            if self._contiguous[0] != key:
                self._contiguous = (key, tensor.contiguous())
            tensor = self._contiguous[1]
        flat = tensor.reshape(-1)[start:stop]
        # an empty tensor may carry any stride (numpy gives 0), and viewing it as bytes then fails
        return flat if flat.numel() else torch.empty(0, dtype=flat.dtype)

    def __contains__(self, key: object) -> bool:
        return key in self._state

    @property
    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self._state


def _check_in_memory(name: str, key: str, tensor: torch.Tensor, *, complex_ok: bool = False) -> None:
    """Refuse tensors a merge cannot read element by element: sparse / quantized / nested layouts (their
    ``reshape(-1)`` is not their values), meta tensors (no values at all) and, as merge inputs, complex ones."""
    if tensor.layout != torch.strided or tensor.is_quantized or getattr(tensor, "is_nested", False):
        kind = "quantized" if tensor.is_quantized else str(tensor.layout).replace("torch.", "")
        raise CheckpointError(f"{name}: tensor {key!r} is a {kind} tensor; soupkit merges dense tensors "
                              f"(call .to_dense() / .dequantize() first)")
    if tensor.is_meta:
        raise CheckpointError(f"{name}: tensor {key!r} is on the meta device and holds no values; load the "
                              f"weights before merging")
    if not complex_ok:
        refuse_complex(name, key, tensor.dtype)
    if not tensor.is_contiguous():
        refuse_expansion(name, key, tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _regular_file(path: Path) -> Path:
    """``path`` if it is a regular file (after symlinks). A FIFO would block the open, a device (/dev/zero)
    never ends: both are refused before anything opens them."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(
            mode) else "a socket" if stat.S_ISSOCK(mode) else "a special file"
        raise CheckpointError(f"{path}: is {kind}, not a checkpoint file")
    return path


def _open_torch(path: Path, ema: bool) -> CheckpointReader:

    return TorchReader(path, ema=ema)


def _resolve_directory(path: Path) -> Path:
    for name in _DIRECTORY_CANDIDATES:
        if (path / name).is_file():
            return path / name
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", *TORCH_SUFFIXES))
    if len(weights) == 1 and not indexes:
        return weights[0]
    found = [p.name for p in (indexes or weights)][:6]
    raise CheckpointError(
        f"{path}: folder does not hold exactly one checkpoint (found {found or 'none'}); name the file"
    )


def open_checkpoint(source: CheckpointSource, *, ema: bool = False, name: str | None = None,
                    strip_prefix: str | None = None, add_prefix: str | None = None,
                    base: CheckpointSource | None = None) -> CheckpointReader:
    """Open a checkpoint lazily. The format is detected from the content, not trusted from the extension.

    A Hugging Face folder (or a weights file in one) whose ``config.json`` ties weights reads the tied keys
    ``save_pretrained`` leaves out (``lm_head.weight``) from their partner. A PEFT LoRA adapter reads as its
    weight updates keyed by the base model's names, or with ``base`` as the adapted model's full weights
    (``soupkit.io.lora``). ``strip_prefix`` drops a prefix from every name (keys without it are left out; a
    Lightning module's ``model.``), ``add_prefix`` then puts one in front.
    """

    if isinstance(source, CheckpointReader):
        return with_prefix(source, strip=strip_prefix, add=add_prefix)
    if isinstance(source, Mapping):
        reader: CheckpointReader = StateDictReader(source, name=name or "<state dict>")
    elif not isinstance(source, (str, Path)):
        raise CheckpointError(f"expected a checkpoint path or a state dict, got a {type(source).__name__}")
    elif lora.is_adapter(source):
        if ema:
            raise CheckpointError(f"{source}: --ema applies to torch checkpoints that hold EMA weights; this is "
                                  f"a LoRA adapter")
        reader = lora.open_adapter(source, base)
    else:
        reader = with_ties(open_file(source, ema=ema), Path(source))
    if base is not None and not isinstance(reader, lora.LoraMergedReader):
        reader.close()
        raise CheckpointError(f"{reader.name}: base= applies to LoRA adapters (a folder with "
                              f"{lora.ADAPTER_CONFIG}); this is a full checkpoint")
    try:
        return with_prefix(reader, strip=strip_prefix, add=add_prefix)
    except BaseException:
        reader.close()
        raise


def open_file(source: str | Path, *, ema: bool = False) -> CheckpointReader:
    """Open one checkpoint file (or folder / index) by its format alone: no adapter or tie handling."""
    path = Path(source)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as err:  # a name too long for the file system, a symlink loop
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from None
    if not exists:
        raise CheckpointError(f"{path}: no such file")
    if is_dir:
        path = _resolve_directory(path)
    path = _regular_file(path)
    if path.name.endswith(".index.json"):
        return ShardedReader(path, lambda shard: open_file(shard, ema=ema))
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from None
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if looks_like_safetensors(head):
        if ema:
            raise CheckpointError(f"{path}: --ema applies to torch checkpoints that hold EMA weights; this is "
                                  f"a safetensors file")
        return SafetensorsReader(path)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or path.suffix.lower() in TORCH_SUFFIXES:
        return _open_torch(path, ema)  # also old protocol-0/1 pickles and tar files, with precise messages
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)  # raises the precise header error
    raise CheckpointError(
        f"{path}: unrecognised checkpoint format (expected safetensors, a torch.save file or a pickle)"
    )


def input_files(reader: CheckpointReader) -> list[Path]:
    """Every file a reader reads from (shards included): outputs must never overwrite one of them."""
    files = getattr(reader, "files", None)
    if files is not None:
        return list(files)
    return [reader.path] if reader.path is not None else []


def load_checkpoint(source: CheckpointSource, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint into a plain ``{name: tensor}`` dict (CPU tensors owning their memory)."""
    if isinstance(source, Mapping) and all(torch.is_tensor(v) for v in source.values()):
        return dict(source)
    reader = open_checkpoint(source, ema=ema)
    try:
        return {key: reader.get(key) for key in reader.keys()}
    finally:
        if reader is not source:
            reader.close()


class CheckpointSink:
    """Receives a merge's output tensor by tensor (in plan order, possibly in flat chunks) and stores it:
    in memory (``output=None``), as one safetensors file, as Hugging Face shards + index, as ``.pt``, or as a
    Lightning ``.ckpt`` dict (``lightning``: the entries ``lightning_template(first input)`` carries over)."""

    def __init__(self, output: Path | None, plan: list[TensorInfo], metadata: dict[str, str] | None,
                 outputs: OutputSet | None, shard_size: int | None = None, *, protect: Sequence[Path] = (),
                 force: bool = False, lightning: Mapping[str, Any] | None = None):
        self.output = output
        self._plan = {info.key: info for info in plan}
        self._tensors: dict[str, torch.Tensor] | None = None
        self._filled: dict[str, int] = {}
        self._writers: dict[str, SafetensorsWriter] = {}
        self._outputs = outputs
        self._metadata = metadata or {}
        self._result: Path | None = output
        self._lightning = lightning  # a .ckpt output's carried entries (soupkit.io.lightning.lightning_template)
        if output is None or output.suffix.lower() != ".safetensors":
            self._tensors = {}
            return
        assert outputs is not None
        groups = plan_shards(plan, shard_size) if shard_size else [plan]
        if len(groups) == 1:
            handle = outputs.open(output)
            writer = SafetensorsWriter(handle, plan, self._metadata, str(output))
            self._writers = {info.key: writer for info in plan}
            return
        outputs.lock(output)  # two sharded writers of one name exclude each other, whatever their shard counts
        names = shard_names(output, len(groups))
        self._result = index_path(output)
        for derived in (*names, self._result):  # named only now: checked like the output itself
            check_derived_output(derived, inputs=protect, force=force)
        weight_map = {}
        for shard_path, group in zip(names, groups):
            writer = SafetensorsWriter(outputs.open(shard_path), group, self._metadata, str(shard_path))
            for info in group:
                self._writers[info.key] = writer
                weight_map[info.key] = shard_path.name
        index = {"metadata": {"total_size": sum(i.nbytes for i in plan), **self._metadata},
                 "weight_map": weight_map}
        outputs.open(self._result).write(json.dumps(index, indent=2).encode())

    def dtype_of(self, key: str) -> torch.dtype:
        """The planned output dtype of ``key``."""
        return self._plan[key].dtype

    def write(self, key: str, chunk: torch.Tensor) -> None:
        """Append the next flat chunk of ``key`` (CPU tensor of the planned dtype)."""
        if self._tensors is None:
            self._writers[key].write(key, chunk)
            return
        info = self._plan[key]
        target = self._tensors.get(key)
        if target is None:
            target = self._tensors[key] = torch.empty(info.shape, dtype=info.dtype)
            self._filled[key] = 0
        start = self._filled[key]
        target.view(-1)[start : start + chunk.numel()] = chunk.reshape(-1)
        self._filled[key] = start + chunk.numel()

    def finish(self) -> dict[str, torch.Tensor] | Path:
        """Complete the output; the files are published when the surrounding ``OutputSet`` commits."""
        for writer in dict.fromkeys(self._writers.values()):
            writer.finish()
        if self._tensors is None:
            assert self._result is not None
            return self._result
        tensors = {k: self._tensors.get(k, torch.empty(i.shape, dtype=i.dtype)) for k, i in self._plan.items()}
        if self.output is None:
            return tensors
        assert self._outputs is not None

        try:
            if self.output.suffix.lower() == ".ckpt":  # what Lightning's load_from_checkpoint accepts
                save_lightning_checkpoint(tensors, self._outputs.open(self.output), self._lightning,
                                          name=str(self.output))
            else:
                save_torch(tensors, self._outputs.open(self.output), name=str(self.output))
        except RuntimeError as err:
            # torch.save's zip writer turns a failed write (a full disk) into "RuntimeError: unexpected pos"
            cause = err.__context__
            if not isinstance(cause, OSError):
                raise
            raise OutputError(f"{self.output}: cannot write output: {cause.strerror or cause}") from None
        return self.output


def plan_of(state: Mapping[str, torch.Tensor]) -> list[TensorInfo]:
    return [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()]


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None,
                    *, force: bool = False, shard_size: int | None = None,
                    protect: Iterable[str | Path] = ()) -> Path:
    """Write ``state_dict`` atomically as safetensors (or ``.pt`` when the name asks for it).

    Returns the written path (the index for sharded output). ``protect`` lists files that must never be
    overwritten (the inputs this state dict came from).
    """
    if not isinstance(state_dict, Mapping):
        raise OutputError(f"{path}: save_checkpoint needs a mapping of name -> tensor, got {type(state_dict).__name__}")
    state = {k: v for k, v in state_dict.items() if torch.is_tensor(v)}
    if len(state) != len(state_dict) or not all(isinstance(k, str) for k in state):
        raise OutputError(f"{path}: state dict values must be tensors and keys strings")
    for key, tensor in state.items():  # written faithfully, complex included; never a sparse or meta tensor
        _check_in_memory(str(path), key, tensor, complex_ok=True)
    protected = [Path(p) for p in protect]
    out = check_output_path(path, inputs=protected, force=force)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise OutputError(f"{out}: metadata must map strings to strings")
    meta = {"format": "pt", **(metadata or {})}
    with OutputSet(replace=force) as outputs:
        sink = CheckpointSink(out, plan_of(state), meta, outputs, shard_size, protect=protected, force=force)
        for key, tensor in state.items():
            sink.write(key, tensor.detach().cpu())
        result = sink.finish()
    assert isinstance(result, Path)
    return result
