"""Fixtures for the soup tests: a tiny MLP on scikit-learn's digits, ingredients fine-tuned from one start, and
``DigitsEvaluator``, a small stand-in with the ``soupkit.eval.Evaluator`` surface (held-out/test/shift sets,
a fingerprint cache, exact ``need_correct`` early stop, a forward-pass counter)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn


@dataclass
class FakeDatasetResult:
    name: str
    accuracy: float
    correct: int
    n: int
    loss: float
    correct_mask: torch.Tensor
    seconds: float = 0.0
    stopped_early: bool = False
    examples_seen: int = 0
    cached: bool = False


@dataclass
class FakeEvalResult:
    datasets: dict[str, FakeDatasetResult] = field(default_factory=dict)
    seconds: float = 0.0

    def __getitem__(self, name: str) -> FakeDatasetResult:
        return self.datasets[name]

    def accuracy(self, name: str) -> float:
        return self.datasets[name].accuracy


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@dataclass
class DigitsData:
    train: tuple[torch.Tensor, torch.Tensor]
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_digits_data() -> DigitsData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    train, heldout, test = slice(0, 900), slice(900, 1200), slice(1200, 1797)
    noisy = (x[test] + 0.35 * torch.randn(x[test].shape, generator=g)).clamp(0, 1)
    return DigitsData(train=(x[train], y[train]),
                      sets={"heldout": (x[heldout], y[heldout]), "test": (x[test], y[test]),
                            "noisy": (noisy, y[test])})


class DigitsEvaluator:
    """The Evaluator contract on a tiny in-memory problem (CPU)."""

    heldout_name = "heldout"

    def __init__(self, data: DigitsData, batch_size: int = 50):
        self.data = data
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.model = make_mlp().eval()
        self.dataset_names = list(data.sets)
        self.test_names = ["test"]
        self.shift_names = ["noisy"]
        self.forward_passes = 0
        self.cache: dict[tuple[str, str], FakeDatasetResult] = {}
        self.loaded_paths: list[str] = []
        self.orders_seen: list[torch.Tensor | None] = []

    def num_examples(self, name: str) -> int:
        return len(self.data.sets[name][1])

    def batches(self, name: str, order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.data.sets[name]
        if order is not None:
            x, y = x[order], y[order]
        for start in range(0, len(y), self.batch_size):
            yield x[start:start + self.batch_size], y[start:start + self.batch_size]

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, target in self.model.state_dict().items():
                target.copy_(state[key])

    def __call__(self, state) -> FakeEvalResult:
        return self.evaluate(state)

    def evaluate(self, state, datasets=None, *, need_correct=None, order=None, use_cache=None, progress=False):
        from soupkit.io import fingerprint, load_checkpoint

        names = list(datasets) if datasets is not None else list(self.dataset_names)
        if need_correct is not None and len(names) != 1:
            raise ValueError("need_correct applies to one dataset")
        key = None
        if isinstance(state, (str, Path)) and use_cache is not False:
            key = fingerprint(state)
        result = FakeEvalResult()
        loaded = False
        for name in names:
            if key is not None and (key, name) in self.cache:
                cached = self.cache[(key, name)]
                result.datasets[name] = FakeDatasetResult(**{**cached.__dict__, "cached": True})
                continue
            if not loaded:
                sd = state if isinstance(state, Mapping) else load_checkpoint(state)  # a path or a reader
                if isinstance(state, (str, Path)):
                    self.loaded_paths.append(str(state))
                self.load_state(sd)
                loaded = True
            result.datasets[name] = self._run(name, need_correct, order)
            if key is not None and not result.datasets[name].stopped_early:
                self.cache[(key, name)] = result.datasets[name]
        return result

    @torch.no_grad()
    def _run(self, name: str, need_correct: int | None, order: torch.Tensor | None = None) -> FakeDatasetResult:
        n = self.num_examples(name)
        correct = seen = 0
        loss = 0.0
        masks = []
        stopped = False
        self.orders_seen.append(order)
        for x, y in self.batches(name, order):
            if need_correct is not None and correct + (n - seen) < need_correct:
                stopped = True
                break
            logits = self.model(x)
            self.forward_passes += 1
            hit = logits.argmax(1) == y
            masks.append(hit)
            correct += int(hit.sum())
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            seen += len(y)
        if need_correct is not None and not stopped and correct + (n - seen) < need_correct:
            stopped = seen < n
        mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
        if order is not None and not stopped:  # back to dataset order
            mask = torch.zeros_like(mask).index_put_((order[: len(mask)],), mask)
        return FakeDatasetResult(name, correct / n if not stopped else correct / max(seen, 1), correct, n,
                                 loss / max(seen, 1) if seen else math.nan, mask, stopped_early=stopped,
                                 examples_seen=seen)


def finetune(start: Mapping[str, torch.Tensor], data: DigitsData, *, seed: int, lr: float, steps: int,
             label_noise: float = 0.0) -> dict[str, torch.Tensor]:
    """A few SGD steps from ``start`` on a random half of the training set (seed, lr and noise vary)."""
    g = torch.Generator().manual_seed(seed)
    model = make_mlp()
    model.load_state_dict(start)
    x, y = data.train
    keep = torch.randperm(len(y), generator=g)[: len(y) // 2]
    x, y = x[keep], y[keep].clone()
    if label_noise:
        flip = torch.rand(len(y), generator=g) < label_noise
        y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        batch = torch.randint(0, len(y), (64,), generator=g)
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimiser.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class DigitsSetup:
    data: DigitsData
    start: dict[str, torch.Tensor]
    ingredients: list[dict[str, torch.Tensor]]
    paths: list[Path]
    make_evaluator: Callable[[], DigitsEvaluator]


@pytest.fixture(scope="session")
def digits_setup(tmp_path_factory: pytest.TempPathFactory) -> DigitsSetup:
    """A start model trained briefly, then 8 ingredients fine-tuned from it with different seeds/lr/noise."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    data = load_digits_data()
    start = finetune(make_mlp().state_dict(), data, seed=100, lr=0.05, steps=40)
    settings = [(0.05, 60, 0.0), (0.1, 60, 0.0), (0.02, 80, 0.0), (0.2, 40, 0.3), (0.05, 100, 0.1),
                (0.3, 30, 0.5), (0.08, 60, 0.0), (0.15, 50, 0.2)]
    ingredients = [finetune(start, data, seed=i, lr=lr, steps=steps, label_noise=noise)
                   for i, (lr, steps, noise) in enumerate(settings)]
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i, sd in enumerate(ingredients):
        paths.append(folder / f"ft{i}.safetensors")
        save_file(sd, str(paths[-1]))
    return DigitsSetup(data, start, ingredients, paths, lambda: DigitsEvaluator(data))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """These models are tiny: one intra-op thread is fastest, and on a shared 2-core machine several threads per
    process oversubscribe the cores (a 20-step CNN fine-tune goes from 0.1 s to 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cnn_ingredients(tmp_path_factory: pytest.TempPathFactory):
    """A start CNN trained briefly on the digits train split, then 6 short fine-tunes (some with label noise)."""
    from soupkit.demo_train import digits_cnn
    from soupkit.eval.data.digits import load_digits_split
    from soupkit.io import save_checkpoint

    x, y = load_digits_split("train", size=16)

    def train(model, seed, lr, steps, noise=0.0):
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        for _ in range(steps):
            i = torch.randint(0, len(y), (32,), generator=g)
            labels = y[i].clone()
            flip = torch.rand(len(i), generator=g) < noise
            labels[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), labels).backward()
            opt.step()
        return model

    torch.manual_seed(0)
    start = train(digits_cnn(), 100, 0.1, 40).state_dict()
    folder = tmp_path_factory.mktemp("cnn")
    paths = []
    for i, (lr, steps, noise) in enumerate([(0.05, 12, 0.0), (0.1, 10, 0.0), (0.02, 15, 0.0), (0.2, 10, 0.4),
                                            (0.05, 12, 0.2), (0.3, 8, 0.6)]):
        model = digits_cnn()
        model.load_state_dict(start)
        paths.append(save_checkpoint(train(model, i, lr, steps, noise).state_dict(), folder / f"ft{i}.safetensors"))
    return paths
