"""Built-in merge methods, one small module each. Importing this package registers them all."""

from soupkit.merging.methods import (  # noqa: F401
    dare,
    fisher,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
    wise,
)
