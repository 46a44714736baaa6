"""Properties each method must have whatever its inputs: endpoints, degenerate parameters, seeding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import soupkit
from soupkit.io import load_checkpoint
from soupkit.merging.methods.dare import uniforms
from tests.merging.methods._common import FLOAT_KEYS, assert_close, np64, ref_uniforms, task_states, write


def test_task_arithmetic_scaling_zero_is_the_base() -> None:
    base, models = task_states(3)
    out = soupkit.merge(models, "task_arithmetic", base=base, scaling=0.0)
    assert all(torch.equal(out[k], base[k]) for k in base)


def test_ties_full_density_agreeing_signs_is_base_plus_mean_delta() -> None:
    base, models = task_states(3)
    g = torch.Generator().manual_seed(1)
    for key in FLOAT_KEYS:  # every task vector positive where the first is, negative elsewhere
        sign = torch.sign(torch.randn(base[key].shape, generator=g))
        for m in models:
            m[key] = base[key] + sign * (0.1 + (m[key] - base[key]).abs())
    out = soupkit.merge(models, "ties", base=base, density=1.0)
    for key in FLOAT_KEYS:
        mean_delta = np.mean([np64(m, key) - np64(base, key) for m in models], axis=0)
        assert_close(out[key], np64(base, key) + mean_delta)


def test_ties_keeps_only_the_elected_sign() -> None:
    base = {"w": torch.zeros(3)}
    models = [{"w": torch.tensor([3.0, -1.0, 2.0])}, {"w": torch.tensor([-1.0, -1.0, -2.0])},
              {"w": torch.tensor([1.0, 4.0, -1.0])}]
    out = soupkit.merge(models, "ties", base=base, density=1.0)["w"]
    # sums 3, 2, -1 -> signs +, +, -; disjoint means (3+1)/2, 4/1, (-2-1)/2
    assert torch.allclose(out, torch.tensor([2.0, 4.0, -1.5]))
    trimmed = soupkit.merge(models, "ties", base=base, density=[0.34, 0.34, 0.34])["w"]  # top-1 entry each
    assert torch.allclose(trimmed, torch.tensor([3.0, 4.0, -2.0]))


def test_dare_without_dropping_equals_linear_and_ties() -> None:
    base, models = task_states(3)
    weights = [0.2, 0.3, 0.5]
    dare = soupkit.merge(models, "dare_linear", base=base, drop_rate=0.0, weights=weights)
    linear = soupkit.merge(models, "linear", weights=weights)
    for key in FLOAT_KEYS:
        torch.testing.assert_close(dare[key], linear[key], rtol=1e-6, atol=1e-6)
    dare_ties = soupkit.merge(models, "dare_ties", base=base, drop_rate=0.0, density=0.4, weights=weights)
    ties = soupkit.merge(models, "ties", base=base, density=0.4, weights=weights)
    assert all(torch.equal(dare_ties[k], ties[k]) for k in base)


def test_dare_drops_about_p_and_rescales() -> None:
    base = {"w": torch.zeros(20_000)}
    model = {"w": torch.ones(20_000)}
    out = soupkit.merge([model], "dare_linear", base=base, drop_rate=0.75, seed=4)["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.all(out[kept] == 4.0)  # survivors scaled by 1 / (1 - p)


def test_dare_hash_matches_splitmix64_reference() -> None:
    from soupkit.merging.methods.dare import stream_key

    for seed, key, index in [(0, "a", 0), (123456789, "layers.0.weight", 5)]:
        u = uniforms(stream_key(seed, key, index), 0, 50)
        np.testing.assert_array_equal(u.numpy(), ref_uniforms(seed, key, index, 50))
        assert torch.equal(uniforms(stream_key(seed, key, index), 17, 50), u[17:])  # offsets are absolute


def _raw(state: dict) -> dict:
    return {k: v.contiguous().view(-1).view(torch.uint8) if v.numel() else v for k, v in state.items()}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_same_seed_is_bit_identical_across_chunking_and_key_order(tmp_path: Path, method: str) -> None:
    base, models = task_states(3)
    paths = [write(tmp_path, f"m{i}", m) for i, m in enumerate(models)]
    reversed_paths = [write(tmp_path, f"r{i}", dict(reversed(list(m.items())))) for i, m in enumerate(models)]
    base_path = write(tmp_path, "base", base)
    outputs = []
    for number, (inputs, chunk) in enumerate([(paths, 7), (paths, 1 << 20), (reversed_paths, 3)]):
        out = tmp_path / f"out{number}.safetensors"
        soupkit.merge(inputs, method, out, base=base_path, drop_rate=0.5, seed=11, chunk_elements=chunk)
        outputs.append(_raw(load_checkpoint(out)))
    for other in outputs[1:]:
        assert other.keys() == outputs[0].keys()
        assert all(torch.equal(other[k], outputs[0][k]) for k in other)
    different = soupkit.merge(paths, method, base=base_path, drop_rate=0.5, seed=12)
    assert not torch.equal(different["head.weight"], load_checkpoint(tmp_path / "out0.safetensors")["head.weight"])


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_endpoints_are_exact(t: float) -> None:
    _, (a, b) = task_states(2, spread=1.0)
    out = soupkit.merge([a, b], "slerp", t=t)
    expected = a if t == 0.0 else b
    assert all(torch.equal(out[k], expected[k]) for k in a)


def test_model_stock_identical_models_give_that_model() -> None:
    base, (model, *_) = task_states(1)
    out = soupkit.merge([model, dict(model), dict(model)], "model_stock", base=base)
    assert all(torch.equal(out[k], model[k]) for k in model)


def test_fisher_equal_fishers_is_the_mean(tmp_path: Path) -> None:
    _, models = task_states(3, spread=1.0)
    fisher = write(tmp_path, "f", {k: torch.full_like(models[0][k], 0.3) for k in FLOAT_KEYS})
    out = soupkit.merge(models, "fisher", fishers=[str(fisher)] * 3)
    mean = soupkit.merge(models, "uniform")
    for key in FLOAT_KEYS:
        torch.testing.assert_close(out[key], mean[key], rtol=1e-6, atol=1e-6)


def test_fisher_by_hand(tmp_path: Path) -> None:
    models = [{"w": torch.tensor([1.0, 2.0, 5.0])}, {"w": torch.tensor([3.0, 6.0, 7.0])}]
    fishers = [write(tmp_path, "f0", {"w": torch.tensor([1.0, 3.0, 0.0])}),
               write(tmp_path, "f1", {"w": torch.tensor([3.0, 1.0, 0.0])})]
    out = soupkit.merge(models, "fisher", fishers=[str(f) for f in fishers])["w"]
    # (1*1 + 3*3) / 4, (3*2 + 1*6) / 4, and both Fishers floored to equal values: the mean
    assert torch.allclose(out, torch.tensor([2.5, 3.0, 6.0]))
    weighted = soupkit.merge(models, "fisher", fishers=[str(f) for f in fishers], weights=[3.0, 1.0])["w"]
    assert torch.allclose(weighted, torch.tensor([(3 * 1 + 3 * 3) / 6, (9 * 2 + 6) / 10, (15 + 7) / 4]))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "model_stock"])
def test_include_exclude_copy_the_rest_from_the_first_input(method: str) -> None:
    base, models = task_states(3)
    full = soupkit.merge(models, method, base=base)
    only_head = soupkit.merge(models, method, base=base, include=["head.*"], exclude=["head.bias"])
    for key in FLOAT_KEYS:
        expected = full[key] if key == "head.weight" else models[0][key]
        assert torch.equal(only_head[key], expected), key
