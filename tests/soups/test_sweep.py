"""WiSE-FT sweep: α parsing, exact endpoints, in-place interpolation without reloads, the Fisher formula."""

from __future__ import annotations

import json

import pytest
import torch

from soupkit.errors import IncompatibleCheckpointsError, ParameterError
from soupkit.soups import parse_alphas, wise_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def test_parse_alphas():
    assert parse_alphas("0:1:0.1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0.2:0.5:0.1") == [0.2, 0.3, 0.4, 0.5]
    assert parse_alphas("0.3,0.5,0.7") == [0.3, 0.5, 0.7]
    assert parse_alphas("0.5") == [0.5] == parse_alphas(0.5)
    for bad, message in (("0:1", "start:stop:step"), ("1:0:0.1", "stop >= start"), ("0:1:0", "step > 0"),
                         ("a,b", "expected numbers"), ("0.5,0.5", "duplicate"), ("", "at least one")):
        with pytest.raises(ParameterError, match=f"--alpha: .*{message}"):
            parse_alphas(bad)


def pair(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).half(),
            "n": torch.tensor(seed)}


def recording_evaluator(seen, prefer=None):
    """A callable that records (a copy of) every state it is given and prefers states close to ``prefer``."""

    def score(state):
        seen.append({k: v.clone() for k, v in state.items()})
        if prefer is None:
            return 0.5
        return 1.0 - float((state["w"] - prefer["w"]).abs().mean())

    return score


def test_endpoints_equal_inputs_bitwise():
    zs, ft = pair(0), pair(1)
    seen: list[dict] = []
    wise_sweep(zs, ft, "0:1:0.5", recording_evaluator(seen))
    assert len(seen) == 3
    assert torch.equal(seen[0]["w"], zs["w"]) and torch.equal(seen[2]["w"], ft["w"])
    assert torch.equal(seen[0]["b"].half(), zs["b"]) and torch.equal(seen[2]["b"].half(), ft["b"])
    # integer tensors come from the zero-shot model at every α, as `soupkit wise` takes them from its first input
    assert all(torch.equal(state["n"], zs["n"]) for state in seen)
    # the written model at a chosen endpoint has the input's floating tensors, dtype and all
    for prefer, expected in ((zs, zs), (ft, ft)):
        result = wise_sweep(zs, ft, [0.0, 0.5, 1.0], recording_evaluator([], prefer))
        assert result.alpha == (0.0 if expected is zs else 1.0)
        for key in ("w", "b"):
            assert result.state_dict[key].dtype == expected[key].dtype
            assert torch.equal(result.state_dict[key], expected[key])
        assert torch.equal(result.state_dict["n"], zs["n"])


def test_interior_alpha_matches_wise_ft_bitwise(tmp_path):
    from safetensors.torch import save_file

    from soupkit.io import load_checkpoint
    from soupkit.merging import wise_ft

    zs, ft = pair(2), pair(3)
    ft["n"] = zs["n"].clone()  # integer buffers agree, as they do in a real WiSE-FT pair
    save_file(zs, str(tmp_path / "zs.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    target = {k: v.clone() for k, v in ft.items()}
    target["w"] = 0.7 * zs["w"] + 0.3 * ft["w"]
    result = wise_sweep(tmp_path / "zs.safetensors", tmp_path / "ft.safetensors", "0.2,0.3,0.6",
                        recording_evaluator([], target), output=tmp_path / "sweep.safetensors")
    assert result.alpha == 0.3 and result.path == tmp_path / "sweep.safetensors"
    merged = wise_ft(tmp_path / "zs.safetensors", tmp_path / "ft.safetensors", 0.3)
    written = load_checkpoint(result.path)
    assert written.keys() == merged.keys()
    for key in merged:
        assert written[key].dtype == merged[key].dtype and torch.equal(written[key], merged[key]), key


def test_fisher_formula_by_hand(tmp_path):
    from safetensors.torch import save_file

    zs = {"w": torch.tensor([1.0, 2.0, -1.0]), "b": torch.tensor([0.5, 0.5])}
    ft = {"w": torch.tensor([3.0, 0.0, 1.0]), "b": torch.tensor([1.5, -0.5])}
    save_file({"w": torch.tensor([1.0, 0.0, 4.0])}, str(tmp_path / "f0.safetensors"))
    save_file({"w": torch.tensor([3.0, 2.0, 0.0])}, str(tmp_path / "f1.safetensors"))
    seen: list[dict] = []
    result = wise_sweep(zs, ft, [0.25], recording_evaluator(seen), fisher_floor=0.5,
                        fisher=(tmp_path / "f0.safetensors", tmp_path / "f1.safetensors"))
    # c0 = 0.75 * max(F0, .5) = [0.75, 0.375, 3.0]; c1 = 0.25 * max(F1, .5) = [0.75, 0.5, 0.125]
    # w = (c0*zs + c1*ft) / (c0 + c1) = [(0.75+2.25)/1.5, (0.75+0)/0.875, (-3+0.125)/3.125]
    expected_w = torch.tensor([2.0, 0.75 / 0.875, -2.875 / 3.125])
    torch.testing.assert_close(seen[0]["w"], expected_w, rtol=1e-6, atol=0)
    # "b" has no Fisher: plain interpolation 0.75*zs + 0.25*ft
    torch.testing.assert_close(seen[0]["b"], torch.tensor([0.75, 0.25]), rtol=0, atol=1e-7)
    assert result.stats["fisher_tensors"] == 1
    with pytest.raises(IncompatibleCheckpointsError, match="f0.safetensors: Fisher of 'w' has shape"):
        save_file({"w": torch.ones(2)}, str(tmp_path / "f0.safetensors"))
        wise_sweep(zs, ft, [0.5], recording_evaluator([]),
                   fisher=(tmp_path / "f0.safetensors", tmp_path / "f1.safetensors"))


def test_sweep_with_evaluator_no_reloads_and_report(digits_setup, tmp_path):
    ev = digits_setup.make_evaluator()
    zs, ft = digits_setup.paths[5], digits_setup.paths[0]  # a weak model and a good one
    calls = []
    original = ev.evaluate

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    ev.evaluate = counting
    result = wise_sweep(zs, ft, "0:1:0.1", ev, report_dir=tmp_path, output=tmp_path / "wise.safetensors")
    assert len(calls) == 11 and ev.loaded_paths == []
    assert all(not isinstance(c, (str, type(zs))) for c in calls)  # states on the device, never paths
    assert [p.alpha for p in result.history] == [round(0.1 * i, 10) for i in range(11)]
    best = max(p.heldout for p in result.history)
    assert result.score == best and result.history[[p.alpha for p in result.history].index(result.alpha)].chosen
    assert all(p.test is not None and p.shift is not None for p in result.history)
    data = (tmp_path / "wise_curve.png").read_bytes()
    assert data[:8] == PNG and len(data) > 5000
    report = json.loads((tmp_path / "wise.json").read_text())
    assert report["extra"]["alpha"] == result.alpha and len(report["history"]) == 11
    by_test = wise_sweep(zs, ft, "0:1:0.1", digits_setup.make_evaluator(), select="test")
    assert by_test.history[[p.alpha for p in by_test.history].index(by_test.alpha)].test == max(
        p.test for p in by_test.history)
    with pytest.raises(ParameterError, match="--select: unknown dataset 'tset'. Did you mean 'test'?"):
        wise_sweep(zs, ft, "0.5", digits_setup.make_evaluator(), select="tset")


def test_extrapolation_is_warned_about_once(tmp_path):
    import warnings

    zs, ft = pair(4), pair(5)
    ft["n"] = zs["n"].clone()
    target = {k: v.clone() for k, v in ft.items()}
    target["w"] = ft["w"] + 0.2 * (ft["w"] - zs["w"])  # the model at α=1.2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = wise_sweep(zs, ft, "0.5,1.2", recording_evaluator([], target), output=tmp_path / "x.safetensors")
    assert result.alpha == 1.2
    assert [str(w.message) for w in caught] == ["α=[1.2] outside [0, 1]: extrapolating beyond the two models"]
