"""mergekit configs: soupkit must compute what mergekit computes. The references below are float64 NumPy
re-statements of mergekit's documented conventions (its generalized task arithmetic, linear, slerp and
model_stock), written independently of soupkit's methods."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from soupkit.errors import RecipeError
from soupkit.merging.config import load_merge_config, merge_from_config
from tests.conftest import snapshot

N_LAYERS = 3
KEYS = (["model.embed_tokens.weight"]
        + [f"model.layers.{i}.{m}.weight" for i in range(N_LAYERS) for m in ("self_attn.q_proj", "mlp.up_proj")]
        + ["model.norm.weight", "lm_head.weight"])
#: mergekit's gradient position of each tensor: layer i at i / (L - 1), every tensor outside the layers at 0
#: (embeddings, and the final norm and lm_head too: mergekit 0.1.5's planner resolves them all at t = 0)
POSITION = {k: (int(k.split(".")[2]) / (N_LAYERS - 1) if ".layers." in k else 0.0) for k in KEYS}


@pytest.fixture
def llm(tmp_path: Path) -> Path:
    """A base and three fine-tuned llama-shaped checkpoints (7 x 5 tensors, distinct magnitudes)."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(7, 5, generator=g) for k in KEYS}
    save_file(base, str(tmp_path / "base.safetensors"))
    for j in range(3):
        save_file({k: v + 0.1 * torch.randn(7, 5, generator=g) for k, v in base.items()},
                  str(tmp_path / f"m{j}.safetensors"))
    return tmp_path


def load(folder: Path, name: str) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(str(folder / f"{name}.safetensors")).items()}


def write_config(folder: Path, config: dict, name: str = "mk.yml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def gta_config(method: str, models: list[dict], **parameters) -> dict:
    return {"merge_method": method, "base_model": "base.safetensors",
            "models": [{"model": f"m{j}.safetensors", "parameters": p} for j, p in enumerate(models)],
            **({"parameters": parameters} if parameters else {})}


def merged(folder: Path, config: dict, **overrides) -> dict[str, np.ndarray]:
    result = merge_from_config(write_config(folder, config), **overrides)
    return {k: v.double().numpy() for k, v in result.items()}


# ------------------------------------------------------------------------------ mergekit, restated


def ref_magnitude(delta: np.ndarray, density: float) -> np.ndarray:
    """mergekit's magnitude sparsification: keep k = int(density * n) largest |delta| (all at density >= 1)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.size))
    kept = np.zeros(delta.size)
    top = np.argsort(-np.abs(delta.reshape(-1)))[:k]
    kept[top] = delta.reshape(-1)[top]
    return kept.reshape(delta.shape)


def ref_gta(base, models, weights, densities, *, consensus: bool, sparsify: bool, normalize: bool, lam=1.0):
    """mergekit's generalized task arithmetic: weights applied first, + elected on a zero sum, the divisor is
    the agreeing weights (or all weights, ~0 -> 1), lambda after."""
    deltas = [ref_magnitude(m - base, d) if sparsify else m - base for m, d in zip(models, densities)]
    weighted = np.stack([w * d for w, d in zip(weights, deltas)])
    w = np.array(weights, dtype=np.float64).reshape(-1, *[1] * base.ndim)
    if consensus:
        majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(weighted) == majority
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0) + np.zeros_like(base)
        divisor[np.abs(divisor) < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def ref_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """mergekit's slerp: lerp when the normalised dot product exceeds 0.9995 in magnitude."""
    n0 = v0 / np.linalg.norm(v0) if np.linalg.norm(v0) > 1e-8 else v0
    n1 = v1 / np.linalg.norm(v1) if np.linalg.norm(v1) > 1e-8 else v1
    dot = np.sum(n0 * n1)
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return np.sin(theta - theta * t) / np.sin(theta) * v0 + np.sin(theta * t) / np.sin(theta) * v1


def ref_model_stock(base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    offsets = [(m - base).reshape(-1) for m in models]
    cosines = [np.clip(offsets[i] @ offsets[j] / max(np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j]),
                                                      1e-6), -1, 1)
               for i in range(len(offsets)) for j in range(i + 1, len(offsets))]
    c, n = np.mean(cosines), len(models)
    t = n * c / (1 + (n - 1) * c)
    return t * sum(models) / n + (1 - t) * base


def close(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=2e-6, atol=2e-6, err_msg=key)


# ------------------------------------------------------------------------------ each shared method


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(llm: Path, normalize: bool) -> None:
    config = {"merge_method": "linear", "parameters": {"normalize": normalize},
              "models": [{"model": "m0.safetensors", "parameters": {"weight": 2.0}},
                         {"model": "m1.safetensors", "parameters": {"weight": 0.5}}]}
    m = [load(llm, "m0"), load(llm, "m1")]
    divisor = 2.5 if normalize else 1.0
    close(merged(llm, config), {k: (2.0 * m[0][k] + 0.5 * m[1][k]) / divisor for k in KEYS})


@pytest.mark.parametrize(("normalize", "lam"), [(False, 1.0), (True, 0.6)])
def test_task_arithmetic(llm: Path, normalize: bool, lam: float) -> None:
    weights = [1.0, 0.5, 0.25]
    config = gta_config("task_arithmetic", [{"weight": w} for w in weights], normalize=normalize, **{"lambda": lam})
    base, models = load(llm, "base"), [load(llm, f"m{j}") for j in range(3)]
    close(merged(llm, config), {k: ref_gta(base[k], [m[k] for m in models], weights, [1] * 3, consensus=False,
                                           sparsify=False, normalize=normalize, lam=lam) for k in KEYS})


@pytest.mark.parametrize(("density", "normalize", "lam"), [(0.29, True, 1.0), (0.5, False, 0.8), (1.0, True, 1.0)])
def test_ties(llm: Path, density: float, normalize: bool, lam: float) -> None:
    weights = [1.0, 0.7, 0.3]
    densities = [density, 0.6, density]
    config = gta_config("ties", [{"weight": w, "density": d} for w, d in zip(weights, densities)],
                        normalize=normalize, **{"lambda": lam})
    base, models = load(llm, "base"), [load(llm, f"m{j}") for j in range(3)]
    close(merged(llm, config), {k: ref_gta(base[k], [m[k] for m in models], weights, densities, consensus=True,
                                           sparsify=True, normalize=normalize, lam=lam) for k in KEYS})


def test_ties_density_gradient(llm: Path) -> None:
    """The README's example: one model's density as a gradient over the layers (np.interp is mergekit's
    piecewise-linear spread of the list over [0, 1])."""
    config = gta_config("ties", [{"weight": 1.0, "density": [1, 0.7, 0.1]}, {"weight": 0.5, "density": 0.5}],
                        normalize=True, int8_mask=True)
    base, models = load(llm, "base"), [load(llm, f"m{j}") for j in range(2)]
    with pytest.warns(UserWarning, match="int8_mask has no effect"):
        out = merged(llm, config)
    expected = {k: ref_gta(base[k], [m[k] for m in models], [1.0, 0.5],
                           [float(np.interp(POSITION[k], [0, 0.5, 1], [1, 0.7, 0.1])), 0.5], consensus=True,
                           sparsify=True, normalize=True) for k in KEYS}
    close(out, expected)


def test_ties_conventions_differ_from_soupkits(llm: Path) -> None:
    """+ is elected where opposite task vectors cancel exactly (soupkit's own ties elects nothing: 0), and
    k = int(0.31 * 35) = 10 entries are kept where round() keeps 11."""
    zero = {k: torch.zeros(7, 5) for k in KEYS}
    save_file(zero, str(llm / "base.safetensors"))
    save_file({k: torch.full((7, 5), 0.5) for k in KEYS}, str(llm / "m0.safetensors"))
    save_file({k: torch.full((7, 5), -0.5) for k in KEYS}, str(llm / "m1.safetensors"))
    config = gta_config("ties", [{"weight": 1.0, "density": 1.0}] * 2)
    out = merged(llm, config)
    assert all((v == 0.5).all() for v in out.values())  # mergekit elects +; soupkit's own ties gives 0
    own = merge_from_config({"method": "ties", "base": str(llm / "base.safetensors"), "parameters": {"density": 1.0},
                             "models": [str(llm / "m0.safetensors"), str(llm / "m1.safetensors")]})
    assert all((v == 0).all() for v in own.values())
    g = torch.Generator().manual_seed(1)
    save_file({k: torch.randn(7, 5, generator=g) for k in KEYS}, str(llm / "m0.safetensors"))
    out = merged(llm, gta_config("ties", [{"weight": 1.0, "density": 0.31}]))
    assert all(np.count_nonzero(v) == int(0.31 * 35) == 10 for v in out.values())  # round() would keep 11


@pytest.mark.parametrize("normalize", [False, True])
def test_dare_ties_and_linear_at_density_one(llm: Path, normalize: bool) -> None:
    weights = [1.0, 0.7, 0.3]
    base, models = load(llm, "base"), [load(llm, f"m{j}") for j in range(3)]
    for method, consensus in (("dare_ties", True), ("dare_linear", False)):
        config = gta_config(method, [{"weight": w, "density": 1.0} for w in weights], normalize=normalize)
        close(merged(llm, config), {k: ref_gta(base[k], [m[k] for m in models], weights, [1] * 3,
                                               consensus=consensus, sparsify=False, normalize=normalize)
                                    for k in KEYS})


def test_dare_density_is_the_keep_fraction(llm: Path) -> None:
    """One model: every entry of the output's task vector is 0 or delta / density, about density of them kept
    (mergekit's masks are random, so only the law can be compared); different seeds give different masks."""
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.zeros(200, 100)}
    save_file(base, str(llm / "base.safetensors"))
    save_file({"w": torch.rand(200, 100, generator=g) + 0.5}, str(llm / "m0.safetensors"))
    config = gta_config("dare_linear", [{"weight": 1.0, "density": 0.25}])
    delta = load(llm, "m0")["w"]
    out = merged(llm, config)["w"]
    kept = out != 0
    np.testing.assert_allclose(out[kept], delta[kept] / 0.25, rtol=1e-6)
    assert abs(kept.mean() - 0.25) < 4 * (0.25 * 0.75 / kept.size) ** 0.5
    assert abs(out.mean() - delta.mean()) < 0.02  # unbiased: the expectation is mergekit's (and the input's)
    assert not np.array_equal(merged(llm, config, seed=1)["w"], out)


def test_dare_densities_per_model(llm: Path) -> None:
    """Each model keeps its own fraction: model 0 (density 1) whole, model 1's entries 0 or delta / 0.4."""
    config = gta_config("dare_linear", [{"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 0.4}])
    base, m0, m1 = load(llm, "base"), load(llm, "m0"), load(llm, "m1")
    out = merged(llm, config)
    for key in KEYS:
        rest = out[key] - base[key] - (m0[key] - base[key])
        kept = np.abs(rest) > 1e-5
        np.testing.assert_allclose(rest[kept], (m1[key] - base[key])[kept] / 0.4, rtol=1e-4, atol=1e-5)
        assert 0 < kept.sum() < kept.size


def test_slerp_with_gradient_and_filters(llm: Path) -> None:
    config = {"merge_method": "slerp", "base_model": "base.safetensors",
              "models": [{"model": "base.safetensors"}, {"model": "m0.safetensors"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                   {"filter": "mlp", "value": [1, 0.2]}, {"value": 0.3}]}}
    base, other = load(llm, "base"), load(llm, "m0")

    def t_of(key: str) -> float:
        p = POSITION[key]
        return p if "self_attn" in key else (1 - p) * 1 + p * 0.2 if "mlp" in key else 0.3

    close(merged(llm, config), {k: ref_slerp(t_of(k), base[k], other[k]) for k in KEYS})


def test_slerp_parallel_tensors_fall_back_to_lerp(llm: Path) -> None:
    base = {"w": torch.arange(1.0, 36.0).reshape(7, 5)}
    save_file(base, str(llm / "base.safetensors"))
    save_file({"w": base["w"] * 3.0 + 1e-3}, str(llm / "m0.safetensors"))
    config = {"merge_method": "slerp", "base_model": "base.safetensors", "models": [{"model": "m0.safetensors"}],
              "parameters": {"t": 0.25}}
    expected = 0.75 * load(llm, "base")["w"] + 0.25 * load(llm, "m0")["w"]
    np.testing.assert_allclose(merged(llm, config)["w"], expected, rtol=1e-6)


def test_slerp_of_a_zero_tensor_takes_mergekits_angle(llm: Path) -> None:
    """mergekit does not normalise a zero tensor: cos = 0, so the result is sin(t pi / 2) v1, not t v1."""
    save_file({"w": torch.zeros(7, 5)}, str(llm / "base.safetensors"))
    save_file({"w": torch.arange(1.0, 36.0).reshape(7, 5)}, str(llm / "m0.safetensors"))
    config = {"merge_method": "slerp", "base_model": "base.safetensors", "models": [{"model": "m0.safetensors"}],
              "parameters": {"t": 0.25}}
    expected = ref_slerp(0.25, load(llm, "base")["w"], load(llm, "m0")["w"])
    np.testing.assert_allclose(expected, np.sin(0.25 * np.pi / 2) * load(llm, "m0")["w"], rtol=1e-12)
    np.testing.assert_allclose(merged(llm, config)["w"], expected, rtol=1e-6)


def test_model_stock(llm: Path) -> None:
    config = {"merge_method": "model_stock", "base_model": "base.safetensors",
              "models": [{"model": f"m{j}.safetensors"} for j in range(3)]}
    base, models = load(llm, "base"), [load(llm, f"m{j}") for j in range(3)]
    close(merged(llm, config), {k: ref_model_stock(base[k], [m[k] for m in models]) for k in KEYS})


def test_linear_weight_gradient_per_model(llm: Path) -> None:
    """A per-model weight given as a gradient; the other model's weight comes from the global parameters."""
    config = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "models": [{"model": "m0.safetensors", "parameters": {"weight": [0.0, 2.0]}},
                         {"model": "m1.safetensors"}]}
    m = [load(llm, "m0"), load(llm, "m1")]
    expected = {k: (2 * POSITION[k] * m[0][k] + m[1][k]) / (2 * POSITION[k] + 1) for k in KEYS}
    close(merged(llm, config), expected)


def test_trivial_slices_and_dtype(llm: Path) -> None:
    config = {"merge_method": "slerp", "base_model": "base.safetensors", "dtype": "bfloat16",
              "slices": [{"sources": [{"model": "base.safetensors", "layer_range": [0, N_LAYERS]},
                                      {"model": "m0.safetensors", "layer_range": [0, N_LAYERS]}]}],
              "parameters": {"t": 0.4}}
    result = merge_from_config(write_config(llm, config))
    base, other = load(llm, "base"), load(llm, "m0")
    assert all(v.dtype == torch.bfloat16 for v in result.values())
    for key in KEYS:
        np.testing.assert_allclose(result[key].double().numpy(), ref_slerp(0.4, base[key], other[key]), rtol=1e-2,
                                   atol=1e-2)


def test_cli_end_to_end(llm: Path, cli) -> None:
    path = write_config(llm, gta_config("ties", [{"weight": 1.0, "density": 0.5}] * 3,
                                        normalize=True, int8_mask=True))
    result = cli("merge", "--config", path, "-o", llm / "out.safetensors")
    assert result.code == 0, result.err
    assert "int8_mask has no effect" in result.err
    base, models = load(llm, "base"), [load(llm, f"m{j}") for j in range(3)]
    close(load(llm, "out"), {k: ref_gta(base[k], [m[k] for m in models], [1.0] * 3, [0.5] * 3, consensus=True,
                                        sparsify=True, normalize=True) for k in KEYS})


# ------------------------------------------------------------------------------ refusals


GOOD = gta_config("ties", [{"weight": 1.0, "density": 0.5}] * 2)
BAD = [
    ({**GOOD, "merge_method": "ramplus_tl"}, r"merge_method: 'ramplus_tl' is not supported; soupkit runs "
                                             r"mergekit's linear, task_arithmetic, ties"),
    ({**GOOD, "tokenizer_source": "union"}, r"tokenizer_source: soupkit does not build tokenizers"),
    ({**GOOD, "chat_template": "chatml"}, r"chat_template: soupkit does not write chat templates"),
    ({**GOOD, "normalize": True}, r"normalize: mergekit reads it from `parameters`"),
    ({**GOOD, "merge_methd": "ties"}, r"merge_methd: unknown mergekit field\. Did you mean 'merge_method'\?"),
    ({**GOOD, "base_model": "meta-llama/Llama-3-8B"}, r"base_model: 'meta-llama/Llama-3-8B' looks like a Hugging "
                                                      r"Face repo id; soupkit reads local files only \(no hub\)"),
    ({**GOOD, "models": [{"model": "nope.safetensors", "parameters": {"weight": 1}}]},
     r"models\[0\]\.model: .*nope\.safetensors: no such file"),
    ({**GOOD, "models": [{"model": "m0.safetensors", "parameters": {"wieght": 1}}]},
     r"models\[0\]\.parameters\.wieght: not a parameter here\. Did you mean 'weight'\?"),
    ({**GOOD, "models": [{"model": "m0.safetensors", "parameters": {"density": 0.5}}]},
     r"models\[0\]\.parameters: no 'weight' \(mergekit requires it for ties\)"),
    ({**GOOD, "models": [{"model": "m0.safetensors", "parameters": {"weight": "x"}}]},
     r"models\[0\]\.parameters\.weight: must be a number, got 'x'"),
    ({**GOOD, "models": [{"model": "m0.safetensors", "parameters": {"weight": 1, "density": 0}}]},
     r"density: must be > 0"),
    ({"merge_method": "model_stock", "base_model": "base.safetensors", "parameters": {"filter_wise": True},
      "models": [{"model": "m0.safetensors"}, {"model": "m1.safetensors"}]}, r"parameters\.filter_wise: true"),
    ({**GOOD, "parameters": {"t": [{"filtr": "mlp", "value": 1}]}}, r"parameters\.t: not a parameter here"),
    ({**GOOD, "parameters": {"normalize": [{"filtr": "mlp", "value": 1}]}},
     r"parameters\.normalize\[0\]: expected \{filter: TEXT, value: \.\.\.\}"),
    ({k: v for k, v in GOOD.items() if k != "base_model"}, r"base_model: mergekit's ties needs a base_model"),
    ({**GOOD, "slices": [{"sources": [{"model": "m0.safetensors", "layer_range": [0, 2]}]}]},
     r"models: give exactly one of models or slices"),
    ({k: v for k, v in GOOD.items() if k != "models"} | {
        "slices": [{"sources": [{"model": "m0.safetensors", "layer_range": [0, 2],
                                 "parameters": {"weight": 1}}]}]},
     r"slices\[0\]: base_model .*base\.safetensors is not one of its sources"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m0.safetensors", "layer_range": [1, 4]}]}]},
     r"slices\[0\]\.sources\[0\]\.layer_range: \[1, 4\]: needs 0 <= start < stop <= 3 \(m0\.safetensors has 3 "
     r"layers\)"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m0.safetensors", "layer_range": [0, 2]},
                                                             {"model": "m1.safetensors", "layer_range": [0, 2]}]}]},
     r"slices\[0\]\.sources: passthrough merges 1 model\(s\) per slice \(besides a base\), got 2"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "m0.safetensors", "layer_range": [0, 2]},
                                                        {"model": "m1.safetensors", "layer_range": [0, 3]}],
                                            "parameters": {"weight": 1}}]},
     r"slices\[0\]\.sources: every source of a slice spans the same number of layers; got \[2, 3\]"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m0.safetensors", "layer_range": [0, 2]}],
                                                 "residual_weight": 0.5}]},
     r"slices\[0\]\.residual_weight: not supported"),
    (gta_config("dare_linear", [{"weight": 1}], rescale=False), r"parameters\.rescale: false"),
    ({"merge_method": "slerp", "base_model": "base.safetensors", "parameters": {"t": 0.5},
      "models": [{"model": "m0.safetensors"}, {"model": "m1.safetensors"}]},
     r"models: slerp interpolates two models, base_model and one other; got 3"),
    ({"merge_method": "slerp", "base_model": "base.safetensors", "parameters": {"t": [0.5, float("nan")]},
      "models": [{"model": "m0.safetensors"}]}, r"parameters\.t\[1\]: must be a finite number, got nan"),
    ({"merge_method": "linear", "base_model": "base.safetensors",
      "models": [{"model": "m0.safetensors", "parameters": {"weight": 1}}]},
     r"base_model: linear does not use a base model unless it is one of the models"),
    ({**GOOD, "dtype": "float8"}, r"dtype: .*unknown dtype 'float8'"),
    ({**GOOD, "models": [{"model": "m0.safetensors+lora", "parameters": {"weight": 1}}]},
     r"MODEL\+LORA syntax is not supported"),
]


@pytest.mark.parametrize(("config", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_fields_are_one_line_errors_naming_file_and_field(llm: Path, config: dict, message: str) -> None:
    path = write_config(llm, config)
    before = snapshot(llm)
    with pytest.raises(RecipeError) as error:
        load_merge_config(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    assert __import__("re").search(message, text), text
    assert snapshot(llm) == before


def test_cli_refusal_exits_2_without_output(llm: Path, cli) -> None:
    path = write_config(llm, {**GOOD, "merge_method": "ram"})  # mergekit's RAM: not in soupkit
    result = cli("merge", "--config", path, "-o", llm / "out.safetensors")
    assert result.code == 2 and "'ram'" in result.err and "Traceback" not in result.err
    assert not (llm / "out.safetensors").exists()


def test_slerp_gradient_over_real_llama_folders(tmp_path: Path, cli) -> None:
    """mergekit's own use case: Hugging Face llama folders in, a folder out that transformers loads; the
    gradient's positions come from the real names (model.layers.N., embed_tokens first, norm/lm_head last)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    for seed, name in ((0, "base"), (1, "tuned")):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp_path / name)
    path = write_config(tmp_path, {"merge_method": "slerp", "base_model": "base", "models": [{"model": "tuned"}],
                                   "parameters": {"t": [0, 1]}})
    result = cli("merge", "--config", path, "-o", tmp_path / "out/")
    assert result.code == 0, result.err
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    tuned = LlamaForCausalLM.from_pretrained(tmp_path / "tuned").state_dict()
    t_of = {"model.embed_tokens.weight": 0.0, "model.norm.weight": 0.0, "lm_head.weight": 0.0,
            "model.layers.1.mlp.up_proj.weight": 0.5, "model.layers.2.self_attn.q_proj.weight": 1.0}
    for key, t in t_of.items():
        expected = ref_slerp(t, base[key].double().numpy(), tuned[key].double().numpy())
        np.testing.assert_allclose(out[key].double().numpy(), expected, rtol=2e-6, atol=2e-6, err_msg=key)
