"""Shared helpers for the merge-method tests: tiny task-vector checkpoints and float64 NumPy references
written from the papers' formulas (independently of soupkit's implementations)."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_state

FLOAT_KEYS = ["conv.weight", "conv.bias", "bn.weight", "bn.running_mean", "head.weight", "head.bias"]
INT_KEYS = ["bn.num_batches_tracked", "pos_ids", "mask"]


def task_states(n: int, *, seed: int = 0, spread: float = 0.1) -> tuple[dict, list[dict]]:
    """A base state dict and ``n`` "fine-tuned" ones: base + a shared direction + a model-specific one."""
    base = tiny_state(1000 + seed)
    shared = tiny_state(2000 + seed)
    models = []
    for i in range(n):
        own = tiny_state(3000 + 17 * seed + i)
        models.append({k: (v + 0.05 * shared[k] + spread * own[k] if v.is_floating_point() else v.clone())
                       for k, v in base.items()})
    return base, models


def write(folder: Path, name: str, state: dict) -> Path:
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def np64(state: dict, key: str) -> np.ndarray:
    return state[key].double().numpy()


def assert_close(actual: torch.Tensor, expected: np.ndarray, tol: float = 2e-5) -> None:
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------ references


def ref_task_arithmetic(base: np.ndarray, models: list[np.ndarray], weights: list[float], scaling: float):
    return base + scaling * sum(w * (m - base) for w, m in zip(weights, models))


def ref_trim(delta: np.ndarray, density: float) -> np.ndarray:
    flat = delta.reshape(-1)
    k = round(density * flat.size)
    kept = np.zeros_like(flat)
    top = np.argsort(-np.abs(flat), kind="stable")[:k]
    kept[top] = flat[top]
    return kept.reshape(delta.shape)


def ref_disjoint_mean(deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    elected = np.sign(sum(w * d for w, d in zip(weights, deltas)))
    numerator = np.zeros_like(deltas[0])
    denominator = np.zeros_like(deltas[0])
    for w, d in zip(weights, deltas):
        agree = (np.sign(d) == elected) & (d != 0)
        numerator += np.where(agree, w * d, 0.0)
        denominator += np.where(agree, w, 0.0)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def ref_ties(base, models, weights, densities, scaling):
    deltas = [ref_trim(m - base, d) for m, d in zip(models, densities)]
    return base + scaling * ref_disjoint_mean(deltas, weights)


def ref_uniforms(seed: int, key: str, index: int, count: int) -> np.ndarray:
    """splitmix64's output function on Python integers: element j of stream s is mix(s + j * gamma)."""
    mask = (1 << 64) - 1
    stream = int.from_bytes(hashlib.blake2b(f"{seed}\x00{key}\x00{index}".encode(), digest_size=8).digest(),
                            "little")
    values = []
    for j in range(count):
        z = (stream + j * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        values.append((z >> 11) * 2.0**-53)
    return np.array(values)


def ref_dare(delta: np.ndarray, p: float, seed: int, key: str, index: int) -> np.ndarray:
    keep = ref_uniforms(seed, key, index, delta.size).reshape(delta.shape) >= p
    return np.where(keep, delta / (1.0 - p), 0.0)


def ref_dare_linear(base, models, weights, p, scaling, seed, key):
    total = sum(weights)
    return base + scaling * sum(w / total * ref_dare(m - base, p, seed, key, i)
                                for i, (w, m) in enumerate(zip(weights, models)))


def ref_dare_ties(base, models, weights, densities, p, scaling, seed, key):
    deltas = [ref_trim(ref_dare(m - base, p, seed, key, i), d) for i, (m, d) in enumerate(zip(models, densities))]
    return base + scaling * ref_disjoint_mean(deltas, weights)


def ref_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    va, vb = a.reshape(-1), b.reshape(-1)
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    cos = float(va @ vb / (na * nb))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def ref_model_stock(base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    deltas = [(m - base).reshape(-1) for m in models]
    cosines = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in itertools.combinations(deltas, 2)]
    cos = float(np.clip(np.mean(cosines), 0.0, 1.0))
    n = len(models)
    t = n * cos / (1 + (n - 1) * cos)
    return t * np.mean(models, axis=0) + (1 - t) * base


def ref_fisher(models: list[np.ndarray], fishers: list[np.ndarray], weights: list[float], floor: float):
    coefficients = [w * np.maximum(f, floor) for w, f in zip(weights, fishers)]
    return sum(c * m for c, m in zip(coefficients, models)) / sum(coefficients)
