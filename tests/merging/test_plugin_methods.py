"""Plugin merge methods are not trusted (issues 22 and 26, class 11): whatever a registered method returns or
does, the merge is exit 2 with one line naming the method and the tensor, nothing under the output's name,
inputs untouched; a name clashing with a built-in is refused. Built-ins are called as they are (no copies)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from soupkit.merging.registry import METHODS, merge_method
from tests.conftest import snapshot
from tests.hostile.corpus import Expect
from tests.hostile.test_corpus import check

#: name -> (method body, text the error line must hold); each sees whole tensors (elementwise=False)
HOSTILE: dict[str, tuple[Callable, str]] = {
    "wrong_shape": (lambda t: t[0][:1], "returned shape (1, 4)"),
    "flat_for_whole": (lambda t: t[0].reshape(-1), "returned shape (12,)"),
    "a_list": (lambda t: [x for x in t], "returned a list"),
    "a_tuple": (lambda t: (t[0],), "returned a tuple"),
    "none": (lambda t: None, "returned None"),
    "a_number": (lambda t: 1.0, "returned a float"),
    "a_numpy_array": (lambda t: t[0].numpy(), "returned a ndarray"),
    "complex": (lambda t: t[0].to(torch.complex64), "dtype complex64"),
    "integer": (lambda t: t[0].long(), "dtype int64"),
    "boolean": (lambda t: t[0] > 0, "dtype bool"),
    "nan": (lambda t: t[0] * float("nan"), "returned NaN or Inf"),
    "inf": (lambda t: t[0] / 0.0, "returned NaN or Inf"),
    "writes_input": (lambda t: t[0].add_(1), "wrote into its input 0"),
    "writes_second_input": (lambda t: (t[1].mul_(2), t[0].clone())[1], "wrote into its input 1"),
    "writes_then_returns_new": (lambda t: (t[0].zero_(), t[1] * 1)[1], "wrote into its input 0"),
    "raises": (lambda t: 1 / 0, "failed on tensor 'w': ZeroDivisionError"),
    "raises_keyerror": (lambda t: {}["missing"], "failed on tensor 'w': KeyError"),
    "raises_multiline": (lambda t: (_ for _ in ()).throw(RuntimeError("first line\nsecond\nthird")),
                         "RuntimeError: first line"),
}


@pytest.fixture
def hostile_methods() -> Iterator[None]:
    """Register every hostile method for one test (and take them out again: registry-wide tests must not see
    them)."""
    METHODS.load()
    names = [f"hostile_{name}" for name in HOSTILE]
    try:
        for name, (body, _) in HOSTILE.items():
            merge_method(f"hostile_{name}", pretty_name=name, elementwise=False)(body)
        yield
    finally:
        for name in names:
            METHODS._entries.pop(name, None)
            METHODS._owners.pop(name, None)


def _inputs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(2):
        paths.append(folder / f"m{i}.safetensors")
        save_file({"w": torch.full((3, 4), float(i + 1))}, str(paths[-1]))
    return paths


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_plugin_method_is_named_in_one_line(name: str, tmp_path: Path, cli, hostile_methods) -> None:
    folder = tmp_path / "case"
    a, b = _inputs(folder)
    before = snapshot(folder)
    out = folder / "soup.safetensors"
    result = cli("merge", a, b, "-m", f"hostile_{name}", "-o", out)
    expect = Expect(["merge"], (f"merge method 'hostile_{name}'", HOSTILE[name][1], "'w'"))
    check(expect, result.code, result.err, before, folder)


def test_a_plugin_named_like_a_built_in_is_refused() -> None:
    for name in ("uniform", "linear", "ties"):
        if name in METHODS:
            with pytest.raises(ValueError, match="already registered"):
                merge_method(name, pretty_name="impostor")(lambda tensors: tensors[0])
            assert METHODS.owner(name).startswith("soupkit.merging.methods")


def test_a_well_behaved_plugin_is_unaffected(tmp_path: Path, cli) -> None:
    """A plugin that reads its inputs and returns a new tensor merges exactly (its inputs are clones)."""
    METHODS.load()
    merge_method("polite_max", pretty_name="max", elementwise=True)(lambda t: torch.stack(list(t)).amax(0))
    try:
        a, b = _inputs(tmp_path)
        out = tmp_path / "soup.safetensors"
        assert cli("merge", a, b, "-m", "polite_max", "-o", out).code == 0
        from safetensors.torch import load_file

        assert torch.equal(load_file(str(out))["w"], torch.full((3, 4), 2.0))
    finally:
        METHODS._entries.pop("polite_max", None)
        METHODS._owners.pop("polite_max", None)


def test_built_in_methods_get_their_inputs_as_they_are(monkeypatch) -> None:
    """No clone and no comparison for built-ins: the check costs them O(1) per call."""
    from soupkit.merging import checks

    method = METHODS.get("uniform")
    calls = []
    original = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    inputs = [torch.ones(8), torch.zeros(8)]
    result = checks.call_method(method, inputs, {"weights": None} if "weights" in method.schema.model_fields
                                else {}, {}, key="w", shape=(8,))
    assert torch.equal(result, torch.full((8,), 0.5)) and calls == []
    assert checks.is_builtin(method) and not checks.is_builtin(type(method)(**{**method.__dict__, "name": "x"}))
