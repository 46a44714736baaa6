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


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_image_folder(root: Any, classes: int = 3, per_class: int = 4, seed: int = 0, names: list[str] | None = None
                       ) -> Any:
    """``root/<class>/<i>.png``: random RGB images of varied sizes (so the transform's resize really runs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / (names[c] if names else f"class{c}")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def pil_dataset(n: int = 6, size: int = 24) -> list:
    """A map-style dataset of (PIL image, label), for ``kind: python`` data."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    return [(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), i % 2) for i in range(n)]
