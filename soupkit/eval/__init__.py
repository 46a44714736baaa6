"""The evaluator: score checkpoints on a recipe's held-out and test data, fast enough to sit inside greedy soups,
WiSE-FT sweeps and learned soups.

```python
from soupkit.eval import Evaluator, as_score
ev = Evaluator.from_recipe("digits")                 # a recipe path, bare name or mapping
result = ev("finetuned.safetensors")                 # or a state dict -> EvalResult
result["heldout"].accuracy, result["heldout"].correct_mask, ev.shift_names
```

Names are imported lazily so that ``import soupkit.eval`` (and recipe validation) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from soupkit._lazy import lazy_exports

_LAZY = {
    "Evaluator": "soupkit.eval.evaluator",
    "EvalResult": "soupkit.eval.result",
    "DatasetResult": "soupkit.eval.result",
    "as_score": "soupkit.eval.result",
    "Recipe": "soupkit.eval.recipe",
    "load_recipe": "soupkit.eval.recipe",
    "find_recipe": "soupkit.eval.recipe",
    "available_recipes": "soupkit.eval.recipe",
    "ScoreCache": "soupkit.eval.cache",
    "zeroshot_checkpoint": "soupkit.eval.models.clip",
    "model_adapter": "soupkit.eval.registry",
    "data_adapter": "soupkit.eval.registry",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


if TYPE_CHECKING:  # pragma: no cover
    from soupkit.eval.cache import ScoreCache  # noqa: F401
    from soupkit.eval.evaluator import Evaluator  # noqa: F401
    from soupkit.eval.models.clip import zeroshot_checkpoint  # noqa: F401
    from soupkit.eval.recipe import Recipe, available_recipes, find_recipe, load_recipe  # noqa: F401
    from soupkit.eval.registry import data_adapter, model_adapter  # noqa: F401
    from soupkit.eval.result import DatasetResult, EvalResult, as_score  # noqa: F401
