"""One test per bug the reliability work found, named after what must hold (each failed before its fix)."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import soupkit
from tests.hostile.corpus import small_state


def test_empty_numpy_backed_tensors_merge(tmp_path: Path) -> None:
    """numpy gives empty arrays stride 0; viewing such a chunk as bytes raised RuntimeError in the engine."""
    empty = {"w": torch.from_numpy(np.zeros((0, 3), dtype=np.float32)),
             "ids": torch.from_numpy(np.zeros((0,), dtype=np.int64)), "x": torch.ones(2)}
    out = soupkit.uniform_soup([empty, dict(empty)])
    assert out["w"].shape == (0, 3) and out["ids"].shape == (0,)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reading_a_torch_checkpoint_leaks_no_file(tmp_path: Path, cli, layout: str) -> None:
    """Reading a valid .pt must close every file it opened. The CLI hides ResourceWarnings (so users see no
    'warning: unclosed file' line), but the library still leaked one file object per zip checkpoint opened.
    Bug in soupkit/io/safe_pickle.py _Loader._load_zip: zipfile.ZipFile(io.FileIO(path)) never closes the
    FileIO it was given (ZipFile.close() leaves a passed-in file open); zipfile.ZipFile(path) would."""
    path = tmp_path / "model.pt"
    torch.save(small_state(), path, **({} if layout == "zip" else {"_use_new_zipfile_serialization": False}))
    result = cli("inspect", path)
    assert result.code == 0 and result.err == "", result.err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with soupkit.open_checkpoint(path) as reader:
            reader.get("layer.weight")
        del reader
        gc.collect()  # here, not in some later test
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


def test_uppercase_safetensors_suffix_writes_safetensors(tmp_path: Path, cli) -> None:
    """`-o soup.SAFETENSORS` passed the suffix check case-insensitively but was then written with torch.save."""
    from soupkit.io.safetensors_io import SafetensorsReader

    a, b = (soupkit.save_checkpoint(small_state(i), tmp_path / f"m{i}.safetensors") for i in range(2))
    result = cli("merge", a, b, "-o", tmp_path / "soup.SAFETENSORS", "-q")
    assert result.code == 0, result.err
    with soupkit.open_checkpoint(tmp_path / "soup.SAFETENSORS") as reader:
        assert isinstance(reader, SafetensorsReader)
