"""Property tests (hypothesis) of the merge engine's promises, over random tensors, dtypes and chunk sizes:

- a uniform soup of k identical checkpoints is that checkpoint exactly (fp32, fp16, bf16; -0.0 may become 0.0);
- WiSE-FT at alpha=0 / alpha=1 is the zero-shot / fine-tuned model, bit for bit;
- linear merges are linear: L(a*X + b*Y) = a*L(X) + b*L(Y) within fp32 rounding;
- integer and bool buffers come out of every method exactly as the first input holds them.

``max_examples`` is bounded so the whole file runs in seconds; the chunk size is drawn too, so tensors are
split at arbitrary flat offsets the way a 30 GB merge splits them.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import soupkit
from soupkit.merging import get_method, list_methods

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: largest magnitude drawn per dtype (bf16 rounds fp32 values above ~3.39e38 to inf)
LIMITS = {torch.float32: 3e38, torch.float16: 65504.0, torch.bfloat16: 1e38}
CHUNKS = st.sampled_from([1, 3, 64, 1 << 22])

shapes = array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


@st.composite
def float_tensor(draw: st.DrawFn, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
                 limit: float | None = None) -> torch.Tensor:
    shape = draw(shapes) if shape is None else shape
    bound = limit if limit is not None else LIMITS[dtype]
    width = 16 if dtype == torch.float16 else 32
    bound = float(np.float16(bound) if width == 16 else np.float32(bound))  # exactly representable
    values = draw(arrays(np.float32, shape, elements=st.floats(-bound, bound, allow_nan=False,
                                                               allow_infinity=False, width=width)))
    return torch.from_numpy(values.copy()).to(dtype)


@st.composite
def state_dict(draw: st.DrawFn, dtype: torch.dtype, limit: float | None = None) -> dict[str, torch.Tensor]:
    count = draw(st.integers(1, 4))
    return {f"t{i}": draw(float_tensor(dtype, limit=limit)) for i in range(count)}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (so -0.0 vs 0.0 or different NaN payloads would count as different)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES.values(), ids=FLOAT_DTYPES.keys())
@PROPERTY
@given(data=st.data(), k=st.integers(1, 5), chunk=CHUNKS)
def test_uniform_of_identical_checkpoints_is_that_checkpoint(dtype: torch.dtype, data: st.DataObject, k: int,
                                                            chunk: int) -> None:
    state = data.draw(state_dict(dtype))
    out = soupkit.uniform_soup([state] * k, chunk_elements=chunk)
    assert set(out) == set(state)
    for key, tensor in state.items():
        # exact in value; the running mean turns -0.0 into +0.0 (equal, not bitwise), which is harmless
        assert out[key].dtype == tensor.dtype and torch.equal(out[key], tensor), key


@pytest.mark.parametrize("dtype", FLOAT_DTYPES.values(), ids=FLOAT_DTYPES.keys())
@PROPERTY
@given(data=st.data(), chunk=CHUNKS)
def test_wise_endpoints_are_exact(dtype: torch.dtype, data: st.DataObject, chunk: int) -> None:
    zeroshot = data.draw(state_dict(dtype))
    finetuned = {k: data.draw(float_tensor(dtype, tuple(v.shape))) for k, v in zeroshot.items()}
    at_zero, at_one = soupkit.wise_ft(zeroshot, finetuned, [0.0, 1.0], chunk_elements=chunk)
    for key in zeroshot:
        assert same(at_zero[key], zeroshot[key]), key
        assert same(at_one[key], finetuned[key]), key


@PROPERTY
@given(data=st.data(), k=st.integers(1, 4), a=st.floats(-3, 3), b=st.floats(-3, 3), chunk=CHUNKS)
def test_linear_merge_is_linear(data: st.DataObject, k: int, a: float, b: float, chunk: int) -> None:
    shape = data.draw(shapes)
    xs = [{"w": data.draw(float_tensor(torch.float32, shape, limit=100.0))} for _ in range(k)]
    ys = [{"w": data.draw(float_tensor(torch.float32, shape, limit=100.0))} for _ in range(k)]
    weights = data.draw(st.lists(st.floats(0.05, 2.0), min_size=k, max_size=k))
    combined = [{"w": (a * x["w"].double() + b * y["w"].double()).float()} for x, y in zip(xs, ys)]
    merge = lambda states: soupkit.merge(states, "linear", weights=weights, chunk_elements=chunk)["w"]  # noqa: E731
    left = merge(combined).double()
    right = a * merge(xs).double() + b * merge(ys).double()
    scale = 100.0 * (abs(a) + abs(b)) + 1.0
    torch.testing.assert_close(left, right, rtol=0, atol=scale * 8 * 2**-23)


SAMPLE_PARAMS = {"t": 0.3, "alpha": 0.7, "density": 0.5, "drop_rate": 0.3, "seed": 5, "scaling": 0.8}
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def method_call(name: str, n_inputs: int) -> tuple[int, dict] | None:
    """How many inputs and which parameters to give ``name``, or None where it needs more (files)."""
    spec = get_method(name)
    if any(p.required and p.name not in SAMPLE_PARAMS and p.name != "fishers" for p in spec.parameters.values()):
        return None
    n = max(spec.min_models, n_inputs)
    if spec.max_models is not None:
        n = min(n, spec.max_models)
    params = {p: v for p, v in SAMPLE_PARAMS.items() if p in spec.parameters}
    return n, params


@st.composite
def int_tensor(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(INT_DTYPES))
    shape = draw(shapes)
    if dtype == torch.bool:
        return torch.from_numpy(draw(arrays(np.bool_, shape)).copy())
    info = torch.iinfo(dtype)
    numpy_dtype = {torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
                   torch.uint8: np.uint8}[dtype]
    return torch.from_numpy(draw(arrays(numpy_dtype, shape, elements=st.integers(info.min, info.max))).copy())


@pytest.mark.parametrize("method", list_methods())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_inputs=st.integers(1, 3), differ=st.booleans())
def test_integer_buffers_survive_every_method(method: str, data: st.DataObject, n_inputs: int,
                                              differ: bool) -> None:
    call = method_call(method, n_inputs)
    if call is None:
        pytest.skip(f"{method} needs parameters this test cannot invent")
    n, params = call
    ints = {f"buf{i}": data.draw(int_tensor()) for i in range(data.draw(st.integers(1, 3)))}
    states = []
    for i in range(n):
        own = {k: (v.clone() if not differ or i == 0 else _perturb(v)) for k, v in ints.items()}
        states.append({"w": torch.full((3, 2), float(i + 1)), **own})
    base = {"w": torch.zeros(3, 2), **ints} if get_method(method).needs_base else None
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")  # "integer tensor differs": expected when differ=True
        if method == "fisher":  # auxiliary files: one Fisher estimate per input
            params["fishers"] = [str(soupkit.save_checkpoint({"w": torch.full((3, 2), i + 1.0)},
                                                             Path(folder) / f"f{i}.safetensors")) for i in range(n)]
        out = soupkit.merge(states, method, base=base, **params)
    for key, tensor in ints.items():
        assert same(out[key], tensor), (key, out[key], tensor)


def _perturb(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == torch.bool:
        return ~tensor
    return tensor ^ torch.ones_like(tensor)
