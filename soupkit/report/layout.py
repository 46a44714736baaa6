"""Tables that read well at the terminal's real width (80 columns included), piped or not.

The rules every soupkit table follows: numbers and headers are never cut (their columns do not wrap; a header
of several words may wrap at a space); file names are never broken mid-word (the common folder and extension
are stripped and named once in the caption, and a name that still does not fit is shortened from the middle,
keeping both ends); when the table is wider than the console it drops its vertical rules before anything is
shortened. ``console()`` replaces a console forced to 120 columns: it uses the real width (``COLUMNS`` or
the terminal; rich's 80 when piped).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

ELLIPSIS = "…"
#: the narrowest a shortened file name gets: enough for "fine…_07" to stay recognisable
MIN_NAME_WIDTH = 8


def console(*, stderr: bool = False) -> Any:
    """A rich console at the real width of the terminal (rich's 80 columns when output is piped)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def shorten_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, never broken mid-word at its end: a path keeps its file name
    whole and loses whole folders from the front (``…/runs/ft_03.pt``); a file name too long even alone loses
    its extension (``finetuned_03…``), then its middle, both ends kept (``fine…ed_03``)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    base = text.replace(os.sep, "/").rsplit("/", 1)[-1]
    if len(base) < len(text) and len(base) + 2 <= width:
        tail = text.replace(os.sep, "/")[len(text) - (width - 1):]
        return ELLIPSIS + tail[tail.index("/"):]  # whole folder names only
    if len(base) <= width:
        return base
    stem, extension = os.path.splitext(base)
    if not extension[1:].isalpha():  # "lr0.0003_wd0.01_00" has no extension, only dots
        stem = base
    elif len(stem) + 1 <= width:  # the extension goes first: the stem is what tells files apart
        return stem + ELLIPSIS
    tail = width // 2  # then the middle: the end of a name (its number) tells files apart as much as its start
    head = width - 1 - tail
    return stem[:head] + ELLIPSIS + stem[len(stem) - tail:]


#: the weights files of a model or adapter folder: a table names the folder (``ft/lr3e-5``), not its file
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                  "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def folder_name(name: str) -> str:
    """``ft/x/model.safetensors`` -> ``ft/x``: a folder's weights file is shown as the folder it stands for."""
    text = str(name).replace(os.sep, "/").rstrip("/")
    head, _, tail = text.rpartition("/")
    return head if head and tail in FOLDER_WEIGHTS else text


def display_names(names: Sequence[str], what: str = "files") -> tuple[list[str], str | None]:
    """Labels for a table's name column and the caption saying what they share (or None): folders by their name,
    the common folder and extension stripped (``common_parts``)."""
    labels, folder, extension = common_parts([folder_name(n) for n in names])
    return labels, names_caption(folder, extension, what)


def common_parts(names: Sequence[str]) -> tuple[list[str], str | None, str | None]:
    """Labels for file names without what they share: ``(labels, folder, extension)``; ``folder`` /
    ``extension`` are None when nothing was stripped. Labels stay distinct (nothing is stripped otherwise)."""
    names = [str(n) for n in names]
    if not names or len(set(names)) != len(names) or (len(names) == 1 and not os.path.dirname(names[0])):
        return names, None, None
    folder = None
    parents = [os.path.dirname(n) for n in names]
    if all(parents):
        try:
            folder = os.path.commonpath(parents) if len({os.path.isabs(p) for p in parents}) == 1 else None
        except ValueError:
            folder = None
    labels = [os.path.relpath(n, folder) for n in names] if folder else list(names)
    extension = os.path.splitext(labels[0])[1]
    if extension and all(label.endswith(extension) for label in labels):
        stripped = [label[: -len(extension)] for label in labels]
        if len(set(stripped)) == len(stripped) and all(stripped):
            return stripped, folder or None, extension
    return labels, folder or None, None


def names_caption(folder: str | None, extension: str | None, what: str = "files") -> str | None:
    """The one line that says what ``common_parts`` stripped, e.g. ``files: ckpt/*.safetensors``."""
    if folder is None and extension is None:
        return None
    pattern = os.path.join(folder, "") if folder else ""
    return f"{what}: {pattern}*{extension or ''}"


class MiddleShortened:
    """A rich renderable of one line of text that shortens itself from the middle to the width it is given,
    so a table can narrow a name column without breaking names mid-word or wrapping them."""

    def __init__(self, text: str, style: str = "") -> None:
        self.text = text
        self.style = style

    def __rich_measure__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement

        return Measurement(min(len(self.text), MIN_NAME_WIDTH), len(self.text))

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        yield Text(shorten_middle(self.text, options.max_width), style=self.style, no_wrap=True, end="")

    def __str__(self) -> str:
        return self.text


class Wrapped:
    """A rich renderable of a dotted name (a tensor key) that wraps after dots to the width it is given and
    is never shortened, so two different keys can never look the same; a segment wider than the column is
    broken where it must."""

    def __init__(self, text: str, style: str = "", separators: str = ".") -> None:
        self.text = text
        self.style = style
        self.separators = separators

    def __rich_measure__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement

        longest = max((len(part) for part in self._parts()), default=0)
        return Measurement(min(longest, 2 * MIN_NAME_WIDTH), len(self.text))

    def _parts(self) -> list[str]:
        parts, start = [], 0
        for index, char in enumerate(self.text):
            if char in self.separators:
                parts.append(self.text[start:index + 1])
                start = index + 1
        return [*parts, self.text[start:]] if start < len(self.text) or not parts else parts

    def lines(self, width: int) -> list[str]:
        width = max(width, 1)
        lines = [""]
        for part in self._parts():
            if lines[-1] and len(lines[-1]) + len(part) > width:
                lines.append("")
            lines[-1] += part
            while len(lines[-1]) > width:  # one segment wider than the column
                lines[-1:] = [lines[-1][:width], lines[-1][width:]]
        return lines

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        yield Text("\n".join(self.lines(options.max_width)), style=self.style, no_wrap=True, end="")

    def __str__(self) -> str:
        return self.text


def name_cell(text: str, style: str = "") -> MiddleShortened:
    return MiddleShortened(text, style)


def fit(table: Any, width: int) -> Any:
    """Make ``table`` fit ``width`` columns without cutting numbers: if its widest layout (every cell on one
    line, no name shortened) is too wide with rules and padding, draw it with a rule under the header only and
    one space between columns, so the rules go before any name is shortened or any text wrapped."""
    from rich import box

    if _narrowest(table, widest=True) <= width:
        return table
    table.box = box.SIMPLE_HEAD
    table.show_edge = False
    table.padding = (0, 0)
    return table


def _narrowest(table: Any, *, widest: bool = False) -> int:
    """The width ``table`` needs when wrapable columns are at their minimum (``widest``: at their maximum too)
    and the others at their maximum (rich's ``_extra_width`` and ``_get_padding_width`` give the rules and
    padding it adds)."""
    from rich.console import Console
    from rich.measure import Measurement

    probe = Console(width=1000, file=io.StringIO())
    try:
        total = table._extra_width
        for index, column in enumerate(table.columns):
            widths = [Measurement.get(probe, probe.options, cell) for cell in (column.header, *column.cells)]
            if column.no_wrap or widest:
                content = max((w.maximum for w in widths), default=0)
            else:
                content = max((w.minimum for w in widths), default=0)
            total += content + table._get_padding_width(index)
        return total
    finally:
        probe.file.close()


def split(table: Any, width: int) -> list[Any]:
    """``table`` as several tables that each fit ``width`` at their narrowest, every one led by the first
    (name) column, when even rules-less it is too wide: columns move to a continuation table, never squeezed
    below their numbers' width (rich would crop them). One table when it fits."""
    from copy import copy

    table = fit(table, width)
    if _narrowest(table) <= width or len(table.columns) <= 2:
        return [table]
    groups: list[list[int]] = [[]]
    for index in range(1, len(table.columns)):
        trial = _subset(table, [0, *groups[-1], index])
        if groups[-1] and _narrowest(trial) > width:
            groups.append([])
        groups[-1].append(index)
    parts = []
    for number, group in enumerate(groups):
        part = _subset(table, [0, *group])
        part.title = table.title if number == 0 else f"(continued, {number + 1} of {len(groups)})"
        part.caption = table.caption if number == len(groups) - 1 else None
        parts.append(copy(part))
    return parts


def _subset(table: Any, indices: list[int]) -> Any:
    """A copy of ``table`` (box, padding, styles) with only the columns at ``indices``."""
    from copy import copy

    part = copy(table)
    part.columns = [copy(table.columns[i]) for i in indices]
    for number, column in enumerate(part.columns):
        column._index = number
    return part


def print_table(table: Any, target: Any = None, *, stderr: bool = False) -> None:
    """Print ``table`` fitted to ``target``'s width (a new ``console()`` by default): rules dropped first, then
    columns moved to a continuation table (``split``), so no number is ever cut."""
    out = target if target is not None else console(stderr=stderr)
    for part in split(table, out.width):
        out.print(part)
