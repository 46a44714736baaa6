"""Fixtures for the doctor: the digits CNN of ``soupkit demo``, pretrained briefly from two random
initialisations (A and B), then fine-tuned a few times from A and once from B, written as safetensors files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

RECIPE_SIZE = 16


@dataclass
class Ingredients:
    folder: Path
    base: Path  # init A, pretrained: the base of the A fine-tunes
    same: list[Path]  # fine-tuned from A
    other: Path  # fine-tuned from B (another initialisation)
    other_b: Path  # a second one from B


def _train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
           seed: int) -> torch.nn.Module:
    from soupkit.demo_train import random_shift, train

    return train(model, images, labels, epochs=epochs, lr=lr, weight_decay=1e-4, seed=seed,
                 augment=lambda x, g: random_shift(x, 0.5, g))


@pytest.fixture(scope="session")
def ingredients(tmp_path_factory: pytest.TempPathFactory) -> Ingredients:
    from soupkit.demo_train import digits_cnn
    from soupkit.eval.data.digits import load_digits_split
    from soupkit.io import save_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 38k-parameter CNN: one thread is fastest, and the machine is shared
    try:
        folder = tmp_path_factory.mktemp("doctor")
        x, y = load_digits_split("train", size=RECIPE_SIZE, seed=0)
        half = slice(0, len(y) // 2)  # fine-tuning sees half the images: quicker, and the runs still differ
        starts = {}
        for name, seed in (("A", 0), ("B", 1)):
            torch.manual_seed(seed)
            starts[name] = _train(digits_cnn(), x, y, epochs=2, lr=3e-3, seed=seed).state_dict()
        save_checkpoint(starts["A"], folder / "base_A.safetensors")
        same = []
        for number, lr in enumerate((1e-3, 2e-3, 3e-3, 1.5e-3)):
            model = digits_cnn()
            model.load_state_dict(starts["A"])
            _train(model, x[half], y[half], epochs=1, lr=lr, seed=10 + number)
            same.append(save_checkpoint(model.state_dict(), folder / f"ft_A{number}.safetensors"))
        others = []
        for number, lr in enumerate((2e-3, 1e-3)):
            model = digits_cnn()
            model.load_state_dict(starts["B"])
            _train(model, x[half], y[half], epochs=1, lr=lr, seed=20 + number)
            others.append(save_checkpoint(model.state_dict(), folder / f"ft_B{number}.safetensors"))
        return Ingredients(folder, folder / "base_A.safetensors", same, *others)
    finally:
        torch.set_num_threads(threads)
