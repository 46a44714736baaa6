"""The mergekit methods soupkit added (breadcrumbs, della, sce, nuslerp, multislerp, karcher, nearswap,
arcee_fusion) and the subspace methods mergekit lacks (tsv, iso_c, iso_cts): each against a float64 NumPy
reference written from its paper or definition, merged in memory and streamed from files; properties the papers
state; bad parameters; the CLI.

The references decide masks (which entries a sparsifier keeps, which sign an election picks) on the float32 task
vectors the engine computes, so that float64 rounding cannot move an entry across a cut; everything else is
float64 arithmetic.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import soupkit
from soupkit.errors import ParameterError
from soupkit.io import load_checkpoint
from tests.merging.methods._common import FLOAT_KEYS, INT_KEYS, assert_close, ref_uniforms, task_states, write

SOUPKIT = Path(sys.executable).with_name("soupkit")


def merge_both(tmp_path: Path, method: str, models: list[dict], base: dict | None, **params) -> list[dict]:
    """The merge of in-memory state dicts and of the same tensors streamed from files in 5-element chunks."""
    memory = soupkit.merge(models, method, base=base, **params)
    paths = [write(tmp_path, f"model{i}", m) for i, m in enumerate(models)]
    base_path = write(tmp_path, "base", base) if base is not None else None
    streamed = soupkit.merge(paths, method, base=base_path, chunk_elements=5, **params)
    for out in (memory, streamed):
        assert sorted(out) == sorted(models[0])
        for key in INT_KEYS:
            assert torch.equal(out[key], models[0][key])
    return [memory, streamed]


def f32_delta(model: dict, base: dict, key: str) -> np.ndarray:
    """theta - base as the engine computes it (float32), in float64."""
    return (model[key].float() - base[key].float()).double().numpy()


def f64(state: dict, key: str) -> np.ndarray:
    return state[key].double().numpy()


# ------------------------------------------------------------------------------ references (from the papers)


def ref_gta(base: np.ndarray, deltas: list[np.ndarray], weights: list[float], *, consensus: bool,
            normalize: bool, scaling: float) -> np.ndarray:
    """Generalised task arithmetic: the weighted (sparsified) task vectors summed, or with TIES' sign election
    (+ on a zero sum) only the agreeing ones; normalised by the (agreeing) weights."""
    weighted = [w * d for w, d in zip(weights, deltas)]
    if consensus:
        elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
        agree = [np.sign(x) == elected for x in weighted]
        mixed = sum(np.where(a, x, 0.0) for a, x in zip(agree, weighted))
        if normalize:
            divisor = sum(a * w for a, w in zip(agree, weights))
            mixed = mixed / np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(weighted)
        if normalize and abs(sum(weights)) >= 1e-8:
            mixed = mixed / sum(weights)
    return base + scaling * mixed


def ref_rescale(delta: np.ndarray, kept: np.ndarray) -> np.ndarray:
    before, after = np.abs(delta).sum(), np.abs(kept).sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def ref_breadcrumbs_mask(delta: np.ndarray, density: float, gamma: float, rescale: bool) -> np.ndarray:
    """Model Breadcrumbs: sort by magnitude, drop the top gamma fraction and the bottom, keep int(density n)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    n = flat.size
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = np.argsort(np.abs(flat).astype(np.float32), kind="stable")
    kept = np.zeros_like(flat)
    chosen = order[bottom:bottom + keep]
    kept[chosen] = flat[chosen]
    kept = kept.reshape(delta.shape)
    return ref_rescale(delta, kept) if rescale else kept


def ref_della_mask(delta: np.ndarray, density: float, epsilon: float, rescale: bool, seed: int, key: str,
                   index: int) -> np.ndarray:
    """DELLA's MagPrune: keep probability density - eps .. density + eps linear in each row's magnitude rank."""
    if density >= 1:
        return delta
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    ranks = np.argsort(np.argsort(np.abs(rows).astype(np.float32), axis=1, kind="stable"), axis=1, kind="stable")
    width = rows.shape[1]
    position = ranks / (width - 1) if width > 1 else np.full(rows.shape, 0.5)
    probability = (density - epsilon + 2 * epsilon * position).reshape(delta.shape)
    draws = ref_uniforms(seed, key, index, delta.size).reshape(delta.shape)
    kept = np.where(draws < probability, delta, 0.0)
    return ref_rescale(delta, kept) if rescale else kept


def ref_sce(base: np.ndarray, deltas: list[np.ndarray], select_topk: float) -> np.ndarray:
    """SCE: Select the top-variance entries, Calculate energy weights, Erase minority signs, average."""
    tvs = np.stack(deltas)
    if select_topk < 1:
        variance = tvs.var(axis=0).reshape(-1)
        k = int(np.count_nonzero(variance) * select_topk)
        mask = np.zeros(variance.size, dtype=bool)
        mask[np.argsort(-variance, kind="stable")[:k]] = True
        tvs = tvs * mask.reshape(tvs.shape[1:])
    elected = np.where(tvs.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(tvs) == elected
    energy = (tvs**2).reshape(len(deltas), -1).mean(axis=1)
    c = energy / energy.sum() if energy.sum() >= 1e-6 else np.full(len(deltas), 1 / len(deltas))
    erased = c.reshape(-1, *[1] * base.ndim) * agree
    return base + (tvs * erased).sum(axis=0) / np.maximum(erased.sum(axis=0), 1e-6)


def ref_nearswap(base: np.ndarray, model: np.ndarray, t: float) -> np.ndarray:
    w = np.clip(t / np.maximum(np.abs(base - model), 1e-6), 0.0, 1.0)
    return w * model + (1 - w) * base


def ref_arcee_fusion(base: np.ndarray, model: np.ndarray) -> np.ndarray:
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(model) + 1e-8, softmax(base) + 1e-8
    scores = np.abs(model - base) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    ordered = np.sort(scores.reshape(-1))

    def quantile(x: float) -> float:
        return ordered[int(x * (ordered.size - 1))]

    threshold = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    return base + (model - base) * (scores >= threshold)


def ref_slerp_vectors(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """SLERP of each vector along the last axis (linear where colinear)."""
    u0 = v0 / np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), 1e-7)
    u1 = v1 / np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-7)
    cos = np.clip((u0 * u1).sum(axis=-1, keepdims=True), -1, 1)
    colinear = 1 - cos**2 <= 1e-16
    theta = np.arccos(np.where(colinear, 0.0, cos))
    with np.errstate(invalid="ignore", divide="ignore"):
        spherical = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
    return np.where(colinear, (1 - t) * v0 + t * v1, spherical)


def ref_nuslerp(a: np.ndarray, b: np.ndarray, weights: list[float], flatten: bool, row_wise: bool) -> np.ndarray:
    t = weights[1] / sum(weights)
    if flatten:
        return ref_slerp_vectors(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    if row_wise and a.ndim > 1:
        return np.swapaxes(ref_slerp_vectors(t, np.swapaxes(a, 0, -1), np.swapaxes(b, 0, -1)), 0, -1)
    return ref_slerp_vectors(t, a, b)


def ref_multislerp(models: list[np.ndarray], weights: list[float], eps: float = 1e-8) -> np.ndarray:
    """Barycentric interpolation on the sphere: tangent space at the weighted mean direction, exp map back,
    norm the weighted mean norm (Goddard's multislerp)."""
    w = np.array(weights) / sum(weights)
    flat = [m.reshape(-1) for m in models]
    norms = np.array([np.linalg.norm(f) for f in flat])
    units = [f / (n + eps) for f, n in zip(flat, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    length = np.linalg.norm(tangent) + eps
    point = mean * np.cos(length) + tangent * np.sin(length) / length
    return (point * (w @ norms)).reshape(models[0].shape)


def ref_karcher(models: list[np.ndarray], iterations: int = 100, tol: float = 1e-12) -> np.ndarray:
    """The Karcher (Fréchet) mean of the unit directions, by Riemannian gradient descent to convergence, times
    the mean norm."""
    flat = [m.reshape(-1) for m in models]
    norms = [np.linalg.norm(f) for f in flat]
    units = [f / n for f, n in zip(flat, norms)]
    mean = sum(units) / np.linalg.norm(sum(units))
    for _ in range(iterations):
        tangent = np.zeros_like(mean)
        for u in units:
            cos = np.clip(mean @ u, -1, 1)
            theta = np.arccos(cos)
            if theta > 1e-15:
                tangent += theta / np.sin(theta) * (u - cos * mean) / len(units)
        step = np.linalg.norm(tangent)
        if step < tol:
            break
        mean = np.cos(step) * mean + np.sin(step) * tangent / step
        mean /= np.linalg.norm(mean)
    return (mean * np.mean(norms)).reshape(models[0].shape)


def ref_polar(matrix: np.ndarray) -> np.ndarray:
    """The nearest matrix with orthonormal columns (or rows): U V^T of the SVD."""
    u, _, vt = np.linalg.svd(matrix, full_matrices=False)
    return u @ vt


def ref_tsv(base: np.ndarray, deltas: list[np.ndarray], scaling: float) -> np.ndarray:
    """TSV-M (Gargiulo et al., Alg. 1): per task the top rank/T singular triplets; stack the U's and V's,
    orthogonalise each stack (Procrustes), rebuild with the stacked singular values. Non-matrices: the mean."""
    if base.ndim != 2:
        return base + scaling * np.mean(deltas, axis=0)
    k = max(1, min(base.shape) // len(deltas))
    svds = [np.linalg.svd(d, full_matrices=False) for d in deltas]
    u = np.concatenate([s[0][:, :k] for s in svds], axis=1)
    sigma = np.concatenate([s[1][:k] for s in svds])
    vt = np.concatenate([s[2][:k] for s in svds], axis=0)
    return base + scaling * ref_polar(u) @ np.diag(sigma) @ ref_polar(vt)


def ref_iso_c(base: np.ndarray, deltas: list[np.ndarray], scaling: float) -> np.ndarray:
    """Iso-C (Marczak et al., Eq. 6): the task-arithmetic sum's singular values all replaced by their mean."""
    if base.ndim != 2:
        return base + scaling * np.mean(deltas, axis=0)
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    return base + scaling * s.mean() * (u @ vt)


def ref_iso_cts(base: np.ndarray, deltas: list[np.ndarray], scaling: float, fraction: float) -> np.ndarray:
    """Iso-CTS (Marczak et al., Alg. 1): top-k common directions of the sum, then per task the top s directions
    of its task matrix with the common subspace projected out; orthogonalise both stacks; isotropic scale."""
    if base.ndim != 2:
        return base + scaling * np.mean(deltas, axis=0)
    n_tasks = len(deltas)
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    rank = s.size
    per_task = min(rank // n_tasks, round((rank - int(rank * fraction)) / n_tasks))
    common = rank - n_tasks * per_task
    us, ss, vts = [u[:, :common]], [s[:common]], [vt[:common]]
    projector = np.eye(base.shape[0]) - u[:, :common] @ u[:, :common].T
    for delta in deltas:
        ui, si, vti = np.linalg.svd(projector @ delta, full_matrices=False)
        us.append(ui[:, :per_task])
        ss.append(si[:per_task])
        vts.append(vti[:per_task])
    sigma = np.concatenate(ss).mean()
    return base + scaling * sigma * ref_polar(np.concatenate(us, axis=1)) @ ref_polar(np.concatenate(vts, axis=0))


# ------------------------------------------------------------------------------ against the references


GTA_CASES = [
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}, False, False, False),
    ("breadcrumbs", {"density": [0.9, 0.5, 0.7], "gamma": [0.01, 0.2, 0.0], "weights": [1.0, -0.5, 2.0],
                     "normalize": True, "rescale": True, "scaling": 0.7}, False, True, True),
    ("breadcrumbs", {}, False, False, False),  # mergekit's defaults: density 1 keeps everything
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1, "weights": [1.0, 0.5, 2.0]}, True, False, False),
    ("breadcrumbs_ties", {"density": 0.9, "normalize": True, "rescale": True, "scaling": 1.3}, True, True, True),
    ("della", {"density": 0.5, "epsilon": 0.2, "seed": 3}, True, True, True),
    ("della", {"density": [0.4, 0.7, 0.9], "epsilon": [0.1, 0.05, 0.0], "weights": [2.0, 1.0, 0.5],
               "normalize": False, "rescale": False, "seed": 11}, True, False, False),
    ("della_linear", {"density": 0.6, "epsilon": 0.15, "weights": [0.5, 0.3, 0.2]}, False, False, True),
    ("della_linear", {"density": 0.3, "epsilon": 0.25, "normalize": True, "scaling": 0.5, "seed": 2}, False, True,
     True),
]


@pytest.mark.parametrize(("method", "params", "consensus", "normalize", "rescale"), GTA_CASES)
def test_generalized_task_arithmetic_family(tmp_path: Path, method: str, params: dict, consensus: bool,
                                            normalize: bool, rescale: bool) -> None:
    base, models = task_states(3, spread=0.2)
    n = len(models)

    def each(name: str, default: float) -> list[float]:
        value = params.get(name, default)
        return list(value) if isinstance(value, list) else [value] * n

    weights, densities = each("weights", 1.0), each("density", 1.0)
    for out in merge_both(tmp_path, method, models, base, **params):
        for key in FLOAT_KEYS:
            deltas = [f32_delta(m, base, key) for m in models]
            if method.startswith("breadcrumbs"):
                gammas = each("gamma", 0.01)
                deltas = [ref_breadcrumbs_mask(d, densities[i], gammas[i], rescale) for i, d in enumerate(deltas)]
            else:
                epsilons = each("epsilon", 0.15)
                deltas = [ref_della_mask(d, densities[i], epsilons[i], rescale, params.get("seed", 0), key, i)
                          for i, d in enumerate(deltas)]
            expected = ref_gta(f64(base, key), deltas, weights, consensus=consensus, normalize=normalize,
                               scaling=params.get("scaling", 1.0))
            assert_close(out[key], expected)


def test_breadcrumbs_drops_the_outliers_and_the_noise() -> None:
    base = {"w": torch.zeros(10)}
    model = {"w": torch.arange(1.0, 11.0)}  # magnitudes 1..10
    out = soupkit.merge([model], "breadcrumbs", base=base, density=0.5, gamma=0.2)["w"]
    # 5 kept, the top 2 (9, 10) dropped as outliers, so the bottom 3 go: 4..8 stay
    assert out.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]
    crowded = soupkit.merge([model], "breadcrumbs", base=base, density=0.9, gamma=0.2)["w"]
    assert crowded.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # 9 kept: only one outlier (10) can go


def test_della_keeps_large_entries_more_often_and_is_seeded() -> None:
    base = {"w": torch.zeros(200, 400)}
    model = {"w": torch.arange(1.0, 401.0).repeat(200, 1)}  # every row ranks its entries the same way
    out = soupkit.merge([model], "della_linear", base=base, density=0.5, epsilon=0.4, rescale=False, seed=1)["w"]
    kept = (out != 0).double().mean(dim=0)  # per column: ~ density - eps .. density + eps
    assert abs(float(kept[:40].mean()) - 0.14) < 0.03 and abs(float(kept[-40:].mean()) - 0.86) < 0.03
    assert abs(float((out != 0).double().mean()) - 0.5) < 0.01
    again = soupkit.merge([model], "della_linear", base=base, density=0.5, epsilon=0.4, rescale=False, seed=1)
    other = soupkit.merge([model], "della_linear", base=base, density=0.5, epsilon=0.4, rescale=False, seed=2)
    assert torch.equal(again["w"], out) and not torch.equal(other["w"], out)
    rescaled = soupkit.merge([model], "della_linear", base=base, density=0.5, epsilon=0.4, seed=1)["w"]
    torch.testing.assert_close(rescaled.abs().sum(), model["w"].abs().sum())  # rescale keeps the L1 norm


def _raw(state: dict) -> dict:
    return {k: v.contiguous().view(-1).view(torch.uint8) if v.numel() else v for k, v in state.items()}


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_same_seed_is_bit_identical_across_chunking_and_key_order(tmp_path: Path, method: str) -> None:
    base, models = task_states(3, spread=0.2)
    paths = [write(tmp_path, f"m{i}", m) for i, m in enumerate(models)]
    reversed_paths = [write(tmp_path, f"r{i}", dict(reversed(list(m.items())))) for i, m in enumerate(models)]
    base_path = write(tmp_path, "base", base)
    params = {"density": 0.5, "epsilon": 0.2, "seed": 9}
    outputs = [_raw(soupkit.merge(inputs, method, base=base_path, chunk_elements=chunk, **params))
               for inputs, chunk in [(paths, 7), (paths, 1 << 20), (reversed_paths, 3)]]
    for other in outputs[1:]:
        assert other.keys() == outputs[0].keys() and all(torch.equal(other[k], outputs[0][k]) for k in other)
    different = soupkit.merge(paths, method, base=base_path, **{**params, "seed": 10})
    assert not torch.equal(_raw(different)["head.weight"], outputs[0]["head.weight"])


def test_degenerate_shapes_merge(tmp_path: Path) -> None:
    """Scalars, empty tensors and one-row/one-column matrices go through every new method."""
    new = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "nearswap", "arcee_fusion", "nuslerp",
           "multislerp", "karcher", "tsv", "iso_c", "iso_cts"]
    g = torch.Generator().manual_seed(0)
    shapes = {"scalar": (), "empty": (0,), "empty_matrix": (3, 0), "one": (1,), "row": (1, 5), "column": (5, 1)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    for method in new:
        spec = soupkit.get_method(method)
        n = max(spec.min_models, min(3, spec.max_models or 3))
        params = {"t": 0.1} if method == "nearswap" else {"density": 0.5, "epsilon": 0.1} if "della" in method else {}
        out = soupkit.merge(models[:n], method, base=base if spec.needs_base else None, **params)
        for key, shape in shapes.items():
            assert out[key].shape == shape and bool(torch.isfinite(out[key]).all()), (method, key)


@pytest.mark.parametrize("select_topk", [1.0, 0.4, 0.05])
def test_sce(tmp_path: Path, select_topk: float) -> None:
    base, models = task_states(3, spread=0.3)
    for out in merge_both(tmp_path, "sce", models, base, select_topk=select_topk):
        for key in FLOAT_KEYS:
            expected = ref_sce(f64(base, key), [f32_delta(m, base, key) for m in models], select_topk)
            assert_close(out[key], expected)


@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 10.0])
def test_nearswap(tmp_path: Path, t: float) -> None:
    base, (model,) = task_states(1, spread=0.3)
    for out in merge_both(tmp_path, "nearswap", [model], base, t=t):
        for key in FLOAT_KEYS:
            assert_close(out[key], ref_nearswap(f64(base, key), f64(model, key), t))
    if t == 10.0:  # every difference is below t: the model itself
        assert all(torch.equal(out[k], model[k]) for k in FLOAT_KEYS)


def test_arcee_fusion(tmp_path: Path) -> None:
    base, (model,) = task_states(1, spread=0.5)
    for out in merge_both(tmp_path, "arcee_fusion", [model], base):
        for key in FLOAT_KEYS:
            assert_close(out[key], ref_arcee_fusion(f64(base, key), f64(model, key)))
        changed = out["head.weight"] != base["head.weight"]
        assert 0 < int(changed.sum()) < changed.numel()  # some updates pass the threshold, not all
        assert torch.equal(out["head.weight"][changed], model["head.weight"][changed])


@pytest.mark.parametrize(("weights", "flatten", "row_wise"),
                         [([1.0, 1.0], True, False), ([0.3, 0.7], False, False), ([2.0, 1.0], False, True)])
def test_nuslerp(tmp_path: Path, weights: list[float], flatten: bool, row_wise: bool) -> None:
    _, (a, b) = task_states(2, spread=1.0)
    b["bn.weight"] = a["bn.weight"] * 3.0  # colinear: the linear fallback
    params = {"weights": weights, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    for out in merge_both(tmp_path, "nuslerp", [a, b], None, **params):
        for key in FLOAT_KEYS:
            assert_close(out[key], ref_nuslerp(f64(a, key), f64(b, key), weights, flatten, row_wise))


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_spherical_methods_with_a_base_interpolate_the_task_vectors(tmp_path: Path, method: str) -> None:
    base, models = task_states(2, spread=1.0)
    weights = [0.4, 0.6]
    for out in merge_both(tmp_path, method, models, base, weights=weights):
        for key in FLOAT_KEYS:
            a, b = f64(models[0], key) - f64(base, key), f64(models[1], key) - f64(base, key)
            merged = ref_nuslerp(a, b, weights, True, False) if method == "nuslerp" else ref_multislerp([a, b],
                                                                                                        weights)
            assert_close(out[key], f64(base, key) + merged)
    assert soupkit.get_method(method).takes_base and not soupkit.get_method(method).needs_base


def test_nuslerp_equals_slerp_at_the_same_t() -> None:
    _, (a, b) = task_states(2, spread=1.0)
    nu = soupkit.merge([a, b], "nuslerp", weights=[0.75, 0.25])
    classic = soupkit.merge([a, b], "slerp", t=0.25)
    for key in FLOAT_KEYS:
        torch.testing.assert_close(nu[key], classic[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_multislerp(tmp_path: Path, weights) -> None:
    _, models = task_states(3, spread=1.0)
    params = {"weights": weights} if weights else {}
    for out in merge_both(tmp_path, "multislerp", models, None, **params):
        for key in FLOAT_KEYS:
            assert_close(out[key], ref_multislerp([f64(m, key) for m in models], weights or [1.0] * 3))


def test_multislerp_of_antipodal_inputs() -> None:
    a = {"w": torch.tensor([1.0, 2.0, -1.0])}
    minus = {"w": -a["w"]}
    two = soupkit.merge([a, minus], "multislerp")["w"]  # two antipodes: the linear fallback
    assert torch.allclose(two, torch.zeros(3), atol=1e-6)
    with pytest.raises(ParameterError, match=r"multislerp: 'w': the weighted mean of the models' directions is "
                                             r"zero.*change --weights"):
        soupkit.merge([a, minus, a, minus], "multislerp")


def test_karcher(tmp_path: Path) -> None:
    _, models = task_states(3, spread=1.0)
    for out in merge_both(tmp_path, "karcher", models, None, max_iter=50, tol=1e-9):
        for key in FLOAT_KEYS:
            assert_close(out[key], ref_karcher([f64(m, key) for m in models]), tol=1e-4)


def test_karcher_mean_on_a_circle_is_the_mean_angle() -> None:
    # points on a circle (an arc shorter than pi): their Karcher mean is at the mean angle, norm the mean norm
    angles, lengths = [0.1, 0.5, 1.2], [1.0, 2.0, 3.0]
    models = [{"w": torch.tensor([r * np.cos(a), r * np.sin(a)], dtype=torch.float32)}
              for a, r in zip(angles, lengths)]
    out = soupkit.merge(models, "karcher", max_iter=100, tol=1e-7)["w"].double().numpy()
    np.testing.assert_allclose(out, 2.0 * np.array([np.cos(0.6), np.sin(0.6)]), rtol=1e-5)


# ------------------------------------------------------------------------------ TSV-M, Iso-C, Iso-CTS


def matrix_states(n: int, *, seed: int = 0) -> tuple[dict, list[dict]]:
    """A base and n fine-tuned state dicts with matrices of several shapes (tall, wide, square), a bias, a norm,
    a convolution and integer buffers."""
    base, models = task_states(n, seed=seed, spread=0.3)
    g = torch.Generator().manual_seed(50 + seed)
    for key, shape in {"tall.weight": (24, 9), "wide.weight": (6, 20), "square.weight": (12, 12)}.items():
        base[key] = torch.randn(shape, generator=g)
        shared = torch.randn(shape, generator=g) * 0.1
        for m in models:
            m[key] = base[key] + shared + 0.2 * torch.randn(shape, generator=g)
    return base, models


MATRIX_KEYS = [*FLOAT_KEYS, "tall.weight", "wide.weight", "square.weight"]


@pytest.mark.parametrize(("n", "scaling"), [(1, 1.0), (3, 1.0), (4, 0.6)])
def test_tsv(tmp_path: Path, n: int, scaling: float) -> None:
    base, models = matrix_states(n)
    for out in merge_both(tmp_path, "tsv", models, base, scaling=scaling):
        for key in MATRIX_KEYS:
            expected = ref_tsv(f64(base, key), [f64(m, key) - f64(base, key) for m in models], scaling)
            assert_close(out[key], expected, tol=1e-4)


def test_tsv_of_one_model_is_that_model() -> None:
    base, (model,) = matrix_states(1)
    out = soupkit.merge([model], "tsv", base=base)
    for key in MATRIX_KEYS:
        torch.testing.assert_close(out[key], model[key], rtol=1e-5, atol=1e-5)


def test_tsv_of_tasks_in_orthogonal_subspaces_is_task_arithmetic() -> None:
    # task matrices of rank <= rank/T on disjoint rows and columns: nothing interferes, so TSV-M keeps each
    # task's whole update and the stacked bases are already orthogonal: the plain sum
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(12, 12, generator=g)}
    models = []
    for i in range(3):
        delta = torch.zeros(12, 12)
        block = slice(4 * i, 4 * i + 4)
        delta[block, block] = torch.randn(4, 2, generator=g) @ torch.randn(2, 4, generator=g)
        models.append({"w": base["w"] + delta})
    out = soupkit.merge(models, "tsv", base=base)["w"]
    expected = soupkit.merge(models, "task_arithmetic", base=base)["w"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "scaling"), [(1, 1.0), (3, 1.0), (4, 1.5)])
def test_iso_c(tmp_path: Path, n: int, scaling: float) -> None:
    base, models = matrix_states(n)
    for out in merge_both(tmp_path, "iso_c", models, base, scaling=scaling):
        for key in MATRIX_KEYS:
            expected = ref_iso_c(f64(base, key), [f64(m, key) - f64(base, key) for m in models], scaling)
            assert_close(out[key], expected, tol=1e-4)


@pytest.mark.parametrize(("n", "fraction", "scaling"), [(3, 0.8, 1.0), (2, 0.5, 1.2), (4, 0.0, 1.0), (3, 1.0, 1.0)])
def test_iso_cts(tmp_path: Path, n: int, fraction: float, scaling: float) -> None:
    base, models = matrix_states(n)
    params = {"common_space_fraction": fraction, "scaling": scaling}
    for out in merge_both(tmp_path, "iso_cts", models, base, **params):
        for key in MATRIX_KEYS:
            expected = ref_iso_cts(f64(base, key), [f64(m, key) - f64(base, key) for m in models], scaling,
                                   fraction)
            assert_close(out[key], expected, tol=1e-4)


@pytest.mark.parametrize(("method", "params"), [("iso_c", {}), ("iso_cts", {}), ("iso_cts",
                                                                                 {"common_space_fraction": 0.3})])
def test_isotropic_updates_have_a_flat_spectrum(method: str, params: dict) -> None:
    base, models = matrix_states(3)
    out = soupkit.merge(models, method, base=base, **params)
    for key in ["tall.weight", "wide.weight", "square.weight", "head.weight"]:
        update = (out[key] - base[key]).double()
        s = torch.linalg.svdvals(update)
        assert float(s.max() - s.min()) < 1e-4 * float(s.max()), key
        if method == "iso_c":  # the common value is the mean singular value of the task-arithmetic sum
            total = sum(m[key].double() - base[key].double() for m in models)
            torch.testing.assert_close(s.mean(), torch.linalg.svdvals(total).mean(), rtol=1e-5, atol=0)


def test_iso_cts_with_the_whole_rank_in_common_is_iso_c() -> None:
    base, models = matrix_states(3)
    cts = soupkit.merge(models, "iso_cts", base=base, common_space_fraction=1.0)
    c = soupkit.merge(models, "iso_c", base=base)
    for key in MATRIX_KEYS:
        torch.testing.assert_close(cts[key], c[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_subspace_methods_average_what_is_not_a_matrix(method: str) -> None:
    base, models = matrix_states(3)
    out = soupkit.merge(models, method, base=base, scaling=0.5)
    for key in ["conv.weight", "conv.bias", "bn.weight", "head.bias"]:
        expected = f64(base, key) + 0.5 * np.mean([f64(m, key) - f64(base, key) for m in models], axis=0)
        assert_close(out[key], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "karcher", "della", "sce"])
def test_cuda_matches_cpu(method: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    base, models = matrix_states(3)
    params = {"density": 0.5, "epsilon": 0.1} if method == "della" else {}
    cpu = soupkit.merge(models, method, base=base if soupkit.get_method(method).needs_base else None, **params)
    cuda = soupkit.merge(models, method, base=base if soupkit.get_method(method).needs_base else None,
                         device="cuda", **params)
    for key in MATRIX_KEYS:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ errors and the CLI


ERROR_CASES = [
    ("breadcrumbs", {"density": 0.0}, 3, r"breadcrumbs: density\[0\] must be in \(0, 1\], got 0.0"),
    ("breadcrumbs", {"gamma": [0.1, 1.5, 0.1]}, 3, r"breadcrumbs: gamma\[1\] must be in \[0, 1\], got 1.5"),
    ("breadcrumbs_ties", {"density": [0.5, 0.5]}, 3, r"breadcrumbs_ties: density has 2 values for 3 input models"),
    ("della", {"epsilon": 0.6}, 3, r"della: epsilon\[0\] must be in \[0, 0.5\), got 0.6"),
    ("della", {"density": 0.1, "epsilon": 0.15}, 3,
     r"della: density\[0\] \+/- epsilon\[0\] must lie in \(0, 1\), got density 0.1, epsilon 0.15; lower --epsilon "
     r"below 0.1"),
    ("della_linear", {"density": [1.0, 0.9], "epsilon": 0.1}, 2,
     r"della_linear: density\[1\] \+/- epsilon\[1\] must lie in \(0, 1\), got density 0.9, epsilon 0.1"),
    ("della", {"seed": -1}, 2, r"della: seed must be in \[0, 9223372036854775808\), got -1"),
    ("sce", {"select_topk": 0.0}, 2, r"sce: select_topk must be in \(0, 1\], got 0.0"),
    ("nearswap", {}, 1, r"method 'nearswap' needs parameter t"),
    ("nearswap", {"t": -1.0}, 1, r"nearswap: t must be >= 0, got -1.0"),
    ("nearswap", {"t": 0.1}, 2, r"method 'nearswap' takes exactly 1 input models, got 2"),
    ("arcee_fusion", {}, 2, r"method 'arcee_fusion' takes exactly 1 input models, got 2"),
    ("nuslerp", {}, 3, r"method 'nuslerp' takes exactly 2 input models, got 3"),
    ("multislerp", {"weights": [1.0, -1.0]}, 2, r"multislerp: weights sum to 0 and cannot be normalised"),
    ("multislerp", {"eps": 0.0}, 2, r"multislerp: eps must be > 0, got 0.0"),
    ("karcher", {"max_iter": 0}, 2, r"karcher: max_iter must be >= 1, got 0"),
    ("karcher", {"tol": 1.5, "max_iter": 2.5}, 2, r"karcher: max_iter must be an integer, got 2.5"),
    ("iso_cts", {"common_space_fraction": 1.2}, 2, r"iso_cts: common_space_fraction must be in \[0, 1\], got 1.2"),
    ("tsv", {"scaling": "x"}, 2, r"tsv: scaling must be a number, got x"),
    ("iso_c", {"sclaing": 1.0}, 2, r"method 'iso_c' has no parameter 'sclaing'. Did you mean 'scaling'\?"),
]


@pytest.mark.parametrize(("method", "params", "n", "message"), ERROR_CASES)
def test_parameter_errors(method: str, params: dict, n: int, message: str) -> None:
    base, models = task_states(n)
    needs_base = soupkit.get_method(method).needs_base
    with pytest.raises(ParameterError, match=message) as caught:
        soupkit.merge(models, method, base=base if needs_base else None, **params)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "della", "breadcrumbs_ties", "sce"])
def test_no_base_is_one_line(method: str) -> None:
    _, models = task_states(2)
    with pytest.raises(ParameterError, match=rf"method '{method}' needs a base model \(--base\)"):
        soupkit.merge(models, method)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    base, models = matrix_states(3)
    write(tmp_path, "base", base)
    for i, m in enumerate(models):
        write(tmp_path, f"m{i}", m)
    return tmp_path


CLI_RUNS = [
    (["--method", "tsv", "--base", "base.safetensors", "--scaling", "0.8"], {"scaling": 0.8}),
    (["--method", "iso_c", "--base", "base.safetensors"], {}),
    (["--method", "iso_cts", "--base", "base.safetensors", "--common-space-fraction", "0.5"],
     {"common_space_fraction": 0.5}),
    (["--method", "della", "--base", "base.safetensors", "--density", "0.5,0.6,0.7", "--epsilon", "0.1",
      "--seed", "4", "--weights", "1,2,1"],
     {"density": [0.5, 0.6, 0.7], "epsilon": 0.1, "seed": 4, "weights": [1, 2, 1]}),
    (["--method", "breadcrumbs", "--base", "base.safetensors", "--density", "0.8", "--gamma", "0.05",
      "--rescale", "true"], {"density": 0.8, "gamma": 0.05, "rescale": True}),
    (["--method", "multislerp", "--weights", "1,2,3"], {"weights": [1, 2, 3]}),
    (["--method", "multislerp", "--base", "base.safetensors"], {}),
]


@pytest.mark.parametrize(("args", "params"), CLI_RUNS, ids=[a[1] for a, _ in CLI_RUNS])
def test_cli_runs_match_the_library(folder: Path, cli, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                    params: dict) -> None:
    monkeypatch.chdir(folder)
    inputs = [f"m{i}.safetensors" for i in range(3)]
    result = cli("merge", *inputs, *args, "-q", "-o", "out.safetensors")
    assert result.code == 0, result.err
    method = args[1]
    base = folder / "base.safetensors" if "--base" in args else None
    expected = soupkit.merge([folder / p for p in inputs], method, base=base, **params)
    written = load_checkpoint(folder / "out.safetensors")
    assert all(torch.equal(written[k], expected[k]) for k in expected)


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "della", "--base", "base.safetensors", "--density", "0.2", "--epsilon", "0.3"],
     "della: density[0] +/- epsilon[0] must lie in (0, 1), got density 0.2, epsilon 0.3; lower --epsilon below 0.2"),
    (["--method", "breadcrumbs", "--base", "base.safetensors", "--gamma", "2"], "breadcrumbs: --gamma[0] must be in "
                                                                               "[0, 1], got 2"),
    (["--method", "iso_cts", "--base", "base.safetensors", "--common-space-fraction", "-1"],
     "iso_cts: --common-space-fraction must be in [0, 1], got -1"),
    (["--method", "tsv"], "method 'tsv' needs a base model (--base)"),
])
def test_cli_errors_are_one_line_and_write_nothing(folder: Path, cli, monkeypatch: pytest.MonkeyPatch,
                                                   args: list[str], message: str) -> None:
    monkeypatch.chdir(folder)
    result = cli("merge", "m0.safetensors", "m1.safetensors", *args, "-o", "out.safetensors")
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.err
    assert not (folder / "out.safetensors").exists()


def test_cli_subprocess_tsv_on_cpu(folder: Path) -> None:
    result = subprocess.run([str(SOUPKIT), "merge", "m0.safetensors", "m1.safetensors", "m2.safetensors", "-m",
                             "tsv", "--base", "base.safetensors", "--device", "cpu", "-q", "-o", "tsv.safetensors"],
                            cwd=folder, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written = load_checkpoint(folder / "tsv.safetensors")
    expected = soupkit.merge([folder / f"m{i}.safetensors" for i in range(3)], "tsv", base=folder / "base.safetensors")
    # the SVDs' last bits depend on the BLAS thread count, which the suite's fixtures change in this process
    for key in expected:
        torch.testing.assert_close(written[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.2), (0.95, 0.1), (0.001, 0.0), (0.3, 0.9)])
@pytest.mark.parametrize("kind", ["normal", "few distinct values"])
def test_breadcrumbs_mask_equals_a_stable_sort(density: float, gamma: float, kind: str) -> None:
    # the mask is found by two selections, not a sort; it must be exactly a stable sort's positions, ties included
    from soupkit.merging.sparsify import magnitude_outliers

    g = torch.Generator().manual_seed(4)
    n = 200_003
    delta = torch.randn(n, generator=g) if kind == "normal" else torch.randint(-3, 4, (n,), generator=g).float()
    got = magnitude_outliers(delta, density, gamma).numpy()
    np.testing.assert_array_equal(got, ref_breadcrumbs_mask(delta.double().numpy(), density, gamma, False))


@pytest.mark.parametrize(("method", "flags", "params"), [("nearswap", ["--t", "0.01"], {"t": 0.01}),
                                                         ("arcee_fusion", [], {})])
def test_cli_one_model_and_a_base(folder: Path, cli, monkeypatch: pytest.MonkeyPatch, method: str, flags: list[str],
                                  params: dict) -> None:
    monkeypatch.chdir(folder)
    result = cli("merge", "m0.safetensors", "--base", "base.safetensors", "-m", method, *flags, "-q", "-o",
                 "out.safetensors")
    assert result.code == 0, result.err
    expected = soupkit.merge([folder / "m0.safetensors"], method, base=folder / "base.safetensors", **params)
    written = load_checkpoint(folder / "out.safetensors")
    assert all(torch.equal(written[k], expected[k]) for k in expected)
