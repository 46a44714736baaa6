"""Helpers shared by the evaluator tests."""

from __future__ import annotations

from typing import Any

WIDTH = 8  # the demo's digits CNN, narrowed: fast on a shared 2-core CPU


def make_model() -> Any:
    from soupkit.demo_train import DigitsCNN

    return DigitsCNN(num_classes=10, width=WIDTH)


def digits_recipe(**overrides: Any) -> dict[str, Any]:
    """The digits CNN on a held-out split and two test sets; batch 64 so every set spans several batches."""
    recipe = {
        "model": {"kind": "python", "factory": "soupkit.demo_train:DigitsCNN", "num_classes": 10,
                  "kwargs": {"width": WIDTH}},
        "data": {
            "heldout": {"kind": "digits", "split": "heldout"},
            "test": {"clean": {"kind": "digits", "split": "test"},
                     "noise": {"kind": "digits", "split": "test", "shift": "noise"}},
        },
        "batch_size": 64,
        "device": "cpu",
        "precision": "fp32",
    }
    recipe.update(overrides)
    return recipe
