"""Writers: the forms a merge's result takes, each declaring the output options it honours.

A merge plan (``soupkit.merging.plan``) picks one writer per output from the output's name and the inputs: a
``.safetensors`` file, Hugging Face shards + index (``shard_size``), a Hugging Face folder, a ``.pt`` /
``.pth`` / ``.bin`` file, a Lightning ``.ckpt``, a state dict in memory, or, for a soup of LoRA adapters without
a base, an exact (rank-concatenated) or SVD-refactorised adapter folder. An output option a user set that the
chosen writer does not declare is refused in one line naming the writers that do take it, before any work
(``check_options``), so a new ``OutputOptions`` field is refused everywhere until a writer declares it.

A command may narrow what it honours further (``Command``: ``soupkit convert`` merges nothing, so it takes no
``include``); it declares what it does honour, never what it does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import OutputError, ParameterError
from soupkit.io import CheckpointSink, OutputSet, check_output_path, lora
from soupkit.io.atomic import OUTPUT_SUFFIXES, check_derived_output
from soupkit.io.hf_folder import FolderOutput, is_folder_output, plan_folder_output
from soupkit.io.lightning import lightning_template
from soupkit.options import Command, OutputOptions, torch_dtype_name, user_name

#: what the merge engine honours while it computes full weights, whatever form they are written in
ENGINE_OPTIONS = frozenset({"dtype", "precise", "device", "include", "exclude", "allow_missing", "allow_nonfinite",
                            "ema", "strip_prefix", "add_prefix"})


@dataclass(frozen=True)
class Writer:
    """One output form: ``title`` names it in messages, ``honours`` lists the ``OutputOptions`` fields it
    takes, ``summary`` is its line in the docs' output table."""

    name: str
    title: str
    honours: frozenset[str]
    summary: str
    adapter: bool = False  # writes a PEFT adapter folder from a soup of adapters without a base

    @property
    def files(self) -> bool:
        """True when the writer writes files (every writer but the in-memory one)."""
        return self.name != "memory"


WRITERS: dict[str, Writer] = {w.name: w for w in (
    Writer("safetensors", "a .safetensors file", ENGINE_OPTIONS | {"force"},
           "one `.safetensors` file with provenance metadata"),
    Writer("shards", "Hugging Face shards", ENGINE_OPTIONS | {"force", "shard_size"},
           "`.safetensors` shards of at most `--shard-size` plus `NAME.safetensors.index.json` (one file when "
           "everything fits)"),
    Writer("hf_folder", "a Hugging Face folder", ENGINE_OPTIONS | {"force", "shard_size"},
           "a folder (`-o soup/`): `model.safetensors` (or shards, 5GB by default) and the first input folder's "
           "config and tokenizer files"),
    Writer("torch", "a .pt/.pth/.bin file", ENGINE_OPTIONS | {"force"},
           "a `torch.save` state dict (`.pt`, `.pth`, `.bin`)"),
    Writer("lightning", "a Lightning .ckpt", ENGINE_OPTIONS | {"force"},
           "a Lightning checkpoint dict (`.ckpt`) carrying the first input's version and hyperparameters"),
    Writer("memory", "an in-memory state dict", ENGINE_OPTIONS,
           "the state dict returned by the library call (no output given)"),
    Writer("adapter", "an exact LoRA adapter", frozenset({"force"}),
           "a soup of LoRA adapters without `--base`, by a method linear in the updates: an adapter folder, ranks "
           "concatenated (exact)", adapter=True),
    Writer("adapter_svd", "an SVD-refactorised LoRA adapter", frozenset({"force", "rank"}),
           "a soup of LoRA adapters without `--base` by any method, each merged update refactorised to rank "
           "`--rank` by truncated SVD (its error is reported)", adapter=True),
)}


#: a merge honours whatever its writer does
MERGE = Command("soupkit merge")
#: a one-input copy (``soupkit convert``): nothing is merged, so no filters, missing keys or accumulation
COPY = Command("soupkit convert", frozenset({"dtype", "device", "shard_size", "allow_nonfinite", "ema", "force",
                                             "strip_prefix", "add_prefix"}),
               "it writes one checkpoint, nothing is merged")
#: ``soupkit zeroshot`` (``soupkit.eval.models.clip``): a CLIP classifier's own tensors
ZEROSHOT = Command("soupkit zeroshot", frozenset({"dtype", "device", "shard_size", "allow_nonfinite", "force",
                                                 "add_prefix"}),
                   "it writes the CLIP model's own tensors: no checkpoint is read and nothing is merged")
#: the output options a soup algorithm's candidates and written soup honour (soupkit.soups.common docstring)
SOUP_OPTIONS = frozenset({"dtype", "precise", "device", "shard_size", "include", "exclude", "allow_nonfinite",
                          "ema", "force", "strip_prefix", "add_prefix", "rank"})


def soup_command(algorithm: str) -> Command:
    """What a soup algorithm honours, for the merge plan's one-line refusals."""
    return Command(f"the {algorithm}", SOUP_OPTIONS,
                   "it scores every candidate as a whole model, so every input must hold every tensor (merge such "
                   "checkpoints with soupkit merge --method linear --allow-missing)")


def choose_writer(output: str | Path | None, templates: Sequence[Any], options: OutputOptions, *,
                  adapter_soup: bool = False) -> Writer:
    """The writer for ``output``: from its name (a folder, or its suffix) and the inputs (``adapter_soup``:
    LoRA adapters merged without a base). Unknown suffixes are refused by ``check_output_path``."""
    if adapter_soup:
        return WRITERS["adapter_svd" if options.rank is not None else "adapter"]
    if output is None:
        return WRITERS["memory"]
    if is_folder_output(output, templates):
        return WRITERS["hf_folder"]
    suffix = Path(output).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        check_output_path(output)  # one line naming the suffixes soupkit writes
    if suffix == ".safetensors":
        return WRITERS["shards" if options.shard_size is not None else "safetensors"]
    return WRITERS["lightning" if suffix == ".ckpt" else "torch"]


def check_options(options: OutputOptions, writer: Writer, command: Command = MERGE) -> None:
    """One line for the first option set that ``writer`` or ``command`` does not honour."""
    for name in options.changed():
        if command.honours is not None and name not in command.honours:
            raise ParameterError(f"{user_name(name)} does not apply to {command.title}: {command.why}")
        if name not in writer.honours:
            takers = [w.title for w in WRITERS.values() if name in w.honours]
            raise ParameterError(f"{user_name(name)} does not apply to {writer.title}; it applies to "
                                 f"{_either(takers)}")


def _either(titles: Sequence[str]) -> str:
    return titles[0] if len(titles) == 1 else ", ".join(titles[:-1]) + " or " + titles[-1]


@dataclass
class Target:
    """One checked output: its writer, what the caller gets back (``output``: the file, folder or index), what
    the weights sink writes (``weights``) and, for a folder, its plan. ``open_sink`` / ``finish`` write the
    full-weight forms (the adapter forms are written by ``soupkit.io.lora``, from the plan)."""

    writer: Writer
    output: Path | None
    weights: Path | None = None
    folder: FolderOutput | None = None

    def open_sink(self, tensor_plan: list[Any], metadata: dict[str, str], files: OutputSet, *,
                  protected: Sequence[Path], options: OutputOptions, sources: Sequence[Any]) -> CheckpointSink:
        """The sink the engine streams this output into, inside the merge's atomic ``files``."""
        if self.folder is not None:  # weights (sharded at the folder's size) and the template's small files
            sink = CheckpointSink(self.weights, tensor_plan, metadata, files, self.folder.shard_size,
                                  protect=protected, force=options.force)
            self.folder.add_files(files, dtype=torch_dtype_name(options.dtype))
            return sink
        lightning = None
        if self.writer.name == "lightning":  # the first input's version and hyperparameters, when it has them
            first = next((s for s in sources if isinstance(s, (str, Path))), None)
            lightning = lightning_template(first) if first is not None else None
        return CheckpointSink(self.weights, tensor_plan, metadata, files if self.weights is not None else None,
                              options.shard_size, protect=protected, force=options.force, lightning=lightning)

    def finish(self, sink: CheckpointSink) -> dict[str, Any] | Path:
        """Complete the output: the state dict (in memory), the file or index written, or the folder."""
        result = sink.finish()
        return self.output if self.folder is not None and self.output is not None else result


def plan_targets(outputs: Sequence[str | Path | None], templates: Sequence[Any], protected: Iterable[Path],
                 options: OutputOptions, *, command: Command = MERGE, adapter_soup: bool = False) -> list[Target]:
    """Every output checked before any work (writer, options, path); two outputs sharing a path are refused."""
    protected = list(protected)
    targets = []
    for out in outputs:
        if out is not None and not isinstance(out, (str, Path)):
            raise ParameterError(f"output: expected a file or folder path, got {type(out).__name__}")
        if out is None and adapter_soup:
            raise ParameterError("a soup of LoRA adapters without --base is written as an adapter folder: give an "
                                 "output (or --base BASE for the merged full weights in memory)")
        writer = choose_writer(out, templates, options, adapter_soup=adapter_soup)
        check_options(options, writer, command)
        targets.append(_target(writer, out, templates, protected, options))
    paths = [t.weights for t in targets if t.weights is not None]
    if len(set(paths)) != len(paths):
        raise OutputError(f"{paths[0]}: two outputs of this merge would share one path")
    return targets


def _target(writer: Writer, out: str | Path | None, templates: Sequence[Any], protected: list[Path],
            options: OutputOptions) -> Target:
    if out is None:
        return Target(writer, None)
    if writer.adapter:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder}: an adapter is written as a folder; this path is a file")
        found = lora.find_adapter(templates[0])
        planned = FolderOutput(folder, found[0].parent if found else None, adapter=True)
        planned.check(protected, force=options.force)
        check_derived_output(folder / lora.ADAPTER_CONFIG, inputs=protected, force=options.force)
        return Target(writer, folder, planned.weights, planned)
    if writer.name == "hf_folder":
        planned = plan_folder_output(out, templates, shard_size=options.shard_size)
        assert planned is not None
        planned.check(protected, force=options.force)
        return Target(writer, planned.folder, planned.weights, planned)
    path = check_output_path(out, inputs=protected, force=options.force)
    return Target(writer, path, path)
