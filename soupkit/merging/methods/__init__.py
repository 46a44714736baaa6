"""Built-in merge methods, one small module each. Importing this package registers them all."""

from soupkit.merging.methods import linear, wise  # noqa: F401
