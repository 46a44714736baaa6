"""Helpers for the torch-checkpoint tests: real files in every layout, modules whose code is gone, hostile
pickles and hand-built torch zip archives with chosen defects."""

from __future__ import annotations

import importlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LAYOUTS = ("zip", "legacy", "pickle")


def varied_state() -> dict[str, torch.Tensor]:
    """Every dtype the readers care about, plus views, a shared storage and non-contiguous tensors."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    state = {
        "fp32": torch.randn(4, 3, generator=g),
        "fp16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "fp64": torch.randn(3, generator=g).double(),
        "int64": torch.arange(-5, 5, dtype=torch.int64),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "base": base,
        "tied": base,  # the same tensor twice (tied weights)
        "row_view": base[2],  # a view into the middle of a shared storage
        "transposed": base.t(),  # non-contiguous
        "strided": base[::2, 1::2],  # non-contiguous with an offset
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
    }
    return state


def save(obj: Any, path: Path, layout: str) -> Path:
    """Write ``obj`` as a zip ``torch.save``, a legacy ``torch.save`` or a plain ``pickle.dump``."""
    if layout == "zip":
        torch.save(obj, path)
    elif layout == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif layout == "pickle":
        with open(path, "wb") as handle:
            pickle.dump(obj, handle)
    else:
        raise ValueError(layout)
    return path


MODULE_SOURCE = '''
import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.no_bias = nn.Linear(8, 8, bias=False)
        self.register_buffer("scale", torch.full((8,), 0.5))
        self.register_buffer("cache", torch.zeros(4), persistent=False)
        self.register_buffer("maybe", None)
        self.device_hint = torch.device("cpu")
        self.meta = {"arch": "toy", "sizes": (16, 8)}


class ClassificationHead(nn.Linear):
    def __init__(self, normalize, weights):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(torch.zeros_like(self.bias))


class ImageClassifier(nn.Module):
    """Like WiSE-FT's: an image encoder plus a zero-shot head, pickled whole."""

    def __init__(self):
        super().__init__()
        self.image_encoder = Encoder()
        self.classification_head = ClassificationHead(True, torch.randn(3, 8))
        self.train_preprocess = None
        self.register_buffer("logit_scale", torch.tensor(4.6))
'''


def make_vanishing_model(tmp_path: Path, name: str = "vanishing_models") -> tuple[Any, Callable[[], None]]:
    """Build an ``ImageClassifier`` from a module written to ``tmp_path``; ``forget()`` removes that module
    from disk and ``sys.modules`` so a later load cannot import it."""
    folder = tmp_path / f"{name}_src"
    folder.mkdir()
    (folder / f"{name}.py").write_text(MODULE_SOURCE)
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(0)
    model = module.ImageClassifier()

    def forget() -> None:
        sys.modules.pop(name, None)
        (folder / f"{name}.py").unlink()
        importlib.invalidate_caches()

    return model, forget


class Call:
    """Pickles as ``function(*args)``: the shape of every hostile ``__reduce__``."""

    def __init__(self, function: Any, *args: Any):
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.args


def hostile_payloads(canary: Path) -> dict[str, Any]:
    """Objects whose unpickling would create ``canary`` if any call in them were made."""
    touch = f"touch {canary}"
    return {
        "os.system": Call(os.system, touch),
        "eval": Call(eval, f"__import__('os').system({touch!r})"),
        "exec": Call(exec, f"import os; os.system({touch!r})"),
        "subprocess.Popen": Call(subprocess.Popen, ["touch", str(canary)]),
        "nested": {"state_dict": {"w": torch.ones(2), "x": [1, {"deep": Call(os.system, touch)}]}},
    }


def raw_pickle(*parts: bytes) -> bytes:
    """Concatenate hand-written pickle opcodes (for inputs no Python object pickles to)."""
    return b"".join(parts)


class _FakeStorage:
    def __init__(self, key: str, dtype: str, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _FakeTensor:
    """Pickles like a tensor (``_rebuild_tensor_v2``) with whatever metadata the test chooses."""

    def __init__(self, storage: _FakeStorage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.args = (storage, offset, shape, stride, False, OrderedDict())

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return torch._utils._rebuild_tensor_v2, self.args


class _ZipPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _FakeStorage):
            return ("storage", getattr(torch, obj.dtype), obj.key, "cpu", obj.numel)
        return None


def fake_tensor(key: str, dtype: str, numel: int, offset: int, shape: tuple[int, ...],
                stride: tuple[int, ...]) -> _FakeTensor:
    return _FakeTensor(_FakeStorage(key, dtype, numel), offset, shape, stride)


def write_torch_zip(path: Path, obj: Any, records: dict[str, bytes], *, byteorder: bytes | None = b"little",
                    compression: int = zipfile.ZIP_STORED, prefix: str = "archive") -> Path:
    """A torch.save-style zip written by hand: ``obj`` pickled with fake storages, ``records`` as data."""
    buffer = io.BytesIO()
    _ZipPickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr(f"{prefix}/data.pkl", buffer.getvalue())
        if byteorder is not None:
            archive.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in records.items():
            archive.writestr(f"{prefix}/data/{key}", data)
        archive.writestr(f"{prefix}/version", "3\n")
    return path


def rewrite_zip(source: Path, target: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a zip record by record; ``edit(name, data)`` returns new data, or None to drop the record."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = edit(info.filename, src.read(info.filename))
            if data is not None:
                dst.writestr(info.filename, data)
    return target
