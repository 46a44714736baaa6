"""Hugging Face-style sharded checkpoints: ``*.index.json`` + shard files, for reading and writing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from soupkit import interrupt
from soupkit.errors import CheckpointError
from soupkit.io.base import CheckpointReader, TensorInfo

#: an index larger than this is not a shard index (Hugging Face's hold ~100 KB for 100B-parameter models)
MAX_INDEX_BYTES = 64 * 1024 * 1024


class ShardedReader(CheckpointReader):
    """Reads a checkpoint split over shards listed in an index's ``weight_map``."""

    def __init__(self, index_path: str | Path, open_shard: Callable[[Path], CheckpointReader]):
        self.path = Path(index_path)
        self.name = str(index_path)
        try:
            size = self.path.stat().st_size
            if size > MAX_INDEX_BYTES:
                raise CheckpointError(f"{self.name}: shard index is {size:,} bytes; an index holds at most "
                                      f"{MAX_INDEX_BYTES:,}")
            index = json.loads(self.path.read_text())
        except OSError as err:
            raise CheckpointError(f"{self.name}: cannot read index: {err.strerror}") from None
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
            raise CheckpointError(f"{self.name}: shard index is not valid JSON") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{self.name}: shard index has no 'weight_map' of tensor name -> shard file")
        self._shards: dict[str, CheckpointReader] = {}
        for shard_name in dict.fromkeys(weight_map.values()):
            interrupt.check()  # opening hundreds of shards (each header parsed) is a long step
            self._shards[shard_name] = open_shard(self._shard_path(shard_name))
        self._where: dict[str, CheckpointReader] = {}
        for key, shard_name in weight_map.items():
            shard = self._shards[shard_name]
            if key not in shard:
                raise CheckpointError(f"{self.name}: tensor {key!r} is not in shard {shard_name!r} as the "
                                      f"index claims")
            self._where[key] = shard
        metadata = index.get("metadata")
        self._metadata = {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(
            metadata, dict) else {}

    def _shard_path(self, shard_name: str) -> Path:
        """The file a shard name stands for, after the symlink policy (SECURITY.md): the name is relative, and
        the file it resolves to (symlinks followed) is a regular file inside the index's folder -- either the
        folder as named or, for an index that is itself a symlink (the Hugging Face cache links snapshots into
        ``blobs/``), the folder it resolves into. Indexes do not nest, so no chain of indexes can loop."""
        parts = Path(shard_name).parts
        if not shard_name or Path(shard_name).is_absolute() or ".." in parts:
            raise CheckpointError(f"{self.name}: shard {shard_name!r} points outside the checkpoint folder")
        folders = {self.path.parent.resolve(), self.path.resolve().parent}
        shard_path = self.path.parent / shard_name
        try:
            real = shard_path.resolve(strict=True)
        except FileNotFoundError:
            raise CheckpointError(f"{self.name}: shard {shard_name!r} listed in the index does not exist") from None
        except (OSError, RuntimeError) as err:  # a symlink loop, a name too long
            raise CheckpointError(f"{self.name}: shard {shard_name!r} cannot be resolved: "
                                  f"{getattr(err, 'strerror', None) or 'symlink loop'}") from None
        if not any(real.is_relative_to(folder) for folder in folders):
            raise CheckpointError(f"{self.name}: shard {shard_name!r} is a symlink to a file outside the "
                                  f"checkpoint folder; soupkit reads shards only inside it (see SECURITY.md)")
        if real == self.path.resolve() or real.name.endswith(".index.json"):
            raise CheckpointError(f"{self.name}: shard {shard_name!r} is an index, not a shard (an index naming "
                                  f"itself or another index would never end)")
        if not real.is_file():
            raise CheckpointError(f"{self.name}: shard {shard_name!r} is not a regular file")
        return shard_path

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, key: str) -> TensorInfo:
        return self._where[key].info(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get(key)

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._where[key].read_flat(key, start, stop)

    def read_flat_into(self, key: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        return self._where[key].read_flat_into(key, start, stop, buffer)

    def map_flat(self, key: str, start: int, stop: int) -> torch.Tensor | None:
        return self._where[key].map_flat(key, start, stop)

    @property
    def metadata(self) -> dict[str, str]:
        first = next(iter(self._shards.values()))
        return {**first.metadata, **self._metadata}

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size + sum(s.file_size or 0 for s in self._shards.values())

    @property
    def files(self) -> list[Path]:
        return [self.path, *(s.path for s in self._shards.values() if s.path is not None)]

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def plan_shards(plan: list[TensorInfo], shard_size: int) -> list[list[TensorInfo]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in plan:
        if shards[-1] and size + info.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def shard_names(output: Path, count: int) -> list[Path]:
    """``soup.safetensors`` -> ``soup-00001-of-00003.safetensors`` ... (Hugging Face naming)."""
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.stem
    return [output.with_name(f"{stem}-{i:05d}-of-{count:05d}.safetensors") for i in range(1, count + 1)]


def index_path(output: Path) -> Path:
    """The index written beside shards: ``soup.safetensors.index.json``."""
    return output.with_name(output.name + ".index.json")
