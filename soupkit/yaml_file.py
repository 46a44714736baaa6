"""Reading the YAML files users write (evaluation recipes, merge configs): every failure is one ``RecipeError``
line naming the file, including the ones PyYAML does not turn into ``YAMLError`` (hostile nesting depth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError


def read_yaml(path: Path, what: str) -> Any:
    """Parse ``path`` with ``yaml.safe_load``; ``what`` ("recipe", "merge config") is for messages."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: {what} is nested too deeply to be a {what}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read {what}: {error}") from None
