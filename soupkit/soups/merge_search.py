"""Merge search: a merge method's numeric parameters optimised by CMA-ES on held-out data.

mergekit-evolve (and evolutionary model merging, Akiba et al. 2024) search a whole merge recipe, per-layer
weights and densities included, scored on a benchmark. soupkit does the same with its own evaluator:

- **The space** comes from the method's declaration (``soupkit methods NAME``): every float parameter the user did
  not fix, one value per input for per-model ones, searched within the declared bounds (a side with no bound
  spans ``max(1, |default|)`` around the default; ``ranges`` overrides). With ``per_layer``, one value per layer
  group: tensors named ``...layers.N.`` (also ``h.N.``, ``blocks.N.``, ...) group by layer, every other tensor by
  its module (``conv1``, ``lm_head``, ``model.norm``).
- **A candidate** is a merge config (``soupkit.merging.config``; per-layer values as ``tensors:`` rules), merged in
  memory by the registered method and scored by the evaluator, through its score cache. The first candidate is
  the method at its defaults, so the search's result is never worse than the defaults on the held-out set.
- **Exact early stop**: a candidate's evaluation stops as soon as it provably cannot beat the best so far
  (``need_correct = best + 1``), so "is this the new best?" is decided exactly as a full evaluation would. CMA-ES
  ranks a stopped candidate by its proven upper bound (correct so far plus every remaining example), which is
  below the best so far; ``early_stop=False`` scores every candidate in full.
- **CMA-ES** (the ``cmaes`` package) runs in the unit cube (each dimension scaled to its range), seeded, so a run
  is reproducible; ``resume`` replays the run's log (every candidate's point and fitness) through a fresh
  optimiser, checks it asks for the same points, and continues where the log ends.

The best candidate is written by ``soupkit merge --config`` from the config written beside it, so that command
reproduces it bit for bit; the report compares it on the test sets with the best ingredient, the uniform and
greedy soups and the method at its defaults.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from soupkit.errors import ParameterError, unknown_choice
from soupkit.io import check_output_path, open_checkpoint
from soupkit.merging import merge
from soupkit.merging.config import merge_from_config
from soupkit.merging.registry import MergeMethod, Parameter, get_method
from soupkit.options import OutputOptions, split_options
from soupkit.report.layout import console, print_table
from soupkit.report.plots import plot_search, write_json
from soupkit.report.tables import search_table
from soupkit.soups.greedy import greedy_soup, hardest_first
from soupkit.soups.scoring import Judge, Score, Steps

#: layer-indexed tensor names (mergekit's architectures and timm's): the group is the name up to the index
_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)\.")
#: the fitness of a candidate with no finite score (CMA-ES minimises; accuracies give fitness in [-1, 0])
_WORST = 1e30
#: CMA-ES's step size in the unit cube: a fifth of every range
DEFAULT_SIGMA = 0.2
LOG_VERSION = 1


@dataclass(frozen=True)
class Dimension:
    """One searched number: ``parameter`` (for input ``model`` when per model) on the tensors ``group`` matches
    (None: every tensor), searched in ``[low, high]`` from ``start``."""

    parameter: str
    group: str | None
    model: int | None
    low: float
    high: float
    start: float

    @property
    def label(self) -> str:
        name = self.parameter if self.model is None else f"{self.parameter}[{self.model}]"
        return name if self.group is None else f"{self.group}: {name}"

    def value(self, unit: float) -> float:
        """The parameter value at ``unit`` in [0, 1], rounded to 6 significant digits (the config's text)."""
        unit = min(1.0, max(0.0, float(unit)))
        return float(f"{self.low + unit * (self.high - self.low):.6g}")

    def unit(self, value: float) -> float:
        return 0.5 if self.high == self.low else min(1.0, max(0.0, (value - self.low) / (self.high - self.low)))


@dataclass
class Candidate:
    """One evaluated point: its index, unit-cube point (None for the defaults), parameters, held-out score."""

    index: int
    point: list[float] | None
    parameters: dict[str, Any]
    tensors: list[dict[str, Any]]
    score: float | None
    correct: int | None
    n: int | None
    stopped_early: bool
    examples_seen: int | None
    fitness: float
    best: bool = False


@dataclass
class SearchResult:
    """What ``search`` found: the best candidate and its config, every candidate, the comparison table."""

    method: str
    dimensions: list[Dimension]
    candidates: list[Candidate]
    best: Candidate
    config: dict[str, Any]
    heldout: str
    table: dict[str, dict[str, float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    state_dict: dict[str, Any] | None = None
    config_path: Path | None = None
    report_files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "heldout": self.heldout, "dimensions": [asdict(d) for d in self.dimensions],
                "best": asdict(self.best), "config": self.config, "table": self.table, "stats": self.stats,
                "candidates": [asdict(c) for c in self.candidates],
                "path": None if self.path is None else str(self.path),
                "config_path": None if self.config_path is None else str(self.config_path)}

    def print_table(self) -> None:
        """The comparison table on stderr-free stdout (held-out first, then the test sets)."""

        print_table(search_table(self), console())


# --------------------------------------------------------------------------------------------- the space


def layer_groups(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Tensor groups for per-layer values, in key order: ``(pattern, member keys)``. A layer-indexed name groups
    by its prefix through the index (``model.layers.3``), any other by its module (the name less its last part).
    Patterns are fnmatch patterns matching exactly their members, most specific first in the rules."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        match = _LAYER.match(key)
        prefix = match.group(1) if match else key.rpartition(".")[0]
        groups.setdefault(prefix, []).append(key)
    return [(_pattern(prefix, members), members) for prefix, members in groups.items()]


def _pattern(prefix: str, members: list[str]) -> str:
    escaped = re.sub(r"([*?\[])", r"[\1]", prefix)
    return f"{escaped}.*" if prefix else (re.sub(r"([*?\[])", r"[\1]", members[0]) if len(members) == 1 else "*")


def _rules_order(groups: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Longest pattern first, so a nested module's pattern wins over its parent's; checked exact."""
    ordered = sorted(groups, key=lambda g: -len(g[0]))
    for pattern, members in ordered:
        for key in members:
            first = next(p for p, _ in ordered if fnmatchcase(key, p))
            if first != pattern:  # pragma: no cover - names that defeat the grouping (should not exist)
                raise ParameterError(f"--per-layer: tensor {key!r} cannot be grouped by name ({first!r} and "
                                     f"{pattern!r} both match it)")
    return ordered


def _start(parameter: Parameter) -> float:
    default = parameter.default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return float(default)
    if isinstance(default, (list, tuple)) and default and isinstance(default[0], (int, float)):
        return float(default[0])
    if parameter.name == "weights":
        return 1.0  # every method taking weights treats None as equal weights of 1
    b = parameter.bounds
    low = b.ge if b.ge is not None else b.gt
    high = b.le if b.le is not None else b.lt
    if low is not None and high is not None:
        return (low + high) / 2
    return float(low) + 1.0 if low is not None else (float(high) - 1.0 if high is not None else 1.0)


def _range(parameter: Parameter, start: float, given: tuple[float, float] | None) -> tuple[float, float]:
    b = parameter.bounds
    span = max(1.0, abs(start))
    low = b.ge if b.ge is not None else (b.gt if b.gt is not None else start - span)
    high = b.le if b.le is not None else (b.lt if b.lt is not None else start + span)
    if b.gt is not None:
        low = b.gt + 1e-6 * max(1.0, abs(high - b.gt))  # open bounds: stay strictly inside
    if b.lt is not None:
        high = b.lt - 1e-6 * max(1.0, abs(b.lt - low))
    if given is not None:
        lo, hi = given
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ParameterError(f"--range {parameter.name}: expected LOW:HIGH with LOW <= HIGH, got {lo}:{hi}")
        if lo < low or hi > high:
            raise ParameterError(f"--range {parameter.name}={lo}:{hi}: outside the declared range "
                                 f"{parameter.interval()}")
        low, high = lo, hi
    return float(low), float(high)


def searchable(spec: MergeMethod) -> list[str]:
    """The method's parameters a search can optimise: floats (per model or global), no tensor files."""
    return [name for name, p in spec.parameters.items() if p.kind is float and p.files is None]


def search_space(spec: MergeMethod, n_models: int, keys: Sequence[str], *, fixed: Mapping[str, Any] = (),
                 per_layer: bool = False, ranges: Mapping[str, tuple[float, float]] | None = None,
                 names: Sequence[str] | None = None) -> tuple[list[Dimension], list[tuple[str, list[str]]]]:
    """The dimensions searched (and the layer groups, with ``per_layer``), before any tensor is read."""
    fixed, ranges = dict(fixed or {}), dict(ranges or {})
    candidates = searchable(spec)
    chosen = list(names) if names is not None else [n for n in candidates if n not in fixed]
    for name in [*chosen, *ranges]:
        if name not in candidates:
            raise ParameterError("--search: " + unknown_choice(f"numeric parameter of {spec.name!r}", name,
                                                                 candidates or ["(none)"]))
    clash = sorted(set(chosen) & set(fixed))
    if clash:
        raise ParameterError(f"--{clash[0]}: fixed on the command line and searched; drop one")
    if not chosen:
        raise ParameterError(f"method {spec.name!r} has no numeric parameter left to search "
                             f"(its parameters: {', '.join(spec.parameters) or 'none'})")
    groups = _rules_order(layer_groups(keys)) if per_layer else [(None, list(keys))]
    dims = []
    for pattern, _ in groups:
        for name in chosen:
            parameter = spec.parameters[name]
            start = _start(parameter)
            low, high = _range(parameter, start, ranges.get(name))
            start = min(high, max(low, start))
            for model in (range(n_models) if parameter.per_model else [None]):
                dims.append(Dimension(name, pattern, model, low, high, start))
    return dims, groups if per_layer else []


def parameters_at(dims: Sequence[Dimension], point: Sequence[float], fixed: Mapping[str, Any], n_models: int
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The config's global ``parameters`` and per-tensor ``tensors`` rules at a unit-cube ``point``."""
    global_params: dict[str, Any] = dict(fixed)
    by_group: dict[str, dict[str, Any]] = {}
    for dim, unit in zip(dims, point):
        target = global_params if dim.group is None else by_group.setdefault(dim.group, {})
        value = dim.value(unit)
        if dim.model is None:
            target[dim.parameter] = value
        else:
            target.setdefault(dim.parameter, [None] * n_models)[dim.model] = value
    rules = [{"match": group, "parameters": params} for group, params in by_group.items()]
    return global_params, rules


# --------------------------------------------------------------------------------------------- the log


class SearchLog:
    """The run's JSON-lines log: a header (the search's definition) and one line per candidate, appended and
    flushed as each is scored, so an interrupted run loses at most the candidate in flight."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path, self.header = path, header
        self.writable = True  # False on the other processes of a torchrun search: they only replay

    def read(self) -> list[dict[str, Any]]:
        """The logged candidates of a run with this header (a torn last line is dropped)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ParameterError(f"--resume: {self.path}: no search log to resume (run without --resume)") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ParameterError(f"--resume: {self.path}: cannot read the search log ({error})") from None
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines):
                    break  # the line being written when the run was stopped
                raise ParameterError(f"--resume: {self.path}:{number}: not a search log line") from None
        if not records or records[0].get("header") != self.header:
            first = records[0].get("header", {}) if records else {}
            changed = sorted(k for k in {*first, *self.header} if first.get(k) != self.header.get(k))
            raise ParameterError(f"--resume: {self.path} is the log of another search (differs in "
                                 f"{', '.join(changed) or 'format'}); start over with --force")
        return records[1:]

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as file:
            file.write(json.dumps({"header": self.header}) + "\n")

    def append(self, candidate: Candidate, mask: Any = None) -> None:
        """Log ``candidate``; ``mask`` (the per-example correctness that orders later evaluations) as 0/1 text."""
        record = asdict(candidate)
        if mask is not None:
            record["order_mask"] = "".join("1" if bool(v) else "0" for v in torch_mask(mask).tolist())
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())


# --------------------------------------------------------------------------------------------- the search


def search(
    checkpoints: Sequence[str | Path],
    method: str,
    evaluator: Any,
    *,
    base: str | Path | None = None,
    budget: int = 100,
    per_layer: bool = False,
    parameters: Sequence[str] | None = None,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    population: int | None = None,
    sigma: float = DEFAULT_SIGMA,
    seed: int = 0,
    early_stop: bool = True,
    compare: bool = True,
    output: str | Path | None = None,
    report_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    **fixed_and_options: Any,
) -> SearchResult:
    """Search ``method``'s parameters over ``checkpoints`` (files) by CMA-ES, scored on the held-out set.

    ``budget``: candidates scored in all (the defaults included). ``parameters``: which to search (default: every
    float parameter not given in ``fixed_and_options``, which otherwise holds fixed method parameters and output
    options). ``ranges``: ``{name: (low, high)}`` within the declared bounds. ``population``: CMA-ES's λ (default
    ``4 + 3 ln d``). ``output``: write the best merge there, and its config beside it (``NAME.search.yaml``);
    ``report_dir`` (default: the output's folder) receives ``NAME.search.jsonl`` (the log ``resume`` continues),
    ``NAME.search.json`` and ``NAME.search.png``.
    """

    spec = get_method(method)
    options, fixed = split_options(fixed_and_options)
    _check_settings(budget, population, sigma)
    if spec.needs_base and base is None:
        raise ParameterError(f"method {method!r} needs a base model (--base)")
    paths = [Path(p) for p in checkpoints]
    if not paths:
        raise ParameterError("give at least one input checkpoint")
    keys = _float_keys(paths)
    dims, _ = search_space(spec, len(paths), keys, fixed=fixed, per_layer=per_layer, ranges=ranges,
                           names=parameters)
    if fixed:
        spec.validate(fixed, len(paths))
    judge = Judge(evaluator)
    # under torchrun every process merges and scores each candidate (the evaluator shards the examples and
    # sums the counts, so all agree); only rank 0 writes the log, the config, the merge and the report
    primary = int(getattr(judge.evaluator, "rank", 0) or 0) == 0
    early_stop = early_stop and int(getattr(judge.evaluator, "world", 1) or 1) == 1
    run = _Run(spec, paths, Path(base) if base is not None else None, fixed, options, dims)
    run.check_output(output if primary else None)
    header = run.header(budget, population, sigma, seed, early_stop)
    log = run.log(output, report_dir, header, resume) if primary else None
    if resume and not primary:
        log = SearchLog(run.log_path(output, report_dir), {k: v for k, v in header.items() if k != "budget"})
        log.writable = False
    started = time.perf_counter()
    candidates = _optimise(run, judge, log, budget, population, sigma, seed, early_stop, resume, progress)
    best = max((c for c in candidates if c.score is not None and not c.stopped_early),
               key=lambda c: (c.correct if c.correct is not None else -math.inf, c.score, -c.index))
    best.best = True
    result = SearchResult(method, dims, candidates, best, run.config(best.parameters, best.tensors),
                          judge.heldout, stats=_stats(candidates, time.perf_counter() - started))
    if compare and judge.is_evaluator:
        result.table = _compare(run, judge, best, paths)
        result.stats["best_ingredient"] = run.best_ingredient
    return run.finish(result, output, log)


def _check_settings(budget: Any, population: Any, sigma: Any) -> None:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ParameterError(f"--budget: expected a whole number of candidates >= 1, got {budget!r}")
    if population is not None and (not isinstance(population, int) or population < 2):
        raise ParameterError(f"--population: expected a whole number >= 2, got {population!r}")
    if not (isinstance(sigma, (int, float)) and 0 < sigma <= 1):
        raise ParameterError(f"--sigma: expected a step size in (0, 1] of each range, got {sigma!r}")


def _float_keys(paths: Sequence[Path]) -> list[str]:
    """The first input's floating tensor names (the per-layer groups come from them)."""

    reader = open_checkpoint(paths[0])
    try:
        return [k for k in reader.keys() if reader.info(k).is_float]
    finally:
        reader.close()


class _Run:
    """The search's fixed parts: inputs, fixed parameters, output options, dimensions; candidates as configs."""

    def __init__(self, spec: MergeMethod, paths: list[Path], base: Path | None, fixed: dict[str, Any],
                 options: OutputOptions, dims: list[Dimension]):
        self.spec, self.paths, self.base, self.fixed, self.options, self.dims = spec, paths, base, fixed, options, dims
        self.out: Path | None = None
        self.best_ingredient: str | None = None

    def config(self, parameters: Mapping[str, Any], tensors: Sequence[Mapping[str, Any]],
               folder: Path | None = None) -> dict[str, Any]:
        """The merge config of a candidate (paths relative to ``folder`` when given)."""
        def where(path: Path) -> str:
            if folder is None:
                return str(path.resolve())
            return os.path.relpath(path.resolve(), folder.resolve())

        config: dict[str, Any] = {"method": self.spec.name, "models": [where(p) for p in self.paths]}
        if self.base is not None:
            config["base"] = where(self.base)
        if parameters:
            config["parameters"] = dict(parameters)
        if tensors:
            config["tensors"] = [dict(t) for t in tensors]
        config.update({name: _plain(getattr(self.options, name)) for name in self.options.changed()
                       if name != "force"})
        return config

    def merge(self, parameters: Mapping[str, Any], tensors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The candidate merged in memory, exactly as ``soupkit merge --config`` would merge it."""

        return merge_from_config(self.config(parameters, tensors))

    def check_output(self, output: str | Path | None) -> None:
        if output is None:
            return

        protect = [*self.paths, *([self.base] if self.base is not None else [])]
        self.out = check_output_path(output, inputs=protect, force=self.options.force)

    def header(self, budget: int, population: int | None, sigma: float, seed: int, early_stop: bool
               ) -> dict[str, Any]:
        return {"version": LOG_VERSION, "method": self.spec.name, "models": [str(p.resolve()) for p in self.paths],
                "base": None if self.base is None else str(self.base.resolve()), "fixed": _plain(self.fixed),
                "dimensions": [asdict(d) for d in self.dims], "population": population, "sigma": sigma,
                "seed": seed, "early_stop": early_stop, "budget": budget}

    def log_path(self, output: str | Path | None, report_dir: str | Path | None) -> Path | None:
        """``NAME.search.jsonl`` in the report folder (default: the output's), NAME from the output."""
        out = Path(output) if output is not None else None
        folder = Path(report_dir) if report_dir is not None else (out.parent if out is not None else None)
        if folder is None:
            return None
        stem = (out.name.split(".")[0] if out is not None else "search") or "search"
        return folder / f"{stem}.search.jsonl"

    def log(self, output: str | Path | None, report_dir: str | Path | None, header: dict[str, Any],
            resume: bool) -> SearchLog | None:
        path = self.log_path(output, report_dir)
        if path is None:
            if resume:
                raise ParameterError("--resume needs the output (or report_dir) whose search log it continues")
            return None
        log = SearchLog(path, {k: v for k, v in header.items() if k != "budget"})
        if not resume and log.path.exists() and not self.options.force:
            raise ParameterError(f"{log.path}: a search log exists; --resume continues it, --force starts over")
        return log

    def finish(self, result: SearchResult, output: str | Path | None, log: SearchLog | None) -> SearchResult:
        """Write the config, the best merge (from that config), the report and the plot."""

        if self.out is not None:
            folder = self.out.parent
            stem = self.out.name.split(".")[0]
            result.config_path = folder / f"{stem}.search.yaml"
            text = _yaml(self.config(result.best.parameters, result.best.tensors, folder))
            _write_atomic(result.config_path, text)
            result.path = Path(merge_from_config(result.config_path, self.out, options=self.options))
        else:
            result.state_dict = self.merge(result.best.parameters, result.best.tensors)
        if log is not None and log.writable:

            stem = log.path.name.removesuffix(".search.jsonl")
            result.report_files.append(plot_search(result, log.path.parent / f"{stem}.search.png"))
            write_json(result.to_dict(), log.path.parent / f"{stem}.search.json")
            result.report_files += [log.path.parent / f"{stem}.search.json", log.path]
        return result


def _optimise(run: _Run, judge: Any, log: SearchLog | None, budget: int, population: int | None, sigma: float,
              seed: int, early_stop: bool, resume: bool, progress: bool) -> list[Candidate]:
    """The defaults, then CMA-ES generations until ``budget`` candidates are scored (a logged run replayed)."""
    import numpy as np
    from cmaes import CMA

    logged = log.read() if resume and log is not None else []
    if log is not None and not log.writable:
        log = None if not logged else _ReplayOnly(log)
    if log is not None and not logged:
        log.start()
    # cmaes needs two dimensions or more: a one-parameter search carries an inert second coordinate
    width = max(2, len(run.dims))
    mean = np.array([d.unit(d.start) for d in run.dims] + [0.5] * (width - len(run.dims)))
    optimiser = CMA(mean=mean, sigma=sigma, bounds=np.array([[0.0, 1.0]] * width), seed=seed,
                    population_size=population)
    bar = Steps(budget, progress, "search", judge=judge)
    scorer = _Scorer(run, judge, log, logged, early_stop, bar)
    try:
        scorer.score(None)
        while len(scorer.candidates) < budget:
            points = [optimiser.ask() for _ in range(optimiser.population_size)]
            told = []
            for point in points:
                if len(scorer.candidates) >= budget:
                    break
                told.append((point, scorer.score([float(x) for x in point]).fitness))
            if len(told) == optimiser.population_size:
                optimiser.tell(told)
    finally:
        bar.close()
    return scorer.candidates


class _Scorer:
    """Scores candidates in order (or replays the logged ones), keeping the best so far and the example order."""

    def __init__(self, run: _Run, judge: Any, log: Any, logged: list[dict[str, Any]], early_stop: bool, bar: Any):
        self.run, self.judge, self.log, self.logged = run, judge, log, logged
        self.early_stop, self.bar = early_stop, bar
        self.candidates: list[Candidate] = []
        self.best: Candidate | None = None
        self.order: Any = None

    def score(self, point: list[float] | None) -> Candidate:
        index, mask = len(self.candidates), None
        if index < len(self.logged):
            candidate = _replayed(self.logged[index], point, self.log)
            if "order_mask" in self.logged[index]:
                mask = torch_mask([c == "1" for c in self.logged[index]["order_mask"]])
        else:
            candidate, mask = self._evaluate(index, point)
        self.candidates.append(candidate)
        if candidate.score is not None and not candidate.stopped_early and (
                self.best is None or _beats(candidate, self.best)):
            self.best = candidate
        if self.order is None and mask is not None:
            # what the first full evaluation got wrong first: losers stop sooner; decisions do not depend on it,
            # an early-stopped candidate's bound does, so the mask is logged and a resumed run uses the same order
            self.order = hardest_first([Score(0.0, correct_mask=torch_mask(mask))])
        self.bar.advance()
        self.bar.describe(f"search: best {_show(self.best)}")
        return candidate

    def _evaluate(self, index: int, point: list[float] | None) -> tuple[Candidate, Any]:
        run = self.run
        if point is None:  # the method at its defaults: only what the user fixed
            parameters, tensors = dict(run.fixed), []
        else:
            parameters, tensors = parameters_at(run.dims, point[:len(run.dims)], run.fixed, len(run.paths))
        need = None
        if self.early_stop and self.best is not None and self.best.correct is not None and self.judge.is_evaluator:
            need = self.best.correct + 1
        result = self.judge.score(run.merge(parameters, tensors), need_correct=need, order=self.order)
        candidate = _candidate(index, point, parameters, tensors, result)
        mask = None
        if self.order is None and result.correct_mask is not None and not result.stopped_early:
            mask = result.correct_mask
        if self.log is not None:
            self.log.append(candidate, mask)
        return candidate, mask


class _ReplayOnly:
    """A log another process writes: read for the replay, never appended to."""

    def __init__(self, log: SearchLog):
        self.path = log.path

    def append(self, candidate: Candidate, mask: Any = None) -> None:
        pass


def torch_mask(mask: Any) -> Any:
    """A per-example correctness mask (a tensor, or a list from the score cache) as a bool tensor."""
    import torch

    return mask.to(torch.bool) if torch.is_tensor(mask) else torch.tensor([bool(v) for v in mask])


def _beats(candidate: Candidate, best: Candidate) -> bool:
    if candidate.correct is not None and best.correct is not None and candidate.n == best.n:
        return candidate.correct > best.correct
    return candidate.score is not None and best.score is not None and candidate.score > best.score


def _candidate(index: int, point: list[float] | None, parameters: dict[str, Any], tensors: list[dict[str, Any]],
               result: Any) -> Candidate:
    """A scored candidate; its fitness (minimised) is minus the score, minus the proven upper bound when the
    evaluation stopped early, and huge when there is no finite score."""
    score = result.accuracy if result.valid else None
    fitness = _WORST
    if result.stopped_early and result.n:
        seen = result.examples_seen or 0
        fitness = -((result.correct or 0) + (result.n - seen)) / result.n
        score = None
    elif score is not None:
        fitness = -float(score)
    return Candidate(index, point, _plain(parameters), _plain(tensors), score, result.correct, result.n,
                     result.stopped_early, result.examples_seen, fitness)


def _replayed(record: Mapping[str, Any], point: list[float] | None, log: SearchLog | None) -> Candidate:
    """A logged candidate, checked to be the point the optimiser asks for now (same seed, same history)."""
    logged_point = record.get("point")
    if (logged_point is None) != (point is None) or (point is not None and any(
            abs(a - b) > 1e-12 for a, b in zip(logged_point, point))):
        raise ParameterError(f"--resume: {log.path if log else 'the log'}: candidate {record.get('index')} is not "
                             "the point this search asks for (the log was edited, or cmaes changed); start over "
                             "with --force")
    fields = {k: record[k] for k in Candidate.__dataclass_fields__ if k in record and k != "best"}
    return Candidate(**fields)


def _show(best: Candidate | None) -> str:
    if best is None or best.score is None:
        return "-"
    return f"{100 * best.score:.2f}%" if best.correct is not None else f"{best.score:.4g}"


def _stats(candidates: Sequence[Candidate], seconds: float) -> dict[str, Any]:
    full = sum(c.n or 0 for c in candidates)
    seen = sum((c.examples_seen if c.stopped_early and c.examples_seen is not None else c.n or 0)
               for c in candidates)
    return {"candidates": len(candidates), "seconds": seconds,
            "candidates_per_second": len(candidates) / seconds if seconds > 0 else None,
            "early_stops": sum(c.stopped_early for c in candidates), "examples_evaluated": seen,
            "examples_full": full, "examples_saved_fraction": (full - seen) / full if full else 0.0}


def _compare(run: _Run, judge: Any, best: Candidate, paths: list[Path]) -> dict[str, dict[str, float]]:
    """Every dataset's score of the best ingredient, the uniform and greedy soups, the defaults and the search."""

    rows: dict[str, Any] = {}
    individual = {p: judge.accuracies(p) for p in paths}
    top = max(paths, key=lambda p: individual[p].get(judge.heldout, -math.inf))
    rows["best ingredient"] = individual[top]
    if len(paths) > 1:
        rows["uniform soup"] = judge.accuracies(merge(paths, "uniform"))
        greedy = greedy_soup(paths, judge.evaluator)
        rows[f"greedy soup ({len(greedy.ingredients)})"] = judge.accuracies(greedy.state_dict)
    rows[f"{run.spec.name} defaults"] = judge.accuracies(run.merge(dict(run.fixed), []))
    rows[f"{run.spec.name} searched"] = judge.accuracies(run.merge(best.parameters, best.tensors))
    run.best_ingredient = top.name
    return rows


# --------------------------------------------------------------------------------------------- small helpers


def _plain(value: Any) -> Any:
    """JSON/YAML-safe values (tuples as lists, paths as strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _yaml(config: Mapping[str, Any]) -> str:
    import yaml

    head = "# written by soupkit search: `soupkit merge --config THIS -o OUT` reproduces the searched merge\n"
    return head + yaml.safe_dump(_plain(config), sort_keys=False)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.soupkit-tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_ranges(values: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``NAME=LOW:HIGH`` flags as ``{name: (low, high)}`` (one-line errors naming the flag)."""
    ranges = {}
    for value in values:
        name, sep, span = value.partition("=")
        low, colon, high = span.partition(":")
        try:
            if not (sep and colon):
                raise ValueError
            ranges[name.strip()] = (float(low), float(high))
        except ValueError:
            raise ParameterError(f"--range: expected NAME=LOW:HIGH (e.g. density=0.1:0.9), got {value!r}") from None
    return ranges


__all__ = ["Candidate", "Dimension", "SearchResult", "layer_groups", "parse_ranges", "search", "search_space",
           "searchable"]
