"""Training for ``soupkit demo``: a small CNN "pretrained" on corrupted digits, then fine-tuned K times.

The stand-in for a robust zero-shot model is a network trained on a broad, heavily augmented version of the data
(random noise, rotation, blur, inversion and occlusion); the ingredients are fine-tuned from it on clean images
only, with a random hyperparameter search like the model-soups paper's (learning rate, weight decay, epochs, label
smoothing, augmentation strength). Everything is seeded, single-threaded per step and CPU-friendly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """Two conv blocks and an MLP head for 1x16x16 digits (~38k parameters): seconds to train on a CPU."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_cnn(num_classes: int = 10, channels: int = 1) -> nn.Module:
    """Factory used by ``recipes/digits.yaml`` (``kind: python``) and the demo."""
    return DigitsCNN(num_classes=num_classes, channels=channels)


@dataclass(frozen=True)
class FinetuneConfig:
    """One ingredient's hyperparameters (the random search space of the demo)."""

    lr: float
    weight_decay: float
    epochs: int
    label_smoothing: float
    augment: float  # 0..1: probability and size of random shifts
    seed: int

    @classmethod
    def sample(cls, rng: random.Random, seed: int, quick: bool) -> FinetuneConfig:
        return cls(
            lr=round(10 ** rng.uniform(-3.3, -2.3), 6),
            weight_decay=round(10 ** rng.uniform(-5, -2), 7),
            epochs=rng.randint(2, 4) if quick else rng.randint(4, 10),
            label_smoothing=round(rng.uniform(0.0, 0.2), 3),
            augment=round(rng.uniform(0.0, 1.0), 3),
            seed=seed,
        )

    def to_metadata(self) -> dict[str, str]:
        return {f"demo.{k}": str(v) for k, v in asdict(self).items()}


Corruption = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def random_shift(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``round(2 * strength)`` pixels (mild augmentation for fine-tuning)."""
    reach = round(2 * strength)
    if reach == 0:
        return images
    shifts = torch.randint(-reach, reach + 1, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=shifts, dims=(2, 3))


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
          weight_decay: float, label_smoothing: float = 0.0, seed: int = 0, batch_size: int = 64,
          augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> nn.Module:
    """AdamW with a cosine schedule; deterministic for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            x, y = images[batch], labels[batch]
            if augment is not None:
                x = augment(x, generator)
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model
