"""TorchReader on real torch.save / pickle.dump files: exact tensors, containers, pickled modules whose code is
gone, lazy opening with one read per tensor, and save_torch."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from soupkit.errors import CheckpointError
from soupkit.io import open_checkpoint
from soupkit.io.base import TensorInfo
from soupkit.io.torch_io import TorchReader, save_torch
from tests.io.torch_fixtures import LAYOUTS, make_vanishing_model, save, varied_state


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip(tmp_path: Path, layout: str) -> None:
    state = varied_state()
    path = save(state, tmp_path / "model.pth", layout)
    with TorchReader(path) as reader:
        assert reader.keys() == list(state)
        assert reader.metadata == {} and reader.file_size == path.stat().st_size
        assert reader.layout == layout
        for key, tensor in state.items():
            assert reader.info(key) == TensorInfo(key, tuple(tensor.shape), tensor.dtype)
            got = reader.get(key)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
            flat = tensor.reshape(-1)
            for start, stop in ((0, flat.numel()), (1, 3), (2, 2), (0, 10**9)):
                part = reader.read_flat(key, start, stop)
                assert part.dim() == 1 and torch.equal(part, flat[start:stop]), (key, start, stop)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_matches_torch_load_weights_only(tmp_path: Path, layout: str) -> None:
    path = save({"state_dict": varied_state(), "epoch": 3}, tmp_path / "ckpt.ckpt", layout)
    reference = torch.load(path, weights_only=True)["state_dict"]
    with TorchReader(path) as reader:
        assert reader.keys() == list(reference)
        assert all(torch.equal(reader.get(k), reference[k]) for k in reference)


def test_get_returns_owned_independent_tensors(tmp_path: Path) -> None:
    path = save(varied_state(), tmp_path / "state.pt", "zip")
    with TorchReader(path) as reader:
        base, tied, row = reader.get("base"), reader.get("tied"), reader.get("row_view")
        assert base.untyped_storage().nbytes() == base.nbytes  # owns exactly its own bytes
        assert row.untyped_storage().nbytes() == row.nbytes and row.is_contiguous()
        base.zero_()
        assert tied.abs().sum() > 0 and row.abs().sum() > 0
        assert reader.get("transposed").is_contiguous()


@pytest.mark.parametrize(
    ("container", "ema"),
    [
        (lambda s: {"state_dict": s, "epoch": 7, "optimizer": {"lr": 0.1}}, False),
        (lambda s: {"model": s, "args": {"lr": 0.1}}, False),
        (lambda s: {"model": {"state_dict": s}}, False),
        (lambda s: {"state_dict": {k: v * 0 for k, v in s.items()}, "state_dict_ema": s}, True),
        (lambda s: {"model": {k: v * 0 for k, v in s.items()}, "model_ema": s}, True),
        (lambda s: {f"module.{k}": v for k, v in s.items()}, False),
        (lambda s: {"state_dict": {f"module._orig_mod.{k}": v for k, v in s.items()}}, False),
    ],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_containers(tmp_path: Path, layout: str, container, ema: bool) -> None:
    state = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3), "steps": torch.tensor(5)}
    path = save(container(state), tmp_path / "ckpt.pt", layout)
    with TorchReader(path, ema=ema) as reader:
        assert reader.keys() == list(state)
        assert all(torch.equal(reader.get(k), v) for k, v in state.items())


def test_missing_ema_is_an_error(tmp_path: Path) -> None:
    path = save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ckpt.pt", "zip")
    with pytest.raises(CheckpointError, match=f"^{path}: no EMA weights found"):
        TorchReader(path, ema=True)


def test_no_tensors_is_an_error(tmp_path: Path) -> None:
    path = save({"epoch": 3, "name": "x"}, tmp_path / "ckpt.pt", "zip")
    with pytest.raises(CheckpointError, match=f"^{path}: not a state dict"):
        TorchReader(path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pickled_module_without_its_code(tmp_path: Path, layout: str) -> None:
    """torch.save(model) or a WiSE-FT style pickle.dump(model), loaded after the defining module is gone."""
    model, forget = make_vanishing_model(tmp_path, name=f"gone_{layout}")
    path = save(model, tmp_path / "classifier.pt", layout)
    forget()
    reference = model.state_dict()
    with TorchReader(path) as reader:
        assert reader.keys() == list(reference)
        for key, tensor in reference.items():
            assert torch.equal(reader.get(key), tensor), key
        assert "image_encoder.cache" not in reader and "image_encoder.maybe" not in reader


@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_inside_container_and_ddp(tmp_path: Path, layout: str) -> None:
    model, forget = make_vanishing_model(tmp_path, name=f"wrapped_{layout}")
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DataParallel/DDP look like when pickled
    path = save({"model": wrapped, "epoch": 1}, tmp_path / "ckpt.pt", layout)
    forget()
    reference = model.state_dict()
    with TorchReader(path) as reader:
        assert reader.keys() == list(reference)
        assert all(torch.equal(reader.get(k), v) for k, v in reference.items())


class WiseFTClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(64, 10)
        self.register_buffer("mean", torch.randn(64))
        self.register_buffer("count", torch.tensor(12, dtype=torch.int64))


def test_wise_ft_style_linear_and_buffers(tmp_path: Path) -> None:
    model = WiseFTClassifier()
    path = tmp_path / "wiseft.pt"
    with open(path, "wb") as handle:
        pickle.dump(model, handle)
    with TorchReader(path) as reader:
        assert reader.layout == "pickle"
        assert reader.keys() == list(model.state_dict())
        assert all(torch.equal(reader.get(k), v) for k, v in model.state_dict().items())


def test_open_checkpoint_routes_torch_files(tmp_path: Path) -> None:
    path = save({"w": torch.ones(2)}, tmp_path / "weights.bin", "legacy")
    with open_checkpoint(path) as reader:
        assert isinstance(reader, TorchReader) and torch.equal(reader.get("w"), torch.ones(2))


def test_unknown_key_names_the_nearest(tmp_path: Path) -> None:
    path = save({"head.weight": torch.ones(2)}, tmp_path / "w.pt", "zip")
    with TorchReader(path) as reader, pytest.raises(KeyError, match="Did you mean 'head.weight'"):
        reader.get("head.weights")


def test_read_after_close(tmp_path: Path) -> None:
    reader = TorchReader(save({"w": torch.ones(2)}, tmp_path / "w.pt", "zip"))
    reader.close()
    with pytest.raises(CheckpointError, match="closed"):
        reader.get("w")


# --- laziness -------------------------------------------------------------------------------------------------


def _bytes_read() -> int | None:
    try:
        with open("/proc/self/io") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("rchar"))
    except (OSError, StopIteration):
        return None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_open_reads_no_tensor_data_and_get_is_one_pread(tmp_path: Path, layout: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    state = {f"layer{i}.weight": torch.randn(512, 512) for i in range(16)}  # 16 MiB of data
    state.update({f"layer{i}.bias": torch.randn(512) for i in range(16)})
    path = save(state, tmp_path / "big.pt", layout)
    before = _bytes_read()
    reader = TorchReader(path)
    after = _bytes_read()
    if before is not None and after is not None:
        assert after - before < 1 << 20, f"opening read {after - before} bytes"

    calls: list[int] = []
    real_preadv = os.preadv

    def counting_preadv(fd: int, buffers: list, offset: int) -> int:
        calls.append(sum(len(b) for b in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    with reader:
        assert torch.equal(reader.get("layer3.weight"), state["layer3.weight"])
        assert len(calls) == 1 and calls[0] <= state["layer3.weight"].nbytes
        calls.clear()
        assert torch.equal(reader.read_flat("layer5.weight", 1000, 3000), state["layer5.weight"].reshape(-1)[1000:3000])
        # one read of at most the range (a plain pickle may already hold the first bytes of a payload)
        assert len(calls) <= 1 and sum(calls) <= 2000 * 4


# --- save_torch -----------------------------------------------------------------------------------------------


def test_save_torch_round_trip(tmp_path: Path) -> None:
    state = varied_state()
    path = tmp_path / "out.pt"
    with open(path, "wb") as handle:
        save_torch(state, handle, name=str(path))
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    with TorchReader(path) as reader:
        assert all(torch.equal(reader.get(k), v) for k, v in state.items())


def test_save_torch_does_not_carry_whole_storages(tmp_path: Path) -> None:
    big = torch.randn(1000, 1000)
    path = tmp_path / "slice.pt"
    with open(path, "wb") as handle:
        save_torch({"row": big[3]}, handle, name=str(path))
    assert path.stat().st_size < 100_000
    assert torch.equal(torch.load(path, weights_only=True)["row"], big[3])


def test_save_torch_rejects_non_tensors(tmp_path: Path) -> None:
    from soupkit.errors import OutputError

    with pytest.raises(OutputError, match="must be tensors"):
        with open(tmp_path / "bad.pt", "wb") as handle:
            save_torch({"w": [1, 2]}, handle, name="bad.pt")  # type: ignore[dict-item]
