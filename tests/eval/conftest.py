"""Fixtures for the evaluator tests: the digits CNN briefly trained to three different points (so predictions
vary per example), saved as safetensors, and a small digits recipe over several batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass
class Trained:
    states: list[dict[str, torch.Tensor]]
    paths: list[Path]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models on a shared 2-core machine: a second intra-op thread only spins against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from safetensors.torch import save_file

    from soupkit.eval.data.digits import load_digits_split
    from tests.eval.helpers import make_model

    x, y = load_digits_split("train")
    torch.manual_seed(0)
    model = make_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny backward passes: threads only contend on a shared 2-core machine
    states, folder, done = [], tmp_path_factory.mktemp("digits-ckpts"), 0
    for steps in (0, 10, 40):  # untrained, a little trained, trained
        for _ in range(steps - done):
            batch = torch.randint(0, len(y), (64,), generator=g)
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
        done = steps
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    torch.set_num_threads(threads)
    paths = []
    for i, state in enumerate(states):
        paths.append(folder / f"ckpt{i}.safetensors")
        save_file(state, str(paths[-1]))
    return Trained(states, paths)
