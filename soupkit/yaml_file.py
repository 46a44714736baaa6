"""Reading the YAML files users write (evaluation recipes, merge configs): every failure is one ``RecipeError``
line naming the file, including the ones PyYAML does not turn into ``YAMLError`` (hostile nesting depth, alias
bombs).

Why the node count: YAML aliases share nodes, so "billion laughs" (nine anchors, each a list of ten aliases to
the previous) loads in microseconds as a shared graph, then hangs whatever walks it (validation, hashing,
``json.dumps``). We compose the node graph first and count nodes as a walk would see them, aliases expanded,
stopping at ``MAX_YAML_NODES``; a recursive alias (``&a [*a]``) counts forever and is refused the same way.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError

#: nodes a config or recipe may hold with aliases expanded; real ones hold a few hundred
MAX_YAML_NODES = 100_000
#: bytes a config or recipe file may hold
MAX_YAML_BYTES = 16 * 1024 * 1024


def _expanded_nodes(root: Any, limit: int) -> int:
    """Nodes under ``root`` counted as a walk sees them (an alias once per use); stops just past ``limit``."""
    import yaml

    count, stack = 0, [root]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return count


def _read_text(path: Path, what: str) -> str:
    try:
        info = path.stat()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read {what}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise RecipeError(f"{path}: {what} is not a regular file")
    if info.st_size > MAX_YAML_BYTES:
        raise RecipeError(f"{path}: {what} is {info.st_size:,} bytes; at most {MAX_YAML_BYTES:,} are read")
    return path.read_text(encoding="utf-8")


def read_yaml(path: Path, what: str) -> Any:
    """Parse ``path`` like ``yaml.safe_load``; ``what`` ("recipe", "merge config") is for messages."""
    import yaml

    try:
        loader = yaml.SafeLoader(_read_text(path, what))
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
                raise RecipeError(f"{path}: {what} expands to more than {MAX_YAML_NODES:,} values through YAML "
                                  f"aliases (an alias bomb or a recursive alias?)")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: {what} is nested too deeply to be a {what}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read {what}: {error}") from None
