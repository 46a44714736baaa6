"""Wrappers and containers: DDP / torch.compile prefixes, --strip-prefix / --add-prefix, Lightning .ckpt in and
out (as the dicts Lightning's Trainer.save_checkpoint writes), timm EMA weights."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

import soupkit
from soupkit import inspection
from soupkit.errors import CheckpointError, ParameterError
from soupkit.io import load_checkpoint, open_checkpoint
from soupkit.io.lightning import lightning_template, save_lightning_checkpoint
from soupkit.io.unwrap import strip_prefixes


def net_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"0.weight": torch.randn(4, 3, generator=g), "0.bias": torch.randn(4, generator=g),
            "2.weight": torch.randn(2, 4, generator=g), "2.bias": torch.randn(2, generator=g)}


@pytest.mark.parametrize("prefix", ["_orig_mod.module.", "module._orig_mod.", "module.", "_orig_mod.",
                                    "module.module."])
def test_ddp_and_compile_prefixes_strip_in_any_order(prefix: str) -> None:
    state = net_state(0)
    assert strip_prefixes({prefix + k: v for k, v in state.items()}) == state


def test_only_whole_components_are_stripped() -> None:
    state = {"x_orig_mod.w": 1, "enc._orig_mod.w": 2, "module_a.w": 3, "y.module.w": 4}
    assert strip_prefixes(state) == {"x_orig_mod.w": 1, "enc.w": 2, "module_a.w": 3, "y.module.w": 4}
    # module. is DDP's only when every key has it: a submodule named "module" stays
    assert strip_prefixes({"module.w": 1, "head.w": 2}) == {"module.w": 1, "head.w": 2}


def test_keys_colliding_after_stripping_name_both(tmp_path: Path) -> None:
    torch.save({"_orig_mod.w": torch.ones(1), "w": torch.zeros(1)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c.pt: keys '_orig_mod.w' and 'w' both become 'w'"):
        open_checkpoint(tmp_path / "c.pt")


def lightning_dict(seed: int, **hparams) -> dict:
    """What Lightning 2.x's Trainer.save_checkpoint writes for a module holding ``self.model`` and a loss with
    a buffer, trained with Adam and a ModelCheckpoint callback."""
    state = collections.OrderedDict({f"model.{k}": v for k, v in net_state(seed).items()})
    state["loss_fn.pos_weight"] = torch.ones(2)
    return {
        "epoch": 4, "global_step": 200, "pytorch-lightning_version": "2.4.0", "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 200}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {"best_model_score": None}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(200.0), "exp_avg": torch.zeros(4, 3)}},
                              "param_groups": [{"lr": 1e-3, "params": [0, 1, 2]}]}],
        "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": {"hidden": 4, "lr": 1e-3, **hparams},
    }


class LitNet(torch.nn.Module):
    """Stands in for a LightningModule: load_from_checkpoint builds it from hyper_parameters, then loads the
    state dict strictly."""

    def __init__(self, hidden: int, lr: float):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
        self.loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(2))


def load_from_checkpoint(path: Path) -> LitNet:
    """Lightning's path: torch.load (weights_only on recent torch), version for migrations, hparams, strict."""
    checkpoint = torch.load(path, weights_only=True)
    assert isinstance(checkpoint["pytorch-lightning_version"], str)
    module = LitNet(**checkpoint.get("hyper_parameters", {"hidden": 4, "lr": 1e-3}))
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module


def test_strip_and_add_prefix(tmp_path: Path) -> None:
    torch.save(lightning_dict(1), tmp_path / "a.ckpt")
    with open_checkpoint(tmp_path / "a.ckpt", strip_prefix="model.") as reader:
        assert reader.keys() == list(net_state(1))  # the loss's buffer has no model. prefix: left out
    with open_checkpoint(tmp_path / "a.ckpt", strip_prefix="model.", add_prefix="net.") as reader:
        assert reader.keys() == [f"net.{k}" for k in net_state(1)]
    plain = tmp_path / "plain.safetensors"
    soupkit.save_checkpoint(net_state(2), plain)
    with open_checkpoint(plain, add_prefix="model.") as reader:
        assert torch.equal(reader.get("model.0.weight"), net_state(2)["0.weight"])
    with pytest.raises(CheckpointError, match=r"plain.safetensors: no tensor name starts with the prefix 'encoder.'"):
        open_checkpoint(plain, strip_prefix="encoder.")
    with pytest.raises(ParameterError, match=r"--strip-prefix 'model' leaves names starting with '.'"):
        open_checkpoint(tmp_path / "a.ckpt", strip_prefix="model")


def test_lightning_ckpt_output_loads_like_load_from_checkpoint(tmp_path: Path) -> None:
    for seed in (1, 2):
        torch.save(lightning_dict(seed), tmp_path / f"run{seed}.ckpt")
    inputs = [tmp_path / "run1.ckpt", tmp_path / "run2.ckpt"]
    out = soupkit.merge(inputs, "uniform", tmp_path / "soup.ckpt")
    module = load_from_checkpoint(out)
    want = (net_state(1)["0.weight"] + net_state(2)["0.weight"]) / 2
    assert torch.allclose(module.model[0].weight, want)
    # with the first input's entries carried over: version, epoch, step and the hyperparameters
    soup = load_checkpoint(out)
    template = lightning_template(inputs[0])
    assert template == {"pytorch-lightning_version": "2.4.0", "epoch": 4, "global_step": 200,
                        "hparams_name": "kwargs", "hyper_parameters": {"hidden": 4, "lr": 1e-3}}
    with open(tmp_path / "carried.ckpt", "wb") as handle:
        save_lightning_checkpoint(soup, handle, template, name="carried.ckpt")
    checkpoint = torch.load(tmp_path / "carried.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"] == {"hidden": 4, "lr": 1e-3} and "optimizer_states" not in checkpoint
    assert torch.allclose(load_from_checkpoint(tmp_path / "carried.ckpt").model[0].weight, want)
    assert lightning_template(tmp_path / "missing.ckpt") == {}


def test_timm_ema_weights_are_reported_and_picked(tmp_path: Path) -> None:
    for container in ("state_dict_ema", "model_ema", "state_dict_ema_v2"):
        path = tmp_path / f"{container}.pth"
        torch.save({"epoch": 3, "arch": "resnet", "state_dict": net_state(1), container: net_state(2),
                    "optimizer": {"state": {}}}, path)
        assert inspection.describe(path)["ema"] is True
        assert torch.equal(load_checkpoint(path, ema=True)["0.weight"], net_state(2)["0.weight"])
        assert torch.equal(load_checkpoint(path)["0.weight"], net_state(1)["0.weight"])
    torch.save({"state_dict": net_state(1)}, tmp_path / "plain.pth")
    assert inspection.describe(tmp_path / "plain.pth")["ema"] is False


def test_per_key_lookups_are_constant_time(tmp_path: Path) -> None:
    """Membership never rebuilds the key set: 20k tests cost one keys() call, whatever the reader."""
    from soupkit.io.base import CheckpointReader, TensorInfo

    class Counting(CheckpointReader):
        name, calls = "counting", 0

        def keys(self) -> list[str]:
            self.calls += 1
            return [f"k{i}" for i in range(20_000)]

        def info(self, key: str) -> TensorInfo:
            return TensorInfo(key, (1,), torch.float32)

        def get(self, key: str) -> torch.Tensor:
            return torch.zeros(1)

    reader = Counting()
    assert all(f"k{i}" in reader for i in range(20_000)) and "k20000" not in reader
    assert reader.calls == 1
    soupkit.save_checkpoint({f"m{i % 2}.k{i}": torch.zeros(1) for i in range(3000)}, tmp_path / "s.safetensors",
                            shard_size=4000)
    with open_checkpoint(tmp_path / "s.safetensors.index.json", strip_prefix="m1.") as sharded:
        assert len(sharded.keys()) == 1500 and "k1" in sharded and "k2" not in sharded and "m1.k1" not in sharded


def test_base_applies_to_adapters_only(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"<state dict>: base= applies to LoRA adapters .*full checkpoint"):
        open_checkpoint(net_state(0), base=net_state(1))
