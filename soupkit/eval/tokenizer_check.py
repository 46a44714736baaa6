"""Checks on a model folder's tokenizer files before ``tokenizers`` / ``transformers`` read them (issue 26, class 8).

What is refused, in one line naming the file (and the JSON path of the pattern):

- a tokenizer file larger than its bound (``MAX_TOKENIZER_JSON_BYTES`` for ``tokenizer.json``: the largest
  published ones are ~35 MB, Gemma's; ``MAX_SMALL_FILE_BYTES`` for the configs and vocabularies beside it), so
  parsing stays a small constant times a bounded size;
- a ``tokenizer.json`` that is not JSON, or nested deeper than Python's recursion limit;
- a regular expression in its normalizer or pre-tokenizer (``Split`` / ``Replace`` ``{"Regex": ...}``) that can
  backtrack catastrophically: a quantified group holding another quantifier (``(a+)+``, ``([\\w.]+)*``: star
  height two) or a quantified alternation (``(a|ab)*``), unless the group is atomic or possessive. These are the
  constructions exponential backtracking needs; every published pre-tokenizer pattern (GPT-2, Llama 3, Qwen 2,
  Gemma, BERT) has star height one and passes. A pattern that Python's parser cannot read even after the
  Oniguruma classes ``\\p{..}`` are mapped is refused too (it cannot be shown safe).

Why a static check rather than time-boxing the first tokenisation: ``tokenizers`` runs the regex in Rust with the
GIL released, and a thread cannot be stopped, so a time box would need a subprocess (seconds per model) and would
only prove the probe text safe; the hang comes from the data, later. The static rule is data-independent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError, SoupkitError
from soupkit.io.small_files import check_small_file, read_small_file

#: the largest tokenizer.json read (published ones: GPT-2 1.4 MB, Llama 3 9 MB, Gemma 3 33 MB)
MAX_TOKENIZER_JSON_BYTES = 128 << 20
#: the other tokenizer files (tokenizer_config.json, special_tokens_map.json, added_tokens.json, vocab.*, merges)
MAX_SMALL_FILE_BYTES = 32 << 20
SMALL_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
               "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
#: the parts of a tokenizer.json that run regexes over the text being tokenised
_REGEX_PARTS = ("normalizer", "pre_tokenizer")
_ONIG_CLASS = re.compile(r"\\[pP]\{\^?[A-Za-z_ ]+\}|\\[hH]")


def check_tokenizer_files(folder: Path, where: str) -> None:
    """Refuse the folder's tokenizer files as the module docstring says (``where``: the recipe field, for
    errors). Reads nothing but ``tokenizer.json`` (bounded) and the sizes of the others, each opened as every small
    file is (``soupkit.io.small_files``: a regular file inside the folder, no link out)."""
    for name in SMALL_FILES:
        _bounded(folder, name, MAX_SMALL_FILE_BYTES, where)
    path = folder / "tokenizer.json"
    if not _bounded(folder, "tokenizer.json", MAX_TOKENIZER_JSON_BYTES, where):
        return
    try:
        raw = read_small_file(folder, "tokenizer.json", limit=MAX_TOKENIZER_JSON_BYTES)
        document = json.loads(raw or b"")
    except RecursionError:
        raise RecipeError(f"{path}: tokenizer JSON nested too deeply") from None
    except SoupkitError as error:
        raise RecipeError(f"{where}: {error}") from None
    except ValueError as error:
        raise RecipeError(f"{path}: not a valid tokenizer file ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(document, dict):
        raise RecipeError(f"{path}: not a tokenizer file (expected a JSON object)")
    for part in _REGEX_PARTS:
        for location, pattern in _patterns(document.get(part), part):
            problem = backtracking_risk(pattern)
            if problem:
                raise RecipeError(f"{path}: {location}: regex {_clip(pattern)} {problem}; soupkit refuses it "
                                  "rather than hang on the data")


def _bounded(folder: Path, name: str, limit: int, where: str) -> bool:
    """True if ``folder/name`` is a small file within ``limit`` bytes; False if absent; refuses a bigger one, a link
    out of the folder or a non-file."""
    try:
        size = check_small_file(folder, name)
    except FileNotFoundError:
        return False
    except SoupkitError as error:
        raise RecipeError(f"{where}: {error}") from None
    if size > limit:
        raise RecipeError(f"{folder / name}: {size >> 20} MiB, larger than the {limit >> 20} MiB a tokenizer file "
                          "may be")
    return True


def _patterns(node: Any, location: str) -> list[tuple[str, str]]:
    """(JSON location, regex) of every ``"pattern": {"Regex": ...}`` under ``node`` (iterative: no recursion)."""
    found, stack = [], [(node, location)]
    while stack:
        value, here = stack.pop()
        if isinstance(value, dict):
            pattern = value.get("pattern")
            if isinstance(pattern, dict) and "Regex" in pattern:
                regex = pattern["Regex"]
                if not isinstance(regex, str):
                    raise RecipeError(f"{here}.pattern.Regex: expected a string") from None
                found.append((f"{here}.pattern", regex))
            stack.extend((v, f"{here}.{k}") for k, v in value.items() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, f"{here}[{i}]") for i, v in enumerate(value) if isinstance(v, (dict, list)))
    return found


def backtracking_risk(pattern: str) -> str | None:
    """Why ``pattern`` can backtrack catastrophically (see the module docstring), or None when it cannot."""
    try:
        import re._parser as sre_parse  # type: ignore[import-not-found]
    except ImportError:  # Python < 3.11
        import sre_parse  # type: ignore[no-redef]
    try:
        tree = sre_parse.parse(_ONIG_CLASS.sub("a", pattern))
    except (re.error, RecursionError, OverflowError) as error:
        return f"cannot be checked for catastrophic backtracking ({error})"
    constants = sre_parse
    repeats = {constants.MAX_REPEAT, constants.MIN_REPEAT}
    safe = {getattr(constants, "POSSESSIVE_REPEAT", None), getattr(constants, "ATOMIC_GROUP", None)} - {None}
    stack: list[tuple[Any, bool]] = [(tree, False)]
    while stack:
        items, under_repeat = stack.pop()
        for op, argument in items:
            if op in safe:
                continue  # no backtracking into an atomic group or a possessive repeat
            if op in repeats:
                low, high, body = argument
                if high > 1 and low != high and under_repeat:  # a fixed count ({3}) adds no ambiguity
                    return "nests a quantifier inside a quantified group"
                if high > 1 and _has_branch(body, constants):
                    return "repeats an alternation"
                stack.append((body, under_repeat or high > 1))
            elif op == constants.SUBPATTERN:
                stack.append((argument[-1], under_repeat))
            elif op == constants.BRANCH:
                stack.extend((alternative, under_repeat) for alternative in argument[1])
            elif op in (constants.ASSERT, constants.ASSERT_NOT):
                stack.append((argument[1], under_repeat))
    return None


def _has_branch(items: Any, constants: Any) -> bool:
    """True if ``items`` holds an alternation of more than one alternative outside atomic groups."""
    stack = [items]
    while stack:
        for op, argument in stack.pop():
            if op == constants.BRANCH and len(argument[1]) > 1:
                return True
            if op == constants.SUBPATTERN:
                stack.append(argument[-1])
    return False


def _clip(pattern: str, width: int = 60) -> str:
    text = repr(pattern)
    return text if len(text) <= width else f"{text[: width - 5]}...{text[-2:]}"
