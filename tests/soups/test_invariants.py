"""The soup algorithms form candidates and outputs through the registered methods, so (bit for bit):

- N identical inputs come back unchanged from greedy, learned, the WiSE-FT sweep and the Fisher sweep;
- a greedy soup is ``soupkit merge --method linear`` of its selected ingredients, in selection order;
- a learned soup is ``soupkit merge --method linear --weights W`` with its learned weights;
- a sweep's chosen model is ``soupkit wise --alpha A``; a Fisher sweep's is
  ``soupkit merge --method fisher --weights 1-A,A --fisher ZS_F,FT_F``;
- the candidate that was scored is the file that was written.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from soupkit.io import load_checkpoint, open_checkpoint
from soupkit.soups import greedy_soup, learned_soup, wise_sweep


def assert_same(written: dict, expected: dict) -> None:
    assert list(written) == list(expected) or set(written) == set(expected)
    for key in expected:
        assert written[key].dtype == expected[key].dtype, key
        assert torch.equal(written[key], expected[key]), key


def recording(ev):
    """Wrap ``ev.evaluate`` to keep a copy of every in-memory state it is given (the candidates)."""
    seen: list[dict] = []
    original = ev.evaluate

    def evaluate(state, *args, **kwargs):
        if isinstance(state, dict):
            seen.append({k: v.clone() for k, v in state.items()})
        return original(state, *args, **kwargs)

    ev.evaluate = evaluate
    return seen


@pytest.fixture
def copies(digits_setup, tmp_path):
    """Three files holding the same checkpoint."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"same{i}.safetensors")
        shutil.copy(digits_setup.paths[0], paths[-1])
    return paths


@pytest.fixture
def fishers(digits_setup, tmp_path):
    """Two Fisher files for the digits MLP: positive values, with zeros the floor must lift, and a key only one
    file holds (that tensor is the plain weighted mean)."""
    g = torch.Generator().manual_seed(7)
    shapes = {k: v.shape for k, v in digits_setup.ingredients[0].items()}
    paths = []
    for side in range(2):
        values = {k: torch.rand(shape, generator=g) ** 4 for k, shape in shapes.items() if k != "2.bias"}
        values["0.bias"][:5] = 0.0
        if side == 0:
            values["2.bias"] = torch.rand(shapes["2.bias"], generator=g)
        paths.append(tmp_path / f"fisher{side}.safetensors")
        save_file(values, str(paths[-1]))
    return paths


def test_linear_and_greedy_share_the_mean_step():
    from soupkit.merging.methods import linear
    from soupkit.soups import greedy

    assert greedy.mean_step is linear.mean_step
    assert "mean_step" in linear.weighted_mean.__code__.co_names


@pytest.mark.parametrize("accept", ["gt", "ge"])
def test_identical_inputs_come_back_unchanged_from_greedy(copies, digits_setup, accept):
    result = greedy_soup(copies, digits_setup.make_evaluator(), accept=accept)
    assert len(result.ingredients) == (3 if accept == "ge" else 1)
    assert_same(result.state_dict, load_checkpoint(copies[0]))


def test_identical_inputs_come_back_unchanged_from_learned(copies, digits_setup):
    result = learned_soup(copies, digits_setup.make_evaluator(), steps=3)
    assert_same(result.state_dict, load_checkpoint(copies[0]))
    by_layer = learned_soup(copies, digits_setup.make_evaluator(), steps=3, by_layer=True)
    assert_same(by_layer.state_dict, load_checkpoint(copies[0]))


def test_identical_inputs_come_back_unchanged_from_sweeps(copies, digits_setup, fishers):
    for fisher in (None, fishers):
        seen = recording(ev := digits_setup.make_evaluator())
        result = wise_sweep(copies[0], copies[1], "0:1:0.25", ev, fisher=fisher)
        assert len(seen) == 5
        for state in [*seen, result.state_dict]:
            assert_same(state, load_checkpoint(copies[0]))


@pytest.mark.parametrize("accept", ["gt", "ge"])
def test_greedy_soup_is_merge_linear_of_its_selection(digits_setup, tmp_path, cli, accept):
    ev = digits_setup.make_evaluator()
    seen = recording(ev)
    result = greedy_soup(digits_setup.paths[::-1], ev, accept=accept, output=tmp_path / "greedy.safetensors")
    assert len(result.ingredients) >= 2
    selected = [digits_setup.paths[::-1][i] for i in result.ingredients]  # in selection order
    assert cli("merge", *selected, "--method", "linear", "-o", tmp_path / "linear.safetensors").code == 0
    written = load_checkpoint(result.path)
    assert_same(written, load_checkpoint(tmp_path / "linear.safetensors"))
    # the last accepted candidate was scored on exactly the written numbers
    accepted = [s for s in result.history[1:] if s.accepted]
    candidates = [s for s in result.history[1:] if s.candidate is not None or s.stopped_early]
    scored = seen[candidates.index(accepted[-1])]  # (individual scores are of paths)
    assert_same(scored, written)


def test_learned_soup_is_merge_linear_with_its_weights(digits_setup, tmp_path, cli):
    ev = digits_setup.make_evaluator()
    seen = recording(ev)
    paths = digits_setup.paths[:4]
    result = learned_soup(paths, ev, steps=5, lr=0.1, output=tmp_path / "learned.safetensors")
    weights = ",".join(repr(w) for w in result.extra["weights"])
    reference = tmp_path / "ref.safetensors"
    assert cli("merge", *paths, "--method", "linear", "--weights", weights, "-o", reference).code == 0
    written = load_checkpoint(result.path)
    assert_same(written, load_checkpoint(reference))
    assert_same(seen[0], written)  # the learned soup was scored as written (seen[1] is the uniform soup)
    assert ev.evaluate(written, ["heldout"], use_cache=False)["heldout"].loss == result.extra["heldout_loss"]


def test_sweep_choice_is_soupkit_wise_at_that_alpha(digits_setup, tmp_path, cli):
    ev = digits_setup.make_evaluator()
    seen = recording(ev)
    zs, ft = digits_setup.paths[5], digits_setup.paths[0]
    result = wise_sweep(zs, ft, "0:1:0.1", ev, output=tmp_path / "sweep.safetensors")
    assert 0.0 < result.alpha < 1.0
    assert cli("wise", zs, ft, "--alpha", repr(result.alpha), "-o", tmp_path / "wise.safetensors").code == 0
    written = load_checkpoint(result.path)
    assert_same(written, load_checkpoint(tmp_path / "wise.safetensors"))
    assert_same(seen[[p.alpha for p in result.history].index(result.alpha)], written)
    with open_checkpoint(result.path) as reader:
        assert reader.metadata["soupkit.method"] == "wise"
        assert json.loads(reader.metadata["soupkit.params"]) == {"alpha": result.alpha}


def test_fisher_sweep_choice_is_merge_fisher(digits_setup, fishers, tmp_path, cli):
    ev = digits_setup.make_evaluator()
    seen = recording(ev)
    zs, ft = digits_setup.paths[5], digits_setup.paths[0]
    result = wise_sweep(zs, ft, "0.2,0.4,0.6,0.8", ev, fisher=fishers, output=tmp_path / "sweep.safetensors")
    alpha = result.alpha
    assert result.stats["fisher_tensors"] == 3
    weights = f"{1.0 - alpha!r},{alpha!r}"
    code = cli("merge", zs, ft, "--method", "fisher", "--weights", weights, "--fisher", ",".join(map(str, fishers)),
               "-o", tmp_path / "fisher.safetensors").code
    assert code == 0
    written = load_checkpoint(result.path)
    assert_same(written, load_checkpoint(tmp_path / "fisher.safetensors"))
    assert_same(seen[[p.alpha for p in result.history].index(alpha)], written)
    with open_checkpoint(result.path) as reader:
        assert reader.metadata["soupkit.method"] == "fisher"  # a registered method, never "wise_fisher"
        params = json.loads(reader.metadata["soupkit.params"])
    assert params["weights"] == [1.0 - alpha, alpha] and params["floor"] == 1e-8
    assert json.loads(reader.metadata["soupkit.sweep"])["fisher"] == ["fisher0.safetensors", "fisher1.safetensors"]
