"""soupkit never runs code that ships with a model, a tokenizer or a config: the one place that says so.

Hugging Face folders can name Python classes of their own (``auto_map`` in ``config.json`` or
``tokenizer_config.json``, a ``tokenizer_class`` transformers does not know); with ``trust_remote_code`` unset,
transformers then *asks on stdin* whether to import the folder's ``.py`` files, and a ``y`` runs them. soupkit
closes that in three layers, all here:

1. :func:`refuse_foreign_code` reads a folder's config files (bounded regular files inside the folder, through
   ``soupkit.io.small_files``) before any library sees them, and refuses ``auto_map``, ``custom_pipelines`` and unknown
   classes in one line naming the file and key.
2. :data:`NO_REMOTE_CODE` is passed to every ``from_pretrained`` soupkit makes: ``trust_remote_code=False`` and
   ``local_files_only=True`` (never the hub).
3. :func:`forbid_remote_code_prompts` sets transformers' prompt time-out to 0, so that a load soupkit does not make
   itself (open_clip's Hugging Face text towers call ``AutoConfig.from_pretrained`` without the flag) can never
   prompt or read stdin: an unset flag then means "no".

Model names with a source prefix (``hf-hub:``, ``local-dir:``) are refused by :func:`refuse_source_prefix`: they
make timm and open_clip fetch configs and weights of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError, SoupkitError
from soupkit.io.small_files import read_json_file

#: keyword arguments of every ``from_pretrained`` soupkit calls
NO_REMOTE_CODE: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}

#: JSON files of a Hugging Face folder that a library may read class names from
CONFIG_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                "image_processor_config.json", "feature_extractor_config.json", "video_preprocessor_config.json",
                "generation_config.json", "adapter_config.json")

#: keys whose value names code to import
CODE_KEYS = ("auto_map", "custom_pipelines")

#: config files larger than this are refused unread (the largest real tokenizer_config.json seen is ~2 MB, with
#: an inlined chat template and added-token table)
CONFIG_LIMIT = 8 * 2**20

#: prefixes that make timm / open_clip load configs or weights from somewhere other than soupkit's inputs
SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def refuse_foreign_code(folder: Path, where: str) -> None:
    """Refuse a model folder whose config files name code of their own (``auto_map``, ``custom_pipelines``, a
    ``tokenizer_class`` / ``processor_class`` transformers does not ship). ``where`` names the recipe field."""
    for name in CONFIG_FILES:
        data = _read_config(folder, name, where)
        if not isinstance(data, dict):
            continue
        for key in CODE_KEYS:
            if key in data:
                raise RecipeError(f"{where}: {folder / name} has {key!r} (custom code shipped with the model); "
                                  "soupkit never runs code from a model folder: remove the key, or use a model "
                                  "class that transformers ships")
        for key in ("tokenizer_class", "processor_class", "image_processor_type", "feature_extractor_type"):
            value = data.get(key)
            if value is not None and not _known_class(value):
                raise RecipeError(f"{where}: {folder / name} key {key!r} names {str(value)[:80]!r}, which "
                                  "transformers does not ship (custom code); soupkit never runs code from a "
                                  "model folder")


def refuse_source_prefix(name: str, where: str, library: str) -> None:
    """Refuse a timm / open_clip model name that would make the library load from the hub or a folder itself."""
    if name.lower().startswith(SOURCE_PREFIXES):
        raise RecipeError(f"{where}: {library} model {name!r} names a source ({name.split(':')[0]}:); soupkit loads "
                          "nothing from the hub or from folders the library picks: give the architecture's name "
                          "and a local weights file")


def forbid_remote_code_prompts() -> None:
    """Make transformers treat an unset ``trust_remote_code`` as False instead of asking on stdin (it prompts
    only while ``TIME_OUT_REMOTE_CODE`` > 0)."""
    import transformers.dynamic_module_utils as dynamic

    dynamic.TIME_OUT_REMOTE_CODE = 0


def _read_config(folder: Path, name: str, where: str) -> Any:
    """The parsed JSON of ``folder/name`` (a bounded regular file inside the folder: ``soupkit.io.small_files``);
    None when absent."""
    try:
        return read_json_file(folder, name, limit=CONFIG_LIMIT)
    except SoupkitError as error:
        raise RecipeError(f"{where}: {error}") from None


def _known_class(value: Any) -> bool:
    """Whether ``value`` names a tokenizer / processor class that transformers ships (a ``...Fast`` name too)."""
    if not isinstance(value, str):
        return False
    import transformers

    return hasattr(transformers, value) or hasattr(transformers, value.removesuffix("Fast"))
