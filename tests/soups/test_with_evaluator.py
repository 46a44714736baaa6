"""The soup algorithms on the real ``soupkit.eval.Evaluator`` (digits recipe data, the recipe's CNN), with a small
batch size so that the exact early stop has batches to skip."""

from __future__ import annotations

from soupkit.soups import greedy_soup, learned_soup, wise_sweep

SHIFTS = ("noise", "blur")


def recipe(batch_size: int = 30) -> dict:
    digits = {"kind": "digits", "size": 16}
    return {
        "model": {"kind": "python", "factory": "soupkit.demo_train:digits_cnn", "num_classes": 10},
        "data": {"heldout": {**digits, "split": "heldout"},
                 "test": {"clean": {**digits, "split": "test"},
                          **{s: {**digits, "split": "test", "shift": s} for s in SHIFTS}}},
        "batch_size": batch_size,
        "device": "cpu",
        "precision": "fp32",
    }


def test_greedy_early_stop_identical_to_full_evaluations(cnn_ingredients, tmp_path):
    from soupkit.eval import Evaluator

    fast_ev = Evaluator.from_recipe(recipe(), cache_dir=tmp_path / "fast")
    fast = greedy_soup(cnn_ingredients, fast_ev, report_dir=tmp_path / "report")
    full_ev = Evaluator.from_recipe(recipe(), cache_dir=tmp_path / "full")
    slow = greedy_soup(cnn_ingredients, lambda sd: full_ev.evaluate(sd, ["heldout"], use_cache=False))
    assert fast.ingredients == slow.ingredients
    assert [s.accepted for s in fast.history] == [s.accepted for s in slow.history]
    assert fast.score == slow.score
    assert fast.stats["early_stops"] >= 1 and fast.stats["examples_saved"] > 0
    # a second run answers every individual score from the cache and makes the same soup
    again = greedy_soup(cnn_ingredients, fast_ev)
    assert again.stats["cached_scores"] == len(cnn_ingredients) and again.ingredients == fast.ingredients
    kinds = {p["kind"] for p in fast.extra["scatter"]}
    assert kinds == {"ingredient", "uniform", "greedy"}
    assert all(set(p["accuracies"]) == {"clean", *SHIFTS} for p in fast.extra["scatter"])
    assert (tmp_path / "report" / "greedy_scatter.png").stat().st_size > 5000


def test_sweep_and_learned_on_the_evaluator(cnn_ingredients, tmp_path):
    from soupkit.eval import Evaluator

    ev = Evaluator.from_recipe(recipe(batch_size=256), cache_dir=tmp_path / "cache")
    passes = ev.forward_passes
    sweep = wise_sweep(cnn_ingredients[5], cnn_ingredients[0], "0:1:0.25", ev)
    batches = sum(-(-ev.num_examples(name) // 256) for name in ev.dataset_names)
    assert ev.forward_passes - passes == 5 * batches  # one evaluation per α, nothing else
    assert all(p.test is not None and p.shift is not None for p in sweep.history)
    learned = learned_soup(cnn_ingredients, ev, steps=30, lr=0.1)
    assert learned.extra["heldout_loss"] < learned.extra["uniform_loss"]
