"""User-facing errors.

Every problem a user can cause (a bad file, a bad option, incompatible checkpoints) is raised as a
``SoupkitError``: the CLI prints its message as one line on stderr and exits with code 2, no traceback.
Anything else escaping soupkit is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SoupkitError(Exception):
    """A problem with the user's input; the message says what is wrong and, where possible, how to fix it."""

    exit_code = 2


class CheckpointError(SoupkitError):
    """A checkpoint file cannot be read, is malformed, or is refused (e.g. a pickle that would run code)."""


class IncompatibleCheckpointsError(SoupkitError):
    """Checkpoints that should be merged disagree on keys, shapes or dtypes."""


class OutputError(SoupkitError):
    """The output path cannot be written safely (exists, is an input, is a directory, ...)."""


class ParameterError(SoupkitError):
    """An option or method parameter has an invalid value."""


class RecipeError(SoupkitError):
    """An evaluation recipe or merge config is invalid."""


class NonFiniteError(SoupkitError):
    """An input tensor holds NaN or Inf."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' hint for a misspelt name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_choice(what: str, name: str, choices: Iterable[str]) -> str:
    """Message for an unknown registry name that lists what is available and the nearest match."""
    choices = sorted(choices)
    return f"unknown {what} {name!r}.{suggest(name, choices)} Available: {', '.join(choices)}"
