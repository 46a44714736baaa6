"""Each merge method against a float64 NumPy reimplementation of its paper's formula, merged both from
in-memory state dicts and streamed from safetensors files in tiny chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import soupkit
from tests.merging.methods._common import (
    FLOAT_KEYS,
    INT_KEYS,
    assert_close,
    np64,
    ref_dare_linear,
    ref_dare_ties,
    ref_fisher,
    ref_model_stock,
    ref_slerp,
    ref_task_arithmetic,
    ref_ties,
    task_states,
    write,
)


def merge_both(tmp_path: Path, method: str, models: list[dict], base: dict | None, **params) -> list[dict]:
    """The merge of in-memory state dicts and the merge of the same tensors streamed from files in 5-element
    chunks; integer buffers come from the first input in both."""
    memory = soupkit.merge(models, method, base=base, **params)
    paths = [write(tmp_path, f"model{i}", m) for i, m in enumerate(models)]
    base_path = write(tmp_path, "base", base) if base is not None else None
    streamed = soupkit.merge(paths, method, base=base_path, chunk_elements=5, **params)
    for out in (memory, streamed):
        assert sorted(out) == sorted(models[0])
        for key in INT_KEYS:
            assert torch.equal(out[key], models[0][key])
    return [memory, streamed]


@pytest.mark.parametrize(("weights", "scaling"), [(None, 1.0), ([0.5, 1.5, -0.25], 0.4)])
def test_task_arithmetic(tmp_path: Path, weights, scaling: float) -> None:
    base, models = task_states(3)
    params = {"scaling": scaling} | ({"weights": weights} if weights else {})
    for out in merge_both(tmp_path, "task_arithmetic", models, base, **params):
        for key in FLOAT_KEYS:
            expected = ref_task_arithmetic(np64(base, key), [np64(m, key) for m in models], weights or [1.0] * 3,
                                           scaling)
            assert_close(out[key], expected)


@pytest.mark.parametrize(("weights", "density", "scaling"),
                         [(None, None, 1.0), ([1.0, 2.0, 0.5], 0.5, 0.8), (None, [0.3, 0.6, 1.0], 1.2)])
def test_ties(tmp_path: Path, weights, density, scaling: float) -> None:
    base, models = task_states(3, spread=0.2)
    params = {"scaling": scaling, "weights": weights, "density": density}
    densities = density if isinstance(density, list) else [density or 0.2] * 3
    for out in merge_both(tmp_path, "ties", models, base, **params):
        for key in FLOAT_KEYS:
            expected = ref_ties(np64(base, key), [np64(m, key) for m in models], weights or [1.0] * 3, densities,
                                scaling)
            assert_close(out[key], expected)


@pytest.mark.parametrize(("weights", "drop_rate", "seed"), [(None, 0.5, 0), ([1.0, 3.0, 2.0], 0.9, 7)])
def test_dare_linear(tmp_path: Path, weights, drop_rate: float, seed: int) -> None:
    base, models = task_states(3)
    params = {"weights": weights, "drop_rate": drop_rate, "seed": seed, "scaling": 0.7}
    for out in merge_both(tmp_path, "dare_linear", models, base, **params):
        for key in FLOAT_KEYS:
            expected = ref_dare_linear(np64(base, key), [np64(m, key) for m in models], weights or [1.0] * 3,
                                       drop_rate, 0.7, seed, key)
            assert_close(out[key], expected)


@pytest.mark.parametrize(("density", "drop_rate"), [(None, 0.3), (0.5, 0.6)])
def test_dare_ties(tmp_path: Path, density, drop_rate: float) -> None:
    base, models = task_states(3, spread=0.2)
    params = {"density": density, "drop_rate": drop_rate, "seed": 3, "weights": [1.0, 0.5, 2.0]}
    for out in merge_both(tmp_path, "dare_ties", models, base, **params):
        for key in FLOAT_KEYS:
            expected = ref_dare_ties(np64(base, key), [np64(m, key) for m in models], [1.0, 0.5, 2.0],
                                     [density or 1.0] * 3, drop_rate, 1.0, 3, key)
            assert_close(out[key], expected)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.85])
def test_slerp(tmp_path: Path, t: float) -> None:
    _, (a, b) = task_states(2, spread=1.0)
    b["bn.weight"] = a["bn.weight"] * 3.0  # parallel: the linear fallback
    b["conv.bias"] = torch.zeros_like(a["conv.bias"])  # a zero-norm tensor: the linear fallback
    for out in merge_both(tmp_path, "slerp", [a, b], None, t=t):
        for key in FLOAT_KEYS:
            assert_close(out[key], ref_slerp(np64(a, key), np64(b, key), t))
        # SLERP proper keeps the norm between the endpoints' (a straight average shrinks it)
        norm = float(out["head.weight"].norm())
        assert norm > float(((1 - t) * a["head.weight"] + t * b["head.weight"]).norm())


@pytest.mark.parametrize("n", [2, 4])
def test_model_stock(tmp_path: Path, n: int) -> None:
    base, models = task_states(n, spread=0.05)
    for out in merge_both(tmp_path, "model_stock", models, base):
        for key in FLOAT_KEYS:
            assert_close(out[key], ref_model_stock(np64(base, key), [np64(m, key) for m in models]))


def test_model_stock_interpolates_between_base_and_average() -> None:
    # orthogonal task vectors (cos 0): the base; equal task vectors (cos 1): the average
    base = {"w": torch.zeros(2)}
    orthogonal = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    assert torch.equal(soupkit.merge(orthogonal, "model_stock", base=base)["w"], torch.zeros(2))
    half = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}]  # cos = 1/sqrt(2)
    cos = 2**-0.5
    t = 2 * cos / (1 + cos)
    np.testing.assert_allclose(soupkit.merge(half, "model_stock", base=base)["w"].numpy(), [t, t / 2], rtol=1e-6)


def fisher_files(tmp_path: Path, models: list[dict], keys: list[str]) -> tuple[list[Path], list[dict]]:
    g = torch.Generator().manual_seed(5)
    fishers = [{k: torch.rand(m[k].shape, generator=g) ** 4 for k in keys} for m in models]
    for f in fishers:
        f[keys[0]].reshape(-1)[:3] = 0.0  # below the floor
    return [write(tmp_path, f"fisher{i}", f) for i, f in enumerate(fishers)], fishers


@pytest.mark.parametrize("weights", [None, [1.0, 0.25, 2.0]])
def test_fisher(tmp_path: Path, weights) -> None:
    _, models = task_states(3, spread=1.0)
    with_fisher = ["conv.weight", "head.weight", "head.bias"]
    paths, fishers = fisher_files(tmp_path, models, with_fisher)
    w = weights or [1.0] * 3
    for out in merge_both(tmp_path, "fisher", models, None, fishers=[str(p) for p in paths], weights=weights,
                          floor=1e-6):
        for key in FLOAT_KEYS:
            ms = [np64(m, key) for m in models]
            if key in with_fisher:
                expected = ref_fisher(ms, [f[key].double().numpy() for f in fishers], w, 1e-6)
            else:  # no Fisher for this tensor: the plain weighted mean
                expected = sum(wi * m for wi, m in zip(w, ms)) / sum(w)
            assert_close(out[key], expected, tol=1e-4)


@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.97])
@pytest.mark.parametrize("kind", ["normal", "few distinct values", "heavy tail"])
def test_trim_of_large_tensors_equals_a_stable_sort(density: float, kind: str) -> None:
    # large tensors take the sampled-bracket selection path; the kept set must be exactly a stable sort's top k
    from soupkit.merging.methods.ties import trim
    from tests.merging.methods._common import ref_trim

    g = torch.Generator().manual_seed(7)
    n = 1_200_000
    if kind == "normal":
        delta = torch.randn(n, generator=g)
    elif kind == "few distinct values":  # ties everywhere, at the cut too
        delta = torch.randint(-3, 4, (n,), generator=g).float()
    else:
        delta = torch.randn(n, generator=g) ** 5
    got = trim(delta, density).numpy()
    np.testing.assert_array_equal(got, ref_trim(delta.numpy(), density))
