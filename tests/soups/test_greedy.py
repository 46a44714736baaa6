"""Greedy soup: the same selection as the paper's procedure, with exact early stop, one read per ingredient,
provenance and reports."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from soupkit.errors import OutputError, ParameterError, SoupkitError
from soupkit.soups import greedy_soup

PNG = b"\x89PNG\r\n\x1a\n"


def reference_greedy(states, score, accept="gt"):
    """The paper's procedure, written plainly: sort by held-out score (stable, best first, NaN never), start
    from the best, try each next one once as the mean of the members plus it, keep it if it beats the best."""
    scores = [score(s) for s in states]
    order = sorted((i for i, s in enumerate(scores) if not math.isnan(s)), key=lambda i: -scores[i])
    soup, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        members = [*soup, i]
        candidate = {k: sum(states[j][k] for j in members) / len(members) for k in states[0]}
        value = score(candidate)
        if (value > best) if accept == "gt" else (value >= best):
            soup.append(i)
            best = value
    return soup


def distance_score(target, resolution=0.01):
    """Held-out 'accuracy' of a toy model: 1 - squared distance of its weights to ``target``, on a grid."""

    def score(state):
        value = 1.0 - float(((state["w"] - target) ** 2).sum())
        return math.nan if math.isnan(value) else round(max(value, 0.0) / resolution) * resolution

    return score


def toy(*values):
    return {"w": torch.tensor(values, dtype=torch.float32), "step": torch.tensor(7)}


TARGET = torch.zeros(2)


def test_late_helper_is_kept_and_matches_reference():
    # a alone .91; b alone .875 but a+b .894 (rejected); c alone .84 (worst, tried last) but a+c ~ 1.0
    states = [toy(0.35, 0.05), toy(-0.4, 0.0), toy(0.3, 0.0)]  # b, c, a
    score = distance_score(TARGET)
    result = greedy_soup(states, score)
    assert result.ingredients == [2, 1] == reference_greedy(states, score)
    assert [s.index for s in result.history] == [2, 0, 1]
    assert [s.accepted for s in result.history] == [True, False, True]
    assert result.score == pytest.approx(1.0)
    # the linear method's running mean of the members in selection order (not a sum then a division)
    assert torch.equal(result.state_dict["w"], torch.lerp(states[2]["w"], states[1]["w"], 0.5))


def test_ties_keep_input_order():
    states = [toy(0.5, 0.0), toy(0.0, 0.3), toy(0.3, 0.0), toy(0.0, -0.3)]  # .75, .91, .91, .91
    score = distance_score(TARGET)
    result = greedy_soup(states, score)
    assert [s.index for s in result.history] == [1, 2, 3, 0]
    assert result.ingredients == reference_greedy(states, score)


def test_accept_ge_takes_an_equal_candidate_gt_does_not():
    states = [toy(0.3, 0.0), toy(0.3, 0.0), toy(0.6, 0.0)]  # the second is a copy of the first
    score = distance_score(TARGET)
    assert greedy_soup(states, score).ingredients == [0] == reference_greedy(states, score, "gt")
    assert greedy_soup(states, score, accept="ge").ingredients == [0, 1] == reference_greedy(states, score, "ge")


def test_nan_ingredient_is_never_first_and_never_added():
    states = [toy(math.nan, 0.0), toy(0.3, 0.0), toy(-0.3, 0.0)]
    score = distance_score(TARGET)
    result = greedy_soup(states, score)
    assert result.ingredients == [1, 2] == reference_greedy(states, score)
    assert result.scores[0] is None
    nan_step = next(s for s in result.history if s.index == 0)
    assert not nan_step.accepted and "NaN" in nan_step.note
    assert torch.isfinite(result.state_dict["w"]).all()
    json.dumps(result.to_dict())  # NaN must not leak into the JSON record


def test_all_nan_is_refused():
    states = [toy(math.nan, 0.0), toy(0.0, math.nan)]
    with pytest.raises(SoupkitError, match="no.*finite held-out score|none of the 2 ingredients"):
        greedy_soup(states, distance_score(TARGET))


@pytest.mark.parametrize("accept", ["gt", "ge"])
def test_random_cases_match_reference(accept):
    rng = random.Random(1234)
    for case in range(60):
        count = rng.randint(2, 9)
        states = [toy(*(rng.uniform(-0.6, 0.6) for _ in range(3))) for _ in range(count)]
        if case % 5 == 0:
            states[rng.randrange(count)] = toy(math.nan, 0.0, 0.0)
        if case % 3 == 0:  # duplicates make ties in the sort and between candidates and the best
            states[rng.randrange(count)] = {k: v.clone() for k, v in states[0].items()}
        target = torch.tensor([rng.uniform(-0.2, 0.2) for _ in range(3)])
        score = distance_score(target, resolution=0.05)
        if all(math.isnan(score(s)) for s in states):
            continue
        result = greedy_soup(states, score, accept=accept)
        assert result.ingredients == reference_greedy(states, score, accept), f"case {case}"


def test_integer_buffers_from_first_member_and_inputs_untouched():
    states = [toy(0.35, 0.05), toy(-0.4, 0.0), toy(0.3, 0.0)]
    states[2]["step"] = torch.tensor(99)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    result = greedy_soup(states, distance_score(TARGET))
    assert result.state_dict["step"].item() == 99 and result.state_dict["step"].dtype == torch.int64
    for state, copy in zip(states, before):
        assert all(torch.equal(state[k], copy[k]) for k in copy)


def test_prescreen_skips_weak_ingredients():
    states = [toy(0.35, 0.05), toy(-0.4, 0.0), toy(0.3, 0.0)]  # c (.84) would have helped
    result = greedy_soup(states, distance_score(TARGET), prescreen=0.85)
    assert result.ingredients == [2]
    skipped = next(s for s in result.history if s.index == 1)
    assert "prescreen" in skipped.note and skipped.candidate is None
    with pytest.raises(ParameterError, match="--prescreen 0.95: no ingredient reaches it"):
        greedy_soup(states, distance_score(TARGET), prescreen=0.95)


def test_option_errors_name_the_option():
    states = [toy(0.3, 0.0), toy(0.2, 0.0)]
    with pytest.raises(ParameterError, match=r"--accept: unknown rule 'gte'.*Available: ge, gt"):
        greedy_soup(states, distance_score(TARGET), accept="gte")
    with pytest.raises(ParameterError, match=r"--prescreen: expected an accuracy in \[0, 1\]"):
        greedy_soup(states, distance_score(TARGET), prescreen=85)
    with pytest.raises(ParameterError, match="--eval: expected an Evaluator"):
        greedy_soup(states, 3)


# ------------------------------------------------------------------------------------- with an Evaluator


def full_count(evaluator):
    """Held-out correct count from a full evaluation (no cache, no early stop)."""

    def score(state):
        return float(evaluator.evaluate(state, ["heldout"], use_cache=False)["heldout"].correct)

    return score


def test_early_stop_gives_identical_decisions(digits_setup):
    paths = digits_setup.paths
    fast_ev = digits_setup.make_evaluator()
    fast = greedy_soup(paths, fast_ev)
    slow_ev = digits_setup.make_evaluator()
    slow = greedy_soup(paths, lambda sd: slow_ev.evaluate(sd, ["heldout"], use_cache=False))
    reference = reference_greedy(digits_setup.ingredients, full_count(digits_setup.make_evaluator()))
    assert fast.ingredients == slow.ingredients == reference
    assert len(fast.ingredients) >= 2, "the setup should make a real soup"
    assert [s.accepted for s in fast.history] == [s.accepted for s in slow.history]
    assert fast.stats["early_stops"] >= 1
    assert 0 < fast.stats["examples_evaluated"] < fast.stats["examples_full"]
    assert fast.stats["forward_passes"] < slow_ev.forward_passes - 8 * 6  # minus the individual scoring passes
    for step in fast.history:
        if step.stopped_early:
            assert step.examples_seen < 300 and step.candidate is None and not step.accepted
    # the final soup scores what the record says
    soup_score = fast_ev.evaluate(fast.state_dict, ["heldout"], use_cache=False)["heldout"].accuracy
    assert soup_score == pytest.approx(fast.score)


def test_candidates_see_the_hardest_examples_first(digits_setup):
    ev = digits_setup.make_evaluator()
    greedy_soup(digits_setup.paths, ev)
    orders = [o for o in ev.orders_seen if o is not None]
    assert orders, "candidate evaluations should be given an example order"
    n = ev.num_examples("heldout")
    wrong = torch.zeros(n, dtype=torch.int64)
    for path in digits_setup.paths:
        wrong += (~ev.evaluate(path, ["heldout"]).datasets["heldout"].correct_mask).long()
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
        assert torch.all(wrong[order][:-1] >= wrong[order][1:]), "most-missed examples must come first"


def test_an_evaluator_without_example_orders_still_works(digits_setup):
    ev = digits_setup.make_evaluator()
    full = ev.evaluate

    def evaluate(state, datasets=None, *, need_correct=None, use_cache=None, progress=False):
        return full(state, datasets, need_correct=need_correct, use_cache=use_cache, progress=progress)

    ev.evaluate = evaluate
    result = greedy_soup(digits_setup.paths, ev)
    assert result.ingredients == greedy_soup(digits_setup.paths, digits_setup.make_evaluator()).ingredients
    assert all(o is None for o in ev.orders_seen)


def test_cached_scores_and_each_ingredient_read_once(digits_setup, monkeypatch):
    from soupkit.io.safetensors_io import SafetensorsReader

    ev = digits_setup.make_evaluator()
    for path in digits_setup.paths:
        ev.evaluate(path, ["heldout"])  # warm the evaluator's cache
    reads: dict[str, int] = {}
    original = SafetensorsReader.get

    def counting_get(self, key):
        reads[str(self.path)] = reads.get(str(self.path), 0) + 1
        return original(self, key)

    monkeypatch.setattr(SafetensorsReader, "get", counting_get)
    result = greedy_soup(digits_setup.paths, ev)
    assert result.stats["cached_scores"] == len(digits_setup.paths)
    n_keys = len(digits_setup.ingredients[0])
    float_keys = n_keys  # the MLP has only floating tensors
    for path in digits_setup.paths:
        assert reads[str(path)] == float_keys, f"{path} read {reads[str(path)]} tensors"


def test_output_report_and_provenance(digits_setup, tmp_path):
    from soupkit.io import load_checkpoint, open_checkpoint

    ev = digits_setup.make_evaluator()
    out = tmp_path / "soup.safetensors"
    result = greedy_soup(digits_setup.paths, ev, output=out, report_dir=tmp_path / "report")
    assert result.path == out and result.state_dict is None
    soup = load_checkpoint(out)
    expected = {k: sum(digits_setup.ingredients[i][k] for i in result.ingredients) / len(result.ingredients)
                for k in soup}
    for key in soup:
        torch.testing.assert_close(soup[key], expected[key], rtol=1e-6, atol=1e-6)
    reader = open_checkpoint(out)
    meta = reader.metadata
    reader.close()
    assert meta["soupkit.method"] == "linear"  # written by the linear method over the selected ingredients
    record = json.loads(meta["soupkit.greedy"])
    # ingredient names (file names), never the absolute paths the inputs were given as
    assert record["selected"] == [digits_setup.paths[i].name for i in result.ingredients]
    assert record["order"] == [digits_setup.paths[i].name for i in result.rule["order"]]
    assert record["accept"] == "gt" and not any("/" in name for name in record["scores"])
    assert str(digits_setup.paths[0].parent) not in json.dumps(meta)
    assert len(json.loads(meta["soupkit.ingredients"])) == len(result.ingredients)
    report = json.loads((tmp_path / "report" / "soup.json").read_text())  # named after the output
    assert report["ingredients"] == result.ingredients and len(report["history"]) == len(digits_setup.paths)
    kinds = [p["kind"] for p in report["extra"]["scatter"]]
    assert kinds.count("ingredient") == len(digits_setup.paths) and "uniform" in kinds and "greedy" in kinds
    assert result.report_files == [tmp_path / "report" / n for n in ("soup_steps.png", "soup_scatter.png",
                                                                      "soup.json")]
    for name in ("soup_steps.png", "soup_scatter.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    with pytest.raises(OutputError, match="output exists"):
        greedy_soup(digits_setup.paths, ev, output=out)
    with pytest.raises(OutputError, match="would overwrite the input"):
        greedy_soup(digits_setup.paths, ev, output=digits_setup.paths[0], force=True)


def test_table_renders(digits_setup):
    from rich.console import Console

    result = greedy_soup(digits_setup.paths[:4], digits_setup.make_evaluator())
    console = Console(record=True, width=160)
    result.print_table(console)
    text = console.export_text()
    assert "Greedy soup (gt)" in text and Path(digits_setup.paths[0]).stem in text \
        and "*.safetensors" in text  # the shared folder and extension are said once, under the table
