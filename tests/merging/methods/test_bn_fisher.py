"""BatchNorm recalibration and Fisher information, with a small stand-in for ``soupkit.eval.Evaluator``
(the same duck-typed surface: ``model``, ``device``, ``load_state``, ``batches``, ``heldout_name``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import soupkit
from soupkit.errors import OutputError, ParameterError
from soupkit.io import load_checkpoint, open_checkpoint
from soupkit.merging.bn import checkpoint_keys, recalibrate_bn
from soupkit.merging.fisher_info import compute_fisher, squared_grads
from tests.merging.methods._common import write


class StandInEvaluator:
    heldout_name = "heldout"

    def __init__(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.model, self.device, self._batches = model, torch.device("cpu"), batches

    def load_state(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)

    def batches(self, name: str):
        assert name == self.heldout_name
        yield from self._batches


def conv_bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def image_batches(count: int, size: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 6, 6, generator=g) * 2 + 1, torch.zeros(size, dtype=torch.long))
            for _ in range(count)]


@pytest.mark.parametrize("max_batches", [None, 2])
def test_recalibrate_bn_recomputes_the_cumulative_statistics(max_batches: int | None) -> None:
    merged = soupkit.merge([conv_bn_net(0).state_dict(), conv_bn_net(1).state_dict()], "uniform")
    batches = image_batches(3)
    out = recalibrate_bn(merged, StandInEvaluator(conv_bn_net(2), batches), max_batches=max_batches)
    used = batches[:max_batches] if max_batches else batches
    conv = nn.Conv2d(3, 4, 3)
    conv.load_state_dict({"weight": merged["0.weight"], "bias": merged["0.bias"]})
    with torch.no_grad():
        features = [conv(x).double() for x, _ in used]
    mean = np.mean([f.mean(dim=(0, 2, 3)).numpy() for f in features], axis=0)
    var = np.mean([f.var(dim=(0, 2, 3), unbiased=True).numpy() for f in features], axis=0)
    np.testing.assert_allclose(out["1.running_mean"].numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["1.running_var"].numpy(), var, rtol=1e-5, atol=1e-6)
    assert int(out["1.num_batches_tracked"]) == len(used)
    assert out.keys() == merged.keys()
    for key in merged:
        assert out[key].dtype == merged[key].dtype
        if not key.startswith("1.running") and key != "1.num_batches_tracked":
            assert torch.equal(out[key], merged[key])


def test_recalibrate_bn_refuses_empty_data_and_warns_without_bn() -> None:
    net = conv_bn_net(0)
    with pytest.raises(ParameterError, match="held-out data 'heldout' has no batches"):
        recalibrate_bn(net.state_dict(), StandInEvaluator(net, []))
    linear = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="no BatchNorm layers"):
        assert recalibrate_bn(linear.state_dict(), StandInEvaluator(linear, [])).keys() == {"weight", "bias"}


def test_checkpoint_keys_matches_prefixed_names() -> None:
    names = ["0.weight", "1.running_mean"]
    assert checkpoint_keys(names, ["0.weight", "1.running_mean", "x"]) == {n: n for n in names}
    assert checkpoint_keys(names, ["model.0.weight", "model.1.running_mean"]) == {n: f"model.{n}" for n in names}
    assert checkpoint_keys(["module.0.weight"], ["0.weight"]) == {"module.0.weight": "0.weight"}
    assert checkpoint_keys(names, ["other"]) == {}


def softmax_regression(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def analytic_grads(model: nn.Linear, x: torch.Tensor, y: int) -> dict[str, np.ndarray]:
    """d/dtheta cross_entropy(Wx + b, y): (p - e_y) x^T and p - e_y."""
    with torch.no_grad():
        p = torch.softmax(model(x), -1).double().numpy()
    residual = p - np.eye(3)[y]
    return {"weight": np.outer(residual, x.double().numpy()), "bias": residual}


def test_squared_grads_are_per_example_in_both_modes() -> None:
    model = conv_bn_net(3).eval()
    x, _ = image_batches(1, size=4)[0]
    y = torch.tensor([0, 2, 1, 2])
    params = {n: p.detach() for n, p in model.named_parameters()}
    vectorised = squared_grads(model, params, x, y, vectorised=True)
    looped = squared_grads(model, params, x, y, vectorised=False)
    for name in params:
        torch.testing.assert_close(vectorised[name], looped[name], rtol=1e-5, atol=1e-8)
    linear = softmax_regression(0)
    xs = torch.randn(3, 4)
    ys = torch.tensor([1, 0, 2])
    got = squared_grads(linear, {n: p.detach() for n, p in linear.named_parameters()}, xs, ys)
    for name in ("weight", "bias"):
        expected = sum(analytic_grads(linear, x, int(y))[name] ** 2 for x, y in zip(xs, ys))
        np.testing.assert_allclose(got[name].numpy(), expected, rtol=1e-5, atol=1e-8)


def test_fisher_averages_squared_grads_at_labels_from_the_model(tmp_path: Path) -> None:
    model = softmax_regression(1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    xs = torch.randn(2, 4)
    fisher = compute_fisher(state, StandInEvaluator(softmax_regression(9), [(xs, torch.zeros(2))]))
    assert fisher.keys() == {"weight", "bias"} and fisher["weight"].dtype == torch.float32
    # whatever labels were sampled, the Fisher is the mean of squared per-example gradients at them
    candidates = [
        {n: (analytic_grads(model, xs[0], a)[n] ** 2 + analytic_grads(model, xs[1], b)[n] ** 2) / 2
         for n in ("weight", "bias")}
        for a, b in itertools.product(range(3), repeat=2)
    ]
    assert any(all(np.allclose(fisher[n].numpy(), c[n], rtol=1e-5, atol=1e-9) for n in c) for c in candidates)


def test_fisher_is_the_expectation_over_the_predictive_distribution() -> None:
    model = softmax_regression(2)
    x = torch.randn(4)
    batches = [(x.expand(500, 4).clone(), torch.zeros(500)) for _ in range(6)]
    fisher = compute_fisher(model.state_dict(), StandInEvaluator(softmax_regression(2), batches), seed=1)
    with torch.no_grad():
        p = torch.softmax(model(x), -1).double().numpy()
    assert p.max() < 0.8  # not peaked: argmax labels or true labels would give a different answer
    exact = {n: sum(p[y] * analytic_grads(model, x, y)[n] ** 2 for y in range(3)) for n in ("weight", "bias")}
    for name, value in exact.items():
        np.testing.assert_allclose(fisher[name].numpy(), value, rtol=0.1, atol=1e-6)


def test_fisher_file_round_trip_into_fisher_merging(tmp_path: Path) -> None:
    nets = [conv_bn_net(4), conv_bn_net(5)]
    paths = [write(tmp_path, f"net{i}", n.state_dict()) for i, n in enumerate(nets)]
    evaluator = StandInEvaluator(conv_bn_net(6), image_batches(3))
    fishers = [compute_fisher(p, evaluator, tmp_path / f"net{i}.fisher.safetensors", max_examples=7)
               for i, p in enumerate(paths)]
    with open_checkpoint(fishers[0]) as reader:
        assert reader.metadata["soupkit.fisher.examples"] == "7"
        assert set(reader.keys()) == {n for n, _ in nets[0].named_parameters()}  # no buffers
    merged = soupkit.merge(paths, "fisher", fishers=[str(f) for f in fishers])
    f0, f1 = (load_checkpoint(f) for f in fishers)
    a, b = (n.state_dict() for n in nets)
    w0, w1 = f0["0.weight"].clamp(min=1e-8), f1["0.weight"].clamp(min=1e-8)
    torch.testing.assert_close(merged["0.weight"], (w0 * a["0.weight"] + w1 * b["0.weight"]) / (w0 + w1))
    torch.testing.assert_close(merged["1.running_mean"], (a["1.running_mean"] + b["1.running_mean"]) / 2)
    with pytest.raises(OutputError):
        compute_fisher(paths[0], evaluator, fishers[0])  # exists: refused before any computation
    with pytest.raises(ParameterError, match="max-examples must be >= 1"):
        compute_fisher(paths[0], evaluator, max_examples=0)


def test_merge_with_recalibrate_bn(tmp_path: Path) -> None:
    states = [conv_bn_net(0).state_dict(), conv_bn_net(1).state_dict()]
    batches = image_batches(2)
    plain = soupkit.merge(states, "uniform")
    expected = recalibrate_bn(plain, StandInEvaluator(conv_bn_net(2), batches))
    written = soupkit.merge(states, "uniform", tmp_path / "soup.safetensors",
                            recalibrate_bn=StandInEvaluator(conv_bn_net(3), batches))
    result = load_checkpoint(written)
    assert result.keys() == expected.keys() and all(torch.equal(result[k], expected[k]) for k in result)
    assert not torch.equal(result["1.running_var"], plain["1.running_var"])
