"""The soup algorithms on the real ``soupkit.eval.Evaluator`` (digits recipe data, the recipe's CNN), with a small
batch size so that the exact early stop has batches to skip."""

from __future__ import annotations

import pytest
import torch

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


@pytest.fixture(scope="module")
def cnn_ingredients(tmp_path_factory: pytest.TempPathFactory):
    """A start CNN trained briefly on the digits train split, then 6 short fine-tunes (some with label noise)."""
    from soupkit.demo_train import digits_cnn
    from soupkit.eval.data.digits import load_digits_split
    from soupkit.io import save_checkpoint

    x, y = load_digits_split("train", size=16)

    def train(model, seed, lr, steps, noise=0.0):
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        for _ in range(steps):
            i = torch.randint(0, len(y), (32,), generator=g)
            labels = y[i].clone()
            flip = torch.rand(len(i), generator=g) < noise
            labels[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), labels).backward()
            opt.step()
        return model

    torch.manual_seed(0)
    start = train(digits_cnn(), 100, 0.1, 40).state_dict()
    folder = tmp_path_factory.mktemp("cnn")
    paths = []
    for i, (lr, steps, noise) in enumerate([(0.05, 12, 0.0), (0.1, 10, 0.0), (0.02, 15, 0.0), (0.2, 10, 0.4),
                                            (0.05, 12, 0.2), (0.3, 8, 0.6)]):
        model = digits_cnn()
        model.load_state_dict(start)
        paths.append(save_checkpoint(train(model, i, lr, steps, noise).state_dict(), folder / f"ft{i}.safetensors"))
    return paths


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
