"""Hugging Face model folders: tied weights on the way in, loadable folders on the way out.

In: ``save_pretrained`` leaves out the keys a model ties to another (GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``; T5's embeddings are ``shared.weight``), while ``torch.save(model.state_dict())``
keeps both. A soup of the two kinds must average ``lm_head`` over every input, never copy one input's, so a
folder's reader names each omitted tied key as an alias of its partner, from the ``config.json`` beside it.

Out: ``plan_folder_output(output, inputs)`` decides whether a merge's output is a folder (a path ending in
``/``, an existing directory, or no suffix while the inputs are folders) and ``FolderOutput`` writes it the way
transformers does: ``model.safetensors`` (shards + ``model.safetensors.index.json`` above the shard size, 5 GB by
default like transformers) with the first input folder's config, generation config, tokenizer and other small
files, published atomically with the weights, so ``AutoModel*.from_pretrained(out)`` loads the soup. An adapter
output is a folder with ``adapter_model.safetensors`` and ``adapter_config.json``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import OutputError
from soupkit.io.atomic import check_derived_output, check_interrupt
from soupkit.io.base import CheckpointReader
from soupkit.io.small_files import MAX_COPY_BYTES, check_small_file, copy_small_file, entry_kind, read_json_file
from soupkit.io.views import KeyMapReader

__all__ = ["DEFAULT_SHARD_SIZE", "FolderOutput", "hf_folder_of", "is_folder_output", "plan_folder_output",
           "tie_aliases", "with_ties"]

#: transformers' default ``max_shard_size`` ("5GB", decimal)
DEFAULT_SHARD_SIZE = 5 * 10**9
#: the largest non-weight file copied into an output folder (``soupkit.io.small_files``); a larger one is refused
MAX_COPIED_BYTES = MAX_COPY_BYTES
#: bounds on what one folder output copies in all (a model folder holds a few dozen small files, ~50 MB)
MAX_COPIED_FILES = 10_000
MAX_COPIED_TOTAL = 2 * 2**30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".pkl",
                    ".npz", ".ot")
#: never copied: a Trainer checkpoint's run state, the model card (it describes the input, not the soup), and
#: adapter_config.json (an adapter output writes its own, with the new ranks; a full model must not carry one,
#: or loaders would take the folder for an adapter)
_SKIPPED_FILES = ("trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "README.md",
                  "adapter_config.json")
#: names a model folder's loaders read as files: a folder under one of these names is refused, not skipped
_KNOWN_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                      "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
#: what a model folder that --force may replace holds besides weights and the files about to be written
_REPLACEABLE = (*_KNOWN_SMALL_FILES, *_SKIPPED_FILES, ".gitattributes", "adapter_config.json")
_HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")

# ---------------------------------------------------------------------------------------------- tied weights

#: (omitted key, candidates for its partner, tied to the word embeddings) -- transformers' tied keys for the
#: architectures that tie (checked against ``all_tied_weights_keys`` in tests/io/test_hf_folder.py). Word-embedding ties
#: need ``tie_word_embeddings`` and an architecture with a language-model head (a sequence classifier's config
#: says tie_word_embeddings too, and has no head to tie); the others are ties inside the base model.
TIE_RULES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("lm_head.weight", ("model.embed_tokens.weight", "transformer.wte.weight", "shared.weight",
                        "model.shared.weight", "model.decoder.embed_tokens.weight",
                        "transformer.word_embeddings.weight", "transformer.embed_tokens.weight",
                        "model.language_model.embed_tokens.weight", "gpt_neox.embed_in.weight"), True),
    ("cls.predictions.decoder.weight", ("bert.embeddings.word_embeddings.weight",), True),
    ("cls.predictions.decoder.bias", ("cls.predictions.bias",), False),
    ("lm_head.decoder.weight", ("roberta.embeddings.word_embeddings.weight",
                                "xlm_roberta.embeddings.word_embeddings.weight"), True),
    ("lm_head.decoder.bias", ("lm_head.bias",), False),
    ("encoder.embed_tokens.weight", ("shared.weight",), False),
    ("decoder.embed_tokens.weight", ("shared.weight",), False),
    ("model.encoder.embed_tokens.weight", ("model.shared.weight",), False),
    ("model.decoder.embed_tokens.weight", ("model.shared.weight",), False),
)  # fmt: skip
_LM_HEAD_ARCHITECTURES = re.compile(r"(ForCausalLM|LMHeadModel|ForConditionalGeneration|ForMaskedLM|ForPreTraining"
                                    r"|WithLMHead|ForSeq2SeqLM)$")


def hf_folder_of(path: Path) -> Path | None:
    """The Hugging Face folder a checkpoint path belongs to (the folder itself, or the parent of its weights
    file / index), when it holds a ``config.json`` entry (of any kind: reading it refuses one that is not a
    regular file inside the folder); else None."""
    folder = path if path.is_dir() else path.parent
    return folder if entry_kind(folder, "config.json") is not None else None


def read_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    """A folder's ``config.json`` (``soupkit.io.small_files`` rules: a regular file inside the folder, bounded),
    ``{}`` when absent; a config that is not a JSON object is refused in one line naming it, never guessed at."""
    return read_json_file(folder, name) or {}


def _ties_word_embeddings(config: dict[str, Any]) -> bool:
    """Whether the model ties its LM head to its input embeddings: it has a head (by its architecture) and
    ``tie_word_embeddings`` is not false (transformers' default is true; multimodal configs keep the flag in
    their text config)."""
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not any(
            isinstance(a, str) and _LM_HEAD_ARCHITECTURES.search(a) for a in architectures):
        return False
    value = config.get("tie_word_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("tie_word_embeddings")
    return value is not False


def _tied_pairs(config: dict[str, Any], keys: set[str]) -> dict[str, str]:
    """``tied key -> partner`` for every pair in ``keys`` that transformers may tie when it loads a folder with
    this config: word-embedding ties unless ``tie_word_embeddings`` is false (whatever ``architectures`` says:
    ``AutoModelForCausalLM`` ties by default), and the ties inside base models always."""
    value = config.get("tie_word_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("tie_word_embeddings")
    pairs: dict[str, str] = {}
    for tied, partners, needs_word_tie in TIE_RULES:
        if tied not in keys or tied in pairs or (needs_word_tie and value is False):
            continue
        partner = next((p for p in partners if p in keys), None)
        if partner is not None:
            pairs[tied] = partner
    return pairs


def _same_values(reader: CheckpointReader, key: str, other: str, chunk: int = 1 << 22) -> bool:
    """Whether two tensors of ``reader`` hold the same shape, dtype and values (read in bounded chunks)."""
    mapping = getattr(reader, "_map", None)  # a folder's reader aliases an omitted tied key to its partner
    if isinstance(mapping, dict) and key in mapping and mapping.get(key) == mapping.get(other):
        return True
    a, b = reader.info(key), reader.info(other)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return all(torch.equal(reader.read_flat(key, start, min(start + chunk, a.numel)),
                           reader.read_flat(other, start, min(start + chunk, a.numel)))
               for start in range(0, a.numel, chunk))


def tie_aliases(config: dict[str, Any], keys: Sequence[str] | CheckpointReader, *,
                present: bool = False) -> dict[str, str]:
    """``omitted key -> partner`` for each tied key the checkpoint lacks and whose partner it holds; with
    ``present``, for each tied key it holds beside its partner (what ``save_pretrained`` would leave out)."""
    words = _ties_word_embeddings(config)
    aliases: dict[str, str] = {}
    for omitted, partners, needs_word_tie in TIE_RULES:
        if (omitted in keys) != present or omitted in aliases or (needs_word_tie and not words):
            continue
        partner = next((p for p in partners if p in keys), None)
        if partner is not None:
            aliases[omitted] = partner
    return aliases


def with_ties(reader: CheckpointReader, source: Path) -> CheckpointReader:
    """``reader`` plus the tied keys its folder's ``config.json`` implies and the file omits (aliases that read
    the partner's tensor); unchanged outside a Hugging Face folder or when nothing is omitted."""

    folder = hf_folder_of(source)
    if folder is None:
        return reader
    aliases = tie_aliases(read_config(folder), reader)
    if not aliases:
        return reader
    mapping = {key: key for key in reader.keys()}
    mapping.update(aliases)
    return KeyMapReader(reader, mapping, tied=aliases)


# ---------------------------------------------------------------------------------------------- folders out


def _input_folder(source: Any, marker: str | None = None) -> Path | None:
    """The Hugging Face folder an input path names, if any: one holding ``marker`` (``config.json`` for a model,
    ``adapter_config.json`` for an adapter), or either when ``marker`` is None."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    folder = path if path.is_dir() else path.parent if path.name in _HF_WEIGHT_NAMES else None
    if folder is None:
        return None
    markers = (marker,) if marker else ("config.json", "adapter_config.json")
    return folder if any(entry_kind(folder, name) is not None for name in markers) else None


def is_folder_output(output: str | Path, inputs: Sequence[Any] = ()) -> bool:
    """True when ``output`` names a folder: it ends with ``/``, is an existing directory, or has no suffix
    while the first input is a Hugging Face folder."""
    text = os.fspath(output)
    if text.endswith(("/", os.sep)):
        return True
    try:
        is_dir = Path(text).is_dir()
    except OSError:  # a name too long for the file system: the output check says so in one line
        return False
    if is_dir:  # a folder named like a file (out.safetensors/) is a mistake, refused as before
        return not Path(text).name.lower().endswith(_WEIGHT_SUFFIXES)
    return not Path(text).suffix and bool(inputs) and _input_folder(inputs[0]) is not None


@dataclass
class FolderOutput:
    """A Hugging Face folder to write: ``weights`` is the path to give the checkpoint sink (with
    ``shard_size``), and ``add_files(outputs)`` adds the template folder's small files to the same atomic
    ``OutputSet``. ``adapter`` is True for a PEFT adapter folder (``adapter_model.safetensors``)."""

    folder: Path
    template: Path | None
    adapter: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    copied: list[Path] = field(default_factory=list)
    #: config.json fields to set in the copy (a frankenmerge's layer count: ``soupkit.merging.slices``)
    config_updates: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.folder / ("adapter_model.safetensors" if self.adapter else "model.safetensors")

    def check(self, inputs: Sequence[Path], *, force: bool = False) -> None:
        """Refuse before any work: an output path that is a file or a symlink, a folder that holds an input or lies
        inside an input's folder, files there that would be replaced without ``force``, other weight files there
        that transformers would load instead of the soup, and -- since the new folder replaces the old one whole,
        by one rename -- anything there that is not part of a model folder (a subfolder, a user's notes)."""

        folder = self.folder
        if folder.is_symlink():
            raise OutputError(f"{folder}: output folder is a symlink; give the folder it points to, or a new name "
                              f"(soupkit publishes a folder by renaming it into place, which would replace the link)")
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder}: output folder is a file")
        where = folder.absolute().resolve()
        for source in inputs:
            if folder.exists() and Path(source).parent.exists() and os.path.samefile(Path(source).parent, folder):
                raise OutputError(f"{folder}: output folder holds the input {source}; soupkit never "
                                  f"modifies inputs: write to another folder")
            home = _input_folder(source) or hf_folder_of(Path(source)) if Path(source).exists() else None
            if home is not None and where.is_relative_to(home.resolve()):
                raise OutputError(f"{folder}: output folder lies inside the input folder {home}; soupkit never "
                                  f"modifies inputs: write to a folder outside it")
        planned = self._planned_copies()
        for path in (self.weights, *planned):
            check_derived_output(path, inputs=inputs, force=force)
        if not folder.is_dir():
            return
        ours = {self.weights.name, *(p.name for p in planned)}
        entries = sorted(os.listdir(folder))
        stale = [name for name in entries if name not in ours and _is_weight_name(name)]
        if stale and not force:
            raise OutputError(f"{folder}: output folder already holds weights ({', '.join(stale[:3])}) "
                              f"that loaders would mix with the soup; remove them or pick an empty folder")
        if entries and not force:
            raise OutputError(f"{folder}: output folder exists and is not empty; use --force to replace it whole, "
                              f"or pick a new folder")
        for name in entries:
            kind = entry_kind(folder, name)
            if kind == "dir":
                raise OutputError(f"{folder}: output folder holds the subfolder {name!r}; --force replaces a model "
                                  f"folder whole, so soupkit refuses one holding folders: remove it or pick another")
            if name not in ours and not _is_weight_name(name) and name not in _REPLACEABLE and not name.endswith(
                    (".soupkit-lock", ".soupkit-tmp")):
                raise OutputError(f"{folder}: output folder holds {name!r}, which soupkit did not write; --force "
                                  f"replaces a model folder whole: move it out or pick another folder")

    def omitted_keys(self, keys: Sequence[str], readers: Sequence[CheckpointReader] = ()) -> set[str]:
        """Tied keys to leave out of the weights, as ``save_pretrained`` does (the copied config ties them, so
        loaders rebuild them from their partner; a GPT-2 soup saves one vocabulary-sized matrix, not two).

        A config that ties what an input stores untied (``tie_word_embeddings`` beside a trained ``lm_head``) would
        make transformers load the soup's head as its embeddings, not as the mean of the heads: every input that
        holds both keys is compared, and one that differs refuses the folder output, naming config and input."""
        if self.template is None or self.adapter:
            return set()
        config = read_config(self.template)
        for omitted, partner in _tied_pairs(config, set(keys)).items():
            for reader in readers:
                if omitted in reader and partner in reader and not _same_values(reader, omitted, partner):
                    raise OutputError(
                        f"{self.template / 'config.json'}: ties {omitted} to {partner} (tie_word_embeddings), but "
                        f"{reader.name} stores a different {omitted}; transformers would load the soup's {omitted} "
                        f"as its {partner}, not as their mean. Set \"tie_word_embeddings\": false in that config if "
                        f"the head is trained apart, or write a .safetensors file")
        return set(tie_aliases(config, set(keys), present=True))

    def _planned_copies(self) -> list[Path]:
        """The template's small files to copy, each checked (``soupkit.io.small_files``): one that is a link out of
        the folder, a FIFO, a device, or over ``MAX_COPY_BYTES`` refuses the output in one line naming it."""
        if self.template is None:
            return []
        planned, total = [], 0
        for name in sorted(os.listdir(self.template)):
            if not _copyable_name(name, self.adapter):
                continue
            kind = entry_kind(self.template, name)
            subfolder = kind == "dir" or (kind == "link" and (self.template / name).is_dir())
            if name not in _KNOWN_SMALL_FILES and subfolder:
                continue  # a subfolder (a Trainer's checkpoint-500/, runs/), or a link to one, is never entered
            total += check_small_file(self.template, name)
            planned.append(self.folder / name)
            if len(planned) > MAX_COPIED_FILES or total > MAX_COPIED_TOTAL:
                raise OutputError(f"{self.template}: holds more than {MAX_COPIED_FILES:,} small files or "
                                  f"{MAX_COPIED_TOTAL:,} bytes of them to copy into the output folder; a model "
                                  f"folder holds a few dozen: move the others out of it")
        return planned

    def add_files(self, outputs: Any, *, dtype: str | None = None) -> list[Path]:
        """Copy the template folder's small non-weight files into ``outputs`` (an ``OutputSet``): published
        with the weights or not at all. ``dtype`` (e.g. "bfloat16") is recorded in config.json's ``dtype``."""
        written = []

        for target in self._planned_copies():
            assert self.template is not None
            check_interrupt()  # between files: a Ctrl-C stops a copy of thousands of files here
            handle = outputs.open(target)
            if target.name == "config.json" and (dtype is not None or self.config_updates):
                config = {**read_config(self.template), **self.config_updates}  # order kept: a faithful copy
                if dtype is not None:
                    config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype
                handle.write(json.dumps(config, indent=2, ensure_ascii=False).encode() + b"\n")
                _no_wider_than(handle, stat.S_IMODE(os.stat(self.template / "config.json").st_mode))
            else:
                try:
                    source_mode = copy_small_file(self.template, target.name, handle)
                except FileNotFoundError:
                    raise OutputError(f"{self.template / target.name}: vanished while the output was written") from None
                _no_wider_than(handle, source_mode)
            written.append(target)
        self.copied = written
        return written


def _is_weight_name(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _is_weight_file(path: Path) -> bool:
    return _is_weight_name(path.name) and entry_kind(path.parent, path.name) is not None


def _copyable_name(name: str, adapter: bool) -> bool:
    """Small files a loader reads beside the weights: configs, tokenizer, chat template, vocabularies."""
    if name.startswith(".") or _is_weight_name(name) or name in _SKIPPED_FILES:
        return False
    return not (adapter and name in ("config.json", "generation_config.json"))  # they describe the base


def _no_wider_than(handle: Any, source_mode: int) -> None:
    """A copy's permissions never exceed its source's: a mode-0600 config.json is not published as 0644."""
    fd = handle.fileno()
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & ~source_mode:
        os.fchmod(fd, mode & source_mode)


def plan_folder_output(output: str | Path | None, inputs: Sequence[Any], *, adapter: bool = False,
                       shard_size: int | None = None) -> FolderOutput | None:
    """A ``FolderOutput`` when ``output`` names a folder (see ``is_folder_output``), else None (a file output
    as before). The first input that is a model folder (an adapter folder for ``adapter=True``) gives the config
    and tokenizer files: for a soup of adapters over a base, list the base first."""
    if output is None or not is_folder_output(output, inputs):
        return None
    marker = "adapter_config.json" if adapter else "config.json"
    template = next((f for f in (_input_folder(i, marker) for i in inputs) if f is not None), None)
    return FolderOutput(Path(output), template, adapter=adapter, shard_size=shard_size or DEFAULT_SHARD_SIZE)


def save_folder(state_dict: Any, output: str | Path, inputs: Sequence[Any] = (), *,
                metadata: dict[str, str] | None = None, shard_size: int | None = None, force: bool = False,
                protect: Sequence[str | Path] = (), dtype: str | None = None) -> Path:
    """Write ``state_dict`` as a Hugging Face folder: ``model.safetensors`` (or shards + index) and the small
    files of the first folder among ``inputs``; ``save_checkpoint``'s counterpart for folders. Returns the
    folder. The merge entry points do the same around their streaming sink (``plan_folder_output``)."""
    from soupkit.io import CheckpointSink, OutputSet, plan_of

    folder = plan_folder_output(output if os.fspath(output).endswith(("/", os.sep)) else f"{output}{os.sep}",
                                inputs, shard_size=shard_size)
    assert folder is not None
    from soupkit.io import StateDictReader

    omitted = folder.omitted_keys(list(state_dict), [StateDictReader(state_dict)])
    state = {k: v for k, v in state_dict.items() if k not in omitted}
    folder.check([Path(p) for p in protect], force=force)
    with OutputSet(replace=force) as files:
        files.watch(protect)
        files.folder(folder.folder)
        sink = CheckpointSink(folder.weights, plan_of(state), {"format": "pt", **(metadata or {})}, files,
                              folder.shard_size, protect=[Path(p) for p in protect], force=force)
        for key, tensor in state.items():
            sink.write(key, tensor.detach().cpu().reshape(-1))
        sink.finish()
        folder.add_files(files, dtype=dtype)
    return folder.folder
