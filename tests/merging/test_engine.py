"""The streaming merge engine and the foundation methods (uniform, linear, wise) against float64 references."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import soupkit
from soupkit.errors import IncompatibleCheckpointsError, NonFiniteError, ParameterError
from soupkit.io import load_checkpoint
from soupkit.io.safetensors_io import SafetensorsWriter
from soupkit.merging import SoupkitWarning, get_method, list_methods
from tests.conftest import digest, snapshot, tiny_state

FLOAT_KEYS = ["conv.weight", "conv.bias", "bn.weight", "bn.running_mean", "head.weight", "head.bias"]


def reference(states: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {k: sum(w * s[k].double().numpy() for w, s in zip(weights, states)) / total for k in FLOAT_KEYS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_uniform_matches_float64_reference(make_ckpt, dtype: torch.dtype) -> None:
    states = [tiny_state(i, dtype=dtype) for i in range(4)]
    paths = [make_ckpt(f"m{i}", state=s) for i, s in enumerate(states)]
    out = soupkit.uniform_soup(paths)
    ref = reference(states, [1, 1, 1, 1])
    # accumulation is fp32 whatever the storage dtype: the only error left is the final cast to `dtype`
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for key in FLOAT_KEYS:
        assert out[key].dtype == dtype
        np.testing.assert_allclose(out[key].double().numpy(), ref[key], rtol=tolerance, atol=tolerance)
        expected = torch.from_numpy(ref[key]).to(dtype)
        assert (out[key].float() - expected.float()).abs().max() <= (expected.float().abs().max() * tolerance)


def test_linear_weights_normalised_and_raw(make_ckpt) -> None:
    states = [tiny_state(i) for i in range(3)]
    paths = [make_ckpt(f"m{i}", state=s) for i, s in enumerate(states)]
    weights = [0.2, 0.5, 1.3]
    out = soupkit.merge(paths, "linear", weights=weights)
    ref = reference(states, weights)
    for key in FLOAT_KEYS:
        np.testing.assert_allclose(out[key].double().numpy(), ref[key], rtol=1e-5, atol=1e-6)
    raw = soupkit.merge(paths, "linear", weights=weights, normalize=False)
    for key in FLOAT_KEYS:
        np.testing.assert_allclose(raw[key].double().numpy(), ref[key] * sum(weights), rtol=1e-5, atol=1e-5)
    mixed = soupkit.merge(paths, "linear", weights=[1.0, -0.5, 1.5])
    for key in FLOAT_KEYS:
        np.testing.assert_allclose(mixed[key].double().numpy(), reference(states, [1.0, -0.5, 1.5])[key],
                                   rtol=1e-5, atol=1e-5)


def test_precise_accumulates_in_float64(make_ckpt) -> None:
    states = [tiny_state(i, dtype=torch.float64) for i in range(3)]
    paths = [make_ckpt(f"m{i}", state=s) for i, s in enumerate(states)]
    out = soupkit.uniform_soup(paths, precise=True)
    ref = reference(states, [1, 1, 1])
    for key in FLOAT_KEYS:
        np.testing.assert_allclose(out[key].numpy(), ref[key], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0, 1.5])
def test_wise_formula_and_exact_endpoints(make_ckpt, alpha: float) -> None:
    zs, ft = tiny_state(0, dtype=torch.bfloat16), tiny_state(1, dtype=torch.bfloat16)
    paths = [make_ckpt("zs", state=zs), make_ckpt("ft", state=ft)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = soupkit.wise_ft(*paths, alpha=alpha)
    assert any(issubclass(w.category, SoupkitWarning) for w in caught) == (alpha > 1)
    for key in FLOAT_KEYS:
        expected = (1 - alpha) * zs[key].double() + alpha * ft[key].double()
        np.testing.assert_allclose(out[key].double().numpy(), expected.numpy(), rtol=8e-3, atol=8e-3)
    if alpha in (0.0, 1.0):
        endpoint = zs if alpha == 0.0 else ft
        assert all(torch.equal(out[k], endpoint[k]) for k in endpoint)


def test_wise_several_alphas_one_pass(tmp_path: Path, make_ckpt) -> None:
    paths = [make_ckpt("zs", 0), make_ckpt("ft", 1)]
    written = soupkit.wise_ft(*paths, alpha=[0.3, 0.7], output=tmp_path / "wise.safetensors")
    assert [p.name for p in written] == ["wise_alpha0.30.safetensors", "wise_alpha0.70.safetensors"]
    single = soupkit.wise_ft(*paths, alpha=0.7)
    again = load_checkpoint(written[1])
    assert all(torch.equal(again[k], single[k]) for k in single)


def test_integer_buffers_copied_from_first_and_disagreement_warned(make_ckpt) -> None:
    a, b = tiny_state(0), tiny_state(1)
    b["bn.num_batches_tracked"] = torch.tensor(7)
    paths = [make_ckpt("a", state=a), make_ckpt("b", state=b)]
    with pytest.warns(SoupkitWarning, match="'bn.num_batches_tracked': integer tensor differs"):
        out = soupkit.uniform_soup(paths)
    assert out["bn.num_batches_tracked"].item() == 100 and out["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(out["pos_ids"], a["pos_ids"]) and out["mask"].dtype == torch.bool


def test_dtype_option_casts_floats_only(make_ckpt) -> None:
    paths = [make_ckpt("a", 0), make_ckpt("b", 1)]
    out = soupkit.uniform_soup(paths, dtype="bf16")
    assert out["head.weight"].dtype == torch.bfloat16 and out["pos_ids"].dtype == torch.int64


def test_streaming_in_chunks_equals_in_memory(tmp_path: Path, make_ckpt) -> None:
    states = [tiny_state(i) for i in range(3)]
    paths = [make_ckpt(f"m{i}", state=s) for i, s in enumerate(states)]
    whole = soupkit.merge(paths, "linear", weights=[1, 2, 3])
    for chunk in (1, 7, 100):
        chunked = soupkit.merge(states, "linear", weights=[1, 2, 3], chunk_elements=chunk)
        assert all(torch.equal(whole[k], chunked[k]) for k in whole), chunk
    written = soupkit.merge(paths, "linear", tmp_path / "s.safetensors", weights=[1, 2, 3], chunk_elements=5)
    back = load_checkpoint(written)
    assert all(torch.equal(whole[k], back[k]) for k in whole)


def test_allow_missing_averages_over_holders(make_ckpt) -> None:
    a, b = tiny_state(0), tiny_state(1)
    a["extra"] = torch.full((3,), 2.0)
    b.pop("head.bias")
    paths = [make_ckpt("a", state=a), make_ckpt("b", state=b)]
    with pytest.raises(IncompatibleCheckpointsError, match="b.safetensors lacks 2 key.* that .*a.safetensors has"):
        soupkit.uniform_soup(paths)
    out = soupkit.uniform_soup(paths, allow_missing=True)
    assert torch.equal(out["extra"], a["extra"]) and torch.equal(out["head.bias"], a["head.bias"])


def test_incompatible_inputs_name_keys_and_files(make_ckpt) -> None:
    a, b = tiny_state(0), tiny_state(1)
    b["head.weight"] = torch.randn(12, 8)
    paths = [make_ckpt("a", state=a), make_ckpt("b", state=b)]
    with pytest.raises(IncompatibleCheckpointsError, match=r"shape mismatch at 'head.weight': .*a.safetensors has "
                                                           r"\(10, 8\), .*b.safetensors has \(12, 8\)"):
        soupkit.uniform_soup(paths)
    c = tiny_state(2)
    c["head.bias"] = torch.arange(10)
    with pytest.raises(IncompatibleCheckpointsError, match="dtype mismatch at 'head.bias'"):
        soupkit.uniform_soup([paths[0], make_ckpt("c", state=c)])


def test_empty_checkpoints_are_refused_not_merged_into_nothing(make_ckpt) -> None:
    paths = [make_ckpt("a", state={}), make_ckpt("b", state={})]
    with pytest.raises(IncompatibleCheckpointsError, match="a.safetensors: no tensors to merge"):
        soupkit.uniform_soup(paths)


def test_nonfinite_inputs_refused_unless_allowed(make_ckpt) -> None:
    bad = tiny_state(1)
    bad["head.weight"][0, 0] = float("nan")
    paths = [make_ckpt("a", 0), make_ckpt("nan", state=bad)]
    with pytest.raises(NonFiniteError, match=r"nan.safetensors: tensor 'head.weight' contains NaN"):
        soupkit.uniform_soup(paths)
    out = soupkit.uniform_soup(paths, allow_nonfinite=True)
    assert torch.isnan(out["head.weight"][0, 0])


@pytest.mark.parametrize("method", ["uniform", "linear", "wise"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_each_nonfinite_input_is_named_whichever_check_finds_it(make_ckpt, method: str, value: float) -> None:
    # uniform checks its output (NaN/Inf always propagate through a mean) and re-reads to name the culprit;
    # the other methods check every input: the same message either way
    for position in (0, 1):
        states = [tiny_state(0), tiny_state(1)]
        states[position]["head.weight"][3, 4] = value
        paths = [make_ckpt(f"in{i}_{position}", state=s) for i, s in enumerate(states)]
        with pytest.raises(NonFiniteError, match=rf"in{position}_{position}.safetensors: tensor 'head.weight' "):
            soupkit.merge(paths, method=method, chunk_elements=7)


def test_a_mean_that_overflows_float32_is_refused_with_a_hint(make_ckpt) -> None:
    big = {"w": torch.full((4,), 3e38)}
    paths = [make_ckpt("plus", state=big), make_ckpt("minus", state={"w": -big["w"]})]
    with pytest.raises(NonFiniteError, match="'w': the uniform of these finite inputs is not finite.*--precise"):
        soupkit.uniform_soup(paths)
    assert torch.equal(soupkit.uniform_soup(paths, precise=True)["w"], torch.zeros(4))


def test_include_exclude_copy_unmerged_from_first(make_ckpt) -> None:
    a, b = tiny_state(0), tiny_state(1)
    paths = [make_ckpt("a", state=a), make_ckpt("b", state=b)]
    out = soupkit.uniform_soup(paths, exclude=["head.*"])
    assert torch.equal(out["head.weight"], a["head.weight"])
    assert torch.allclose(out["conv.weight"], (a["conv.weight"] + b["conv.weight"]) / 2, atol=1e-6)
    only = soupkit.uniform_soup(paths, include=["conv.*"])
    assert torch.equal(only["bn.weight"], a["bn.weight"]) and not torch.equal(only["conv.bias"], a["conv.bias"])
    with pytest.raises(ParameterError, match="matches no tensor"):
        soupkit.uniform_soup(paths, exclude=["nothing.*"])


def test_method_parameter_validation(make_ckpt) -> None:
    paths = [make_ckpt("a", 0), make_ckpt("b", 1)]
    with pytest.raises(ParameterError, match="unknown merge method 'unifrom'. Did you mean 'uniform'"):
        soupkit.merge(paths, "unifrom")
    with pytest.raises(ParameterError, match="has no parameter 'alpah'. Did you mean 'alpha'"):
        soupkit.merge(paths, "wise", alpah=0.3)
    with pytest.raises(ParameterError, match="has 3 values for 2 input models"):
        soupkit.merge(paths, "linear", weights=[1, 2, 3])
    with pytest.raises(ParameterError, match="takes exactly 2 input models, got 3"):
        soupkit.merge([*paths, make_ckpt("c", 2)], "wise")
    with pytest.raises(ParameterError, match="given twice"):
        soupkit.merge([paths[0], paths[0]], "uniform")


def test_registry_rejects_duplicate_names() -> None:
    from soupkit.merging.registry import merge_method

    with pytest.raises(ValueError, match="already registered"):
        merge_method("uniform", pretty_name="again")(lambda tensors: tensors[0])
    assert {"uniform", "linear", "wise"} <= set(list_methods())
    assert get_method("linear").parameters["weights"].per_model


def test_provenance_metadata_and_reproducible_bytes(tmp_path: Path, make_ckpt, monkeypatch) -> None:
    paths = [make_ckpt("a", 0), make_ckpt("b", 1)]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = soupkit.merge(paths, "linear", tmp_path / "one.safetensors", weights=[1, 3])
    second = soupkit.merge(paths, "linear", tmp_path / "two.safetensors", weights=[1, 3])
    assert digest(first) == digest(second)
    info = soupkit.open_checkpoint(first).metadata
    assert info["soupkit.method"] == "linear" and info["soupkit.created"] == "2023-11-14T22:13:20Z"
    assert '"weights": [1.0, 3.0]' in info["soupkit.params"]
    assert "a.safetensors" in info["soupkit.ingredients"] and "fingerprint" in info["soupkit.ingredients"]


def test_failure_mid_write_leaves_nothing(tmp_path: Path, make_ckpt, monkeypatch) -> None:
    paths = [make_ckpt("a", 0), make_ckpt("b", 1)]
    before = snapshot(tmp_path)
    calls = {"n": 0}
    original = SafetensorsWriter.write

    def failing_write(self, key, chunk):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return original(self, key, chunk)

    monkeypatch.setattr(SafetensorsWriter, "write", failing_write)
    with pytest.raises(soupkit.SoupkitError, match="No space left on device"):
        soupkit.uniform_soup(paths, tmp_path / "soup.safetensors")
    assert snapshot(tmp_path) == before  # no output, no temporary file, inputs byte-identical


def test_uniform_of_identical_inputs_is_exact(make_ckpt) -> None:
    state = tiny_state(3)
    paths = [make_ckpt(f"same{i}", state=state) for i in range(5)]
    out = soupkit.uniform_soup(paths)
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_mapped_and_copied_inputs_give_identical_outputs(tmp_path: Path, monkeypatch) -> None:
    """Readers that map chunks (none of soupkit's own since inputs must not SIGBUS when truncated) and readers
    that copy them give the same bytes, for sharded, half-precision and whole-tensor (TIES) inputs; no input
    changes."""
    from soupkit.merging.engine import ReadAhead

    def state(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"embed": torch.randn(700, 300, generator=g).to(dtype), "bias": torch.randn(5, generator=g),
                "proj": torch.randn(90_001, generator=g).to(dtype), "steps": torch.tensor(3)}

    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for i, dtype in enumerate([torch.float32, torch.float16, torch.float32]):
        paths.append(folder / f"m{i}.safetensors")
        soupkit.save_checkpoint(state(i, dtype), paths[-1], shard_size=500_000 if i == 2 else None)
    paths[2] = paths[2].with_name("m2.safetensors.index.json")
    base = folder / "base.safetensors"
    soupkit.save_checkpoint(state(9, torch.float32), base)
    before = snapshot(folder)
    outputs = {}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # the outputs' creation time must not differ either
    for label, threshold in [("mapped", 64 << 10), ("copied", 1 << 62)]:
        monkeypatch.setattr(ReadAhead, "MAP_MIN_BYTES", threshold)
        for method, extra in [("uniform", {}), ("ties", {"base": base, "density": 0.5})]:
            out = tmp_path / f"{method}-{label}.safetensors"
            soupkit.merge(paths, method, out, chunk_elements=50_000, **extra)
            outputs[method, label] = out.read_bytes()
    assert outputs["uniform", "mapped"] == outputs["uniform", "copied"]
    assert outputs["ties", "mapped"] == outputs["ties", "copied"]
    assert snapshot(folder) == before
