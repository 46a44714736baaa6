"""What every soup algorithm does around its own loop: ``SoupRun``.

Entering a ``SoupRun`` opens the inputs (their EMA weights with ``ema``), checks them against each other, lists
the files that must never be overwritten, checks the output path, builds the ``Judge`` and names the
ingredients. ``finish`` writes the soup through the merge engine (``soupkit.merging.merge`` / ``wise_ft``: the
code behind ``soupkit merge`` / ``soupkit wise``, so a soup equals that command's output bit for bit), then the
report folder (JSON + plots); leaving closes the inputs.

Output options are the merge engine's, forwarded unchanged to the final merge; candidates honour them too:

- ``ema``: candidates, individual scores and the written soup all use the EMA weights;
- ``include`` / ``exclude``: candidates merge only the selected floating tensors; the others come from the first
  member (the soup's first ingredient, or the zero-shot model), as the engine copies them from its first input;
- ``precise``: candidates accumulate in float64, as the engine does;
- ``dtype`` (and ``precise``): candidates are cast to the output dtype before they are scored, so a score is the
  written file's score. Without either, candidates are float32: the written numbers for float32 inputs;
  half-precision inputs are scored at float32 and written in their own dtype (as before this option existed);
- ``device``: the final merge's compute device (candidates live on the evaluator's device);
- ``allow_nonfinite``: the final merge's check of the selected inputs (a candidate with NaN just has no score);
- ``strip_prefix``: candidates and the written soup read the inputs' names without it; ``add_prefix``: the
  written soup's names (candidates are scored under the names the evaluator's model has);
- ``shard_size``, ``force`` and the output's form (file, shards, Hugging Face folder, ``.pt``, ``.ckpt``): the
  written soup, by the merge plan's writers (``soupkit.merging.writers``), checked before any work.

Which options a soup honours is declared once (``soup_command``); any other option is refused in one line
(``allow_missing``: every candidate is scored as a whole model, so every input must hold every tensor).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import CheckpointError, ParameterError, unknown_choice
from soupkit.io import CheckpointReader, input_files
from soupkit.merging.adapters import adapter_positions
from soupkit.merging.engine import check_compatible, select_keys
from soupkit.merging.plan import open_inputs as open_merge_inputs
from soupkit.merging.writers import plan_targets, soup_command
from soupkit.options import OutputOptions, parse_dtype, resolve_device, split_options
from soupkit.soups.result import ReportFiles, SoupResult
from soupkit.soups.scoring import Judge


def check_output_options(options: Mapping[str, Any], algorithm: str) -> OutputOptions:
    """The output options (keyword arguments or ``options=OutputOptions(...)``) validated before any work;
    those the algorithm does not honour are refused with the output's own checks (``SoupRun``)."""
    checked, rest = split_options(options)
    if rest:
        name = next(iter(rest))
        raise ParameterError(f"{algorithm}: " + unknown_choice("output option", name, OutputOptions.model_fields))
    resolve_device(checked.device)
    return checked


# --------------------------------------------------------------------------------------------- inputs


def ingredient_names(sources: Sequence[Any]) -> list[str]:
    """What reports and provenance call each input: its file name, never an absolute path (inputs sharing a file
    name keep as many parent folders as tell them apart); a state dict its ``.name`` or ``<state dict #i>``."""
    parts = {i: Path(s).parts for i, s in enumerate(sources) if isinstance(s, (str, Path))}
    names = []
    for i, source in enumerate(sources):
        if i not in parts:
            names.append(getattr(source, "name", None) or f"<state dict #{i}>")
            continue
        depth = 1
        while depth < len(parts[i]) and any(j != i and parts[j][-depth:] == parts[i][-depth:] for j in parts):
            depth += 1
        names.append(str(Path(*parts[i][-depth:])))
    return names


def open_inputs(sources: Sequence[Any], what: str = "checkpoints", *, ema: bool = False,
                evaluator: Any = None, strip_prefix: str | None = None) -> list[CheckpointReader]:
    """Open every input lazily (headers only), refusing an empty list and a file given twice (the merge's own
    ``open_inputs``, with ingredient names). LoRA adapters read as full weights over the evaluator's
    ``adapter_base`` (a transformers recipe's model folder)."""
    names = ingredient_names(sources) if isinstance(sources, Sequence) and not isinstance(sources, str) else None
    return open_merge_inputs(sources, OutputOptions(ema=ema, strip_prefix=strip_prefix), names=names, what=what,
                             adapter_base=getattr(evaluator, "adapter_base", None))


def close_all(readers: Sequence[CheckpointReader], sources: Sequence[Any]) -> None:
    for reader, source in zip(readers, sources):
        if reader is not source:
            reader.close()


def read_tensors(reader: CheckpointReader, keys: Sequence[str], device: torch.device
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of ``reader``, read once and moved to ``device``, one at a time."""
    for key in keys:
        try:
            tensor = reader.get(key)
        except KeyError:
            raise CheckpointError(f"{reader.name}: has no tensor {key!r}") from None
        yield key, tensor.to(device, non_blocking=True)


def mean_accuracy(accuracies: Mapping[str, float], names: Sequence[str]) -> float | None:
    """Mean accuracy over the ``names`` that were scored (None when none was)."""
    values = [accuracies[n] for n in names if n in accuracies]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------- candidates


class Candidates:
    """Candidate state dicts in the merge's key order, as the written file will hold them: the algorithm's merged
    floating tensors (cast, into reused buffers, to the output dtype where ``cast_to`` names one) and the first
    member's other tensors. A returned dict is valid until the next call."""

    def __init__(self, keys: Sequence[str], fixed: Mapping[str, torch.Tensor], cast_to: Mapping[str, torch.dtype]):
        self.keys, self.fixed, self.cast_to = list(keys), dict(fixed), dict(cast_to)
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, floats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {}
        for key in self.keys:
            if key not in floats:
                state[key] = self.fixed[key]
                continue
            tensor, dtype = floats[key], self.cast_to.get(key)
            if dtype is not None and tensor.dtype != dtype:
                buffer = self._buffers.get(key)
                if buffer is None or buffer.shape != tensor.shape:
                    buffer = self._buffers[key] = torch.empty_like(tensor, dtype=dtype)
                tensor = buffer.copy_(tensor)
            state[key] = tensor
        return state


# --------------------------------------------------------------------------------------------- the run


class SoupRun:
    """Set-up and reporting shared by the soup algorithms (a context manager; see the module docstring)."""

    def __init__(self, algorithm: str, sources: Sequence[Any], evaluator: Any, *, output: str | Path | None,
                 report_dir: str | Path | None, output_options: Mapping[str, Any], what: str = "checkpoints",
                 auxiliary: Sequence[Path] = ()):
        self.algorithm, self.sources, self.what = algorithm, sources, what
        self.options = check_output_options(output_options, algorithm)
        self.dtype = parse_dtype(self.options.dtype)
        self.acc_dtype = torch.float64 if self.options.precise else torch.float32
        self.ema = self.options.ema
        self._evaluator, self._output, self._auxiliary = evaluator, output, list(auxiliary)
        self.report_dir = Path(report_dir) if report_dir is not None else None

    def __enter__(self) -> SoupRun:
        self.started = time.perf_counter()
        self.judge = Judge(self._evaluator)
        # LoRA adapters soup as the adapted models' full weights, over the recipe model's own weights
        self.adapter_base = getattr(self.judge.evaluator, "adapter_base", None)
        self.readers = open_inputs(self.sources, self.what, ema=self.ema, evaluator=self.judge.evaluator,
                                   strip_prefix=self.options.strip_prefix)
        try:
            self.protect = [f for r in self.readers for f in input_files(r)] + self._auxiliary
            templates = [self.base_for(self.sources), *self.sources] if self.base_for(self.sources) is not None \
                else list(self.sources)
            # the written soup's form and options, checked as its final merge will check them, before any work
            plan_targets([self._output], templates, self.protect, self.options,
                         command=soup_command(self.algorithm))
            self.out = self._output
            self.keys = check_compatible(self.readers, allow_missing=False)
            self.merged = select_keys(self.keys, self.options.include, self.options.exclude)
            out = Path(self.out) if self.out is not None else None
            self.reports = (ReportFiles.plan(self.algorithm, self.report_dir, out)
                            if self.report_dir is not None else None)
            if self.reports is not None:
                self.reports.check(inputs=self.protect, force=self.options.force)
            check_fits = getattr(self.judge.evaluator, "check_fits", None)
            for reader in self.readers if check_fits is not None else ():
                check_fits(reader)  # a model/recipe mismatch names the file, not the in-memory soup made from it
            self.names = ingredient_names(self.sources)
        except BaseException:
            close_all(self.readers, self.sources)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        close_all(self.readers, self.sources)

    def base_for(self, sources: Sequence[Any]) -> Any:
        """What the soup's final merge takes as ``base``: the weights LoRA adapters among ``sources`` are applied
        to (None when there are none)."""
        return self.adapter_base if adapter_positions(sources) else None

    @property
    def scoring_sources(self) -> list[Any]:
        """What individual scores are taken of: the sources (the evaluator's cache answers for paths), or with
        ``ema`` or ``strip_prefix`` the readers (a path would be scored, and cached, as its raw weights)."""
        return list(self.readers) if self.ema or self.options.strip_prefix else list(self.sources)

    def float_keys(self, reader: CheckpointReader) -> list[str]:
        """The floating tensors the soup merges (include/exclude applied), in key order."""
        return [k for k in self.keys if k in self.merged and reader.info(k).is_float]

    def read_floats(self, reader: CheckpointReader, keys: Sequence[str], device: torch.device
                    ) -> dict[str, torch.Tensor]:
        """``keys`` of ``reader`` on ``device`` in the accumulation dtype, copied (never a caller's tensor)."""
        return {k: t.to(self.acc_dtype, copy=True) for k, t in read_tensors(reader, keys, device)}

    def candidates(self, first: CheckpointReader, device: torch.device) -> Candidates:
        """The candidate layout whose unmerged tensors are ``first``'s (read once, onto ``device``)."""
        floats = set(self.float_keys(first))
        fixed = dict(read_tensors(first, [k for k in self.keys if k not in floats], device))
        cast_to: dict[str, torch.dtype] = {}
        for key in self.keys:
            info = first.info(key)
            target = self.dtype if self.dtype is not None and info.is_float else info.dtype
            if key in fixed:
                fixed[key] = fixed[key].to(target)
            elif self.dtype is not None or self.acc_dtype != torch.float32:
                cast_to[key] = target
        return Candidates(self.keys, fixed, cast_to)

    def finish(self, result: SoupResult, write: Callable[..., Any],
               plots: Callable[[Callable[[str], Path]], list[Path]] | None = None) -> SoupResult:
        """Time the algorithm, write the soup (``write(output, **output_options)``: ``merge`` or ``wise_ft``; the
        state dict is returned when there is no output), then its report files (``ReportFiles``; ``plots`` gets
        the path of each plot by kind)."""
        result.stats = {"seconds": time.perf_counter() - self.started, **result.stats}
        written = write(self.out, options=self.options)
        if self.out is not None:
            result.path = Path(written)
        else:
            result.state_dict = written
        if self.reports is not None:
            from soupkit.report.plots import write_json

            self.reports.folder.mkdir(parents=True, exist_ok=True)
            if plots is not None:
                result.report_files += plots(self.reports.plot)
            result.report_files.append(self.reports.json)
            write_json(result.to_dict(), self.reports.json)
        return result
