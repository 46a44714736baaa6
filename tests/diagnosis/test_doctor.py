"""``soupkit.doctor``: the Gram pass against a float64 reference, the verdicts on real digits CNNs fine-tuned from
one initialisation and from two, duplicates, barriers against evaluations done by hand, the JSON and the plot."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import soupkit
from soupkit.diagnosis import doctor
from soupkit.diagnosis.rules import BARRIER_MAX, VERDICTS
from soupkit.diagnosis.stats import gram_pass, module_of
from soupkit.io import load_checkpoint, open_checkpoint


def _flat(state: dict[str, torch.Tensor], keys: list[str] | None = None) -> torch.Tensor:
    keys = keys if keys is not None else [k for k, v in state.items() if v.is_floating_point()]
    return torch.cat([state[k].double().reshape(-1) for k in keys])


def _readers(paths):
    return [open_checkpoint(p) for p in paths]


@pytest.mark.parametrize("with_base", [True, False])
def test_gram_equals_a_float64_reference(ingredients, with_base: bool) -> None:
    """Whole model and per module, chunked much finer than any tensor (so chunks split tensors)."""
    paths = [*ingredients.same, ingredients.other]
    states = [load_checkpoint(p) for p in paths]
    base = load_checkpoint(ingredients.base)
    readers = _readers(paths)
    keys = readers[0].keys()
    stats = gram_pass(readers, keys, open_checkpoint(ingredients.base) if with_base else None, budget=3000)
    rows = torch.stack([_flat(s) for s in states])
    vectors = rows - _flat(base) if with_base else rows - rows.mean(0)
    reference = vectors @ vectors.T
    assert stats.centred is (not with_base)
    torch.testing.assert_close(stats.gram[""], reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.raw_sq, (rows * rows).sum(1), rtol=1e-12, atol=0)
    modules = module_of(keys, {k: states[0][k].numel() for k in keys})
    assert set(stats.gram) == {"", *modules.values()} == {"", "features", "head.1", "head.3"}
    for module in ("features", "head.1"):
        members = [k for k in keys if modules[k] == module]
        part = torch.stack([_flat(s, members) for s in states])
        part = part - _flat(base, members) if with_base else part - part.mean(0)
        torch.testing.assert_close(stats.gram[module], part @ part.T, rtol=1e-10, atol=1e-12)


def test_integer_buffers_are_skipped_and_state_dicts_work() -> None:
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5, 3, generator=g), "steps": torch.tensor([i * 100])} for i in range(3)]
    stats = gram_pass(_readers(states), ["w", "steps"])
    flat = torch.stack([s["w"].double().reshape(-1) for s in states])
    centred = flat - flat.mean(0)
    torch.testing.assert_close(stats.gram[""], centred @ centred.T, rtol=1e-10, atol=1e-12)
    assert stats.numel[""] == 15


def test_one_initialisation_vs_two_are_told_apart(ingredients) -> None:
    same = doctor(ingredients.same, base=ingredients.base)
    assert set(same.verdict.values()) == {"soupable"}, same.reason
    assert same.overall == "uniform soup likely fine"
    for base in (ingredients.base, None):
        mixed = doctor([*ingredients.same, ingredients.other], base=base)
        words = [mixed.verdict[n] for n in mixed.names]
        assert words == ["soupable"] * 4 + ["different_init"], mixed.reason
        assert mixed.overall == "use greedy" and "1 different_init" in mixed.overall_reason
        assert "× the median link" in mixed.reason[str(ingredients.other)]
    # the numbers behind it: far apart, and near-orthogonal (or worse) to the others' task vectors
    with_base = doctor([*ingredients.same, ingredients.other], base=ingredients.base)
    other = len(ingredients.same)
    assert min(with_base.distance[other][:other]) > 5 * max(with_base.distance[0][1:other])
    assert max(with_base.cosine[other][:other]) < 0.2 < min(with_base.cosine[0][1:other])


def test_two_inits_in_equal_numbers_do_not_soup(ingredients, tmp_path: Path) -> None:
    """Two from each start: no majority, but the gap rule still splits them (the earlier group is the main one)."""
    one = doctor([ingredients.same[0], ingredients.other], base=None)
    assert one.overall == "will not soup"  # 2 inputs, no base: the absolute FAR_REL bound cuts the edge
    two = doctor([*ingredients.same[:2], ingredients.other, ingredients.other_b])
    assert [two.verdict[n] for n in two.names] == ["soupable", "soupable", "different_init", "different_init"]
    assert two.overall == "use greedy" and two.overall_reason.startswith("2 different_init of 4")


def test_duplicates_are_found(ingredients, tmp_path: Path) -> None:
    copy = tmp_path / "copy_of_A1.safetensors"
    shutil.copyfile(ingredients.same[1], copy)
    near = {k: v * (1 + 1e-9) if v.is_floating_point() else v for k, v in load_checkpoint(ingredients.same[2]).items()}
    report = doctor([*ingredients.same, copy, near], base=ingredients.base)
    assert report.verdict[str(copy)] == "duplicate"
    assert report.reason[str(copy)] == f"of {ingredients.same[1]}: bit-identical weights"
    assert report.verdict["<state dict #5>"] == "duplicate"
    assert report.reason["<state dict #5>"].startswith(f"of {ingredients.same[2]}: ")
    assert report.distance[1][4] == 0.0 and report.cosine[1][4] == pytest.approx(1.0, abs=1e-12)
    assert [report.verdict[str(p)] for p in ingredients.same] == ["soupable"] * 4
    assert report.overall == "uniform soup likely fine" and "2 duplicate(s)" in report.overall_reason


def test_incompatible_input_is_a_verdict_not_a_crash(ingredients, tmp_path: Path) -> None:
    from soupkit.demo_train import digits_cnn

    odd = tmp_path / "five_classes.safetensors"
    soupkit.save_checkpoint(digits_cnn(num_classes=5).state_dict(), odd)
    report = doctor([*ingredients.same[:3], odd], base=ingredients.base)
    assert report.verdict[str(odd)] == "incompatible"
    assert report.reason[str(odd)] == (f"shape mismatch at 'head.3.weight': {ingredients.same[0]} has (10, 64), "
                                       f"{odd} has (5, 64)")
    assert report.cosine[3] == [None] * 4 and report.norm[3] is None
    assert report.overall == "use greedy"


@pytest.fixture(scope="module")
def evaluated(ingredients, tmp_path_factory: pytest.TempPathFactory):
    from soupkit.eval import Evaluator

    evaluator = Evaluator.from_recipe("digits", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))
    out = tmp_path_factory.mktemp("doctor_out")
    paths = [*ingredients.same, ingredients.other]
    report = doctor(paths, base=ingredients.base, evaluator=evaluator, json=out / "doctor.json",
                    plot=out / "angles.png")
    return report, evaluator, paths, out


def _heldout(evaluator, source) -> float:
    return evaluator.evaluate(source, ["heldout"], use_cache=False).datasets["heldout"].accuracy


def test_barriers_equal_evaluations_by_hand(evaluated) -> None:
    report, evaluator, paths, _ = evaluated
    states = {str(p): load_checkpoint(p) for p in paths}
    for name, state in states.items():
        assert report.scores[name] == _heldout(evaluator, state)
    best = max((str(p) for p in paths[:4]), key=lambda n: report.scores[n])
    assert report.best == best
    for name in report.barrier:
        if name in report.stats["barrier_lower_bound"]:
            continue
        start, end = report.scores[best], report.scores[name]
        drops, hand = [], [[0.0, start]]
        for alpha in (0.25, 0.5, 0.75):
            mixed = {k: torch.lerp(v.float(), states[name][k].float(), alpha).to(v.dtype) if v.is_floating_point()
                     else v for k, v in states[best].items()}
            hand.append([alpha, _heldout(evaluator, mixed)])
            drops.append((1 - alpha) * start + alpha * end - hand[-1][1])
        assert report.path[name] == [*hand, [1.0, end]], name  # every point, exactly
        assert report.barrier[name] == pytest.approx(max(0.0, *drops), abs=1e-12), name
    # exact barriers for the four from one start; the different-init one is proven above the bar
    assert sorted(report.barrier) == sorted(n for n in states if n != best)
    assert report.stats["barrier_lower_bound"] in ([], [str(paths[4])])
    assert report.barrier[str(paths[4])] > BARRIER_MAX
    assert report.verdict[str(paths[4])] == "different_init"
    uniform = soupkit.uniform_soup(paths)
    assert report.uniform_score == _heldout(evaluator, uniform)


def test_json_report_schema(evaluated) -> None:
    report, _, paths, out = evaluated
    data = json.loads((out / "doctor.json").read_text())
    n = len(paths)
    assert data["names"] == [str(p) for p in paths]
    for key in ("cosine", "distance", "angle"):
        assert len(data[key]) == n and all(len(row) == n for row in data[key])
    assert all(data["distance"][i][i] == 0.0 and data["cosine"][i][i] == pytest.approx(1.0) for i in range(n))
    assert set(data["verdict"]) == set(data["names"]) and set(data["verdict"].values()) <= set(VERDICTS)
    assert data["overall"] in ("uniform soup likely fine", "use greedy", "will not soup")
    assert set(data["barrier"]) == set(data["names"]) - {data["best"]}
    assert all(isinstance(v, float) and v >= 0 for v in data["barrier"].values())
    assert data["vectors"] == "theta_i - theta_base" and data["centred"] is False
    assert set(data["modules"]) == {"features", "head.1", "head.3"}
    assert data == report.to_dict()
    for name, points in data["path"].items():
        assert [a for a, _ in points] == [0.0, 0.25, 0.5, 0.75, 1.0], name
    png = (out / "angles.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_top_level_function_survives_importing_its_package() -> None:
    import soupkit.diagnosis  # a submodule import must not shadow the function soupkit.doctor

    assert soupkit.doctor is doctor and callable(soupkit.doctor)
    assert "doctor" in dir(soupkit)


def test_barrier_rule() -> None:
    from soupkit.diagnosis.rules import barrier

    assert barrier(0.9, 0.8, [(0.25, 0.9), (0.5, 0.85), (0.75, 0.825)]) == 0.0
    assert barrier(0.9, 0.8, [(0.25, 0.875), (0.5, 0.5), (0.75, 0.8)]) == pytest.approx(0.35)
    assert math.isclose(barrier(0.5, 0.5, [(0.5, 0.4)]), 0.1)


@pytest.mark.parametrize("with_base", [False, True])
def test_nan_weights_are_named(ingredients, with_base: bool) -> None:
    from soupkit.errors import NonFiniteError

    broken = load_checkpoint(ingredients.same[0])
    broken["head.1.bias"][3] = math.nan
    base = ingredients.base if with_base else None
    with pytest.raises(NonFiniteError, match=r"^<state dict #2>: holds NaN or Inf weights"):
        doctor([*ingredients.same[1:3], broken], base=base)


def test_nan_base_is_named(ingredients) -> None:
    from soupkit.errors import NonFiniteError

    base = load_checkpoint(ingredients.base)
    base["features.0.weight"][0, 0, 0, 0] = math.inf
    with pytest.raises(NonFiniteError, match=r"^<base state dict>: the base holds NaN or Inf weights"):
        doctor(ingredients.same[:2], base=base)


def test_a_plain_callable_evaluator_works(ingredients) -> None:
    """Any ``state_dict -> float`` (no cache, no early stop), as the soup algorithms accept."""
    seen: list[int] = []

    def score(state) -> float:
        seen.append(len(state))
        return 0.5 + 0.01 * float(state["head.3.bias"][0] > 0)

    report = doctor(ingredients.same[:3], base=ingredients.base, evaluator=score)
    assert len(seen) == 3 + 2 * 3 + 1  # three ingredients, three points on each of two paths, the uniform soup
    assert set(report.barrier) == set(map(str, ingredients.same[:3])) - {report.best}
    best = report.scores[report.best]
    assert report.uniform_score in (0.5, 0.51)
    assert report.overall == ("use greedy" if report.uniform_score < best else "uniform soup likely fine")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_low_precision_inputs_are_read_exactly(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(64, 8, generator=g).to(dtype), "b": torch.randn(8, generator=g)} for _ in range(3)]
    stats = gram_pass(_readers(states), ["w", "b"])
    rows = torch.stack([_flat(s) for s in states])
    centred = rows - rows.mean(0)
    torch.testing.assert_close(stats.gram[""], centred @ centred.T, rtol=1e-10, atol=1e-12)


def test_a_dip_on_the_path_is_a_different_basin(ingredients) -> None:
    """An evaluator whose accuracy collapses between two ingredients (as between two basins): 90 % at every
    ingredient, 60 % anywhere else. Every path dips 30 points, so all but the best are different_basin."""
    states = [load_checkpoint(p) for p in ingredients.same[:3]]

    def score(state) -> float:
        return 0.9 if any(torch.equal(state["head.3.bias"], s["head.3.bias"]) for s in states) else 0.6

    report = doctor(ingredients.same[:3], base=ingredients.base, evaluator=score)
    others = [n for n in report.names if n != report.best]
    assert [report.verdict[n] for n in others] == ["different_basin"] * 2
    assert all(report.barrier[n] == pytest.approx(0.3) for n in others)
    assert "dips 30.0 points below the line" in report.reason[others[0]]
    assert report.overall == "will not soup"
