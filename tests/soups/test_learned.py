"""Learned soup: beats the uniform soup on held-out loss, by-layer weights, memory refusal, error messages."""

from __future__ import annotations

import json

import pytest
import torch

from soupkit.errors import ParameterError
from soupkit.soups import learned_soup
from soupkit.soups.learned import InsufficientMemoryError

PNG = b"\x89PNG\r\n\x1a\n"


def test_learned_soup_beats_uniform_on_heldout_loss(digits_setup, tmp_path):
    ev = digits_setup.make_evaluator()
    result = learned_soup(digits_setup.paths, ev, steps=60, lr=0.1, output=tmp_path / "learned.safetensors",
                          report_dir=tmp_path)
    # the evaluator's own loss on the written-out weights (temperature 1), not the training objective
    assert result.extra["heldout_loss"] < result.extra["uniform_loss"] - 0.01
    weights = result.extra["weights"]
    assert len(weights) == len(digits_setup.paths) and sum(weights) == pytest.approx(1.0, abs=1e-5)
    noisiest = 5  # trained with 50% label noise: the worst ingredient should lose weight
    assert weights[noisiest] < 1.0 / len(weights)
    from soupkit.io import load_checkpoint

    soup = load_checkpoint(result.path)
    expected = {k: sum(w * sd[k] for w, sd in zip(weights, digits_setup.ingredients)) for k in soup}
    for key in soup:
        torch.testing.assert_close(soup[key], expected[key], rtol=1e-5, atol=1e-5)
    assert ev.evaluate(soup, ["heldout"], use_cache=False)["heldout"].loss == pytest.approx(
        result.extra["heldout_loss"], rel=1e-5)
    data = (tmp_path / "learned_weights.png").read_bytes()
    assert data[:8] == PNG and len(data) > 5000
    assert json.loads((tmp_path / "learned.json").read_text())["method"] == "learned"
    # the evaluator's model is left as it was: evaluation mode, its own parameters
    assert all(p.grad is None for p in ev.model.parameters()) and not ev.model.training


def test_by_layer_weights_sum_to_one_per_tensor(digits_setup):
    result = learned_soup(digits_setup.paths[:4], digits_setup.make_evaluator(), by_layer=True, steps=10)
    assert [w.key for w in result.history] == list(digits_setup.ingredients[0])
    for entry in result.history:
        assert sum(entry.weights) == pytest.approx(1.0, abs=1e-5) and len(entry.weights) == 4
    assert len({tuple(e.weights) for e in result.history}) > 1  # tensors learned different mixes


def test_refuses_when_ingredients_do_not_fit(digits_setup):
    with pytest.raises(InsufficientMemoryError, match=r"learned soup of 8 ingredients needs about 0\.00\d* GB "
                                                      r"on cpu .* but 0\.00 GB is free"):
        learned_soup(digits_setup.paths, digits_setup.make_evaluator(), memory_limit=10_000)


def test_needs_an_evaluator_and_sane_options(digits_setup):
    with pytest.raises(ParameterError, match="learned soup needs an Evaluator or a recipe"):
        learned_soup(digits_setup.paths, lambda sd: 0.5)
    with pytest.raises(ParameterError, match="--steps: expected a positive integer"):
        learned_soup(digits_setup.paths, digits_setup.make_evaluator(), steps=0)
