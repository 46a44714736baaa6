"""The Evaluator: build a model once from a recipe, then score many checkpoints on the recipe's data fast.

Why it is fast: the model is built once and each candidate's weights are copied into it in place; every dataset
is decoded and preprocessed once into tensors (on the GPU when they fit, else pinned memory; uint8 where the
transform allows, normalised on the device per batch) that every later evaluation reuses; inference runs under
``torch.inference_mode`` with bf16 autocast on CUDA and channels_last for convnets; a score cache on disk keyed
by content skips checkpoints already scored; ``need_correct`` stops a hopeless greedy-soup candidate early,
exactly.

Text models (``kind: transformers``) go through the same machinery: a dataset is tokenised once into packed
integer tensors and batched by length (``soupkit.eval.text``); multiple-choice and classification sets are
scored by accuracy like images, plain text by mean per-token log-likelihood (per-example values instead of a
correctness mask; no early stop; see ``soupkit.eval.result``).

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process scores its contiguous shard of each dataset and the counts,
losses and per-example masks are combined, so results equal a single process's. The process group is created
on first use (gloo on the CPU, nccl on CUDA).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from soupkit import interrupt
from soupkit.errors import CheckpointError, ParameterError, RecipeError, SoupkitError, unknown_choice
from soupkit.eval import registry
from soupkit.eval.cache import ScoreCache, source_fingerprint
from soupkit.eval.data import DataContext
from soupkit.eval.models import BuildContext
from soupkit.eval.prepare import prepare
from soupkit.eval.recipe import HELDOUT, Recipe, load_recipe
from soupkit.eval.result import DatasetResult, EvalResult
from soupkit.eval.text import TextData, token_nll
from soupkit.io import CheckpointReader, StateDictReader, open_checkpoint
from soupkit.io.lora import is_adapter
from soupkit.options import resolve_device


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


class Evaluator:
    """Scores checkpoints on a recipe's held-out and test data. Build once (``Evaluator.from_recipe``), call many
    times: ``ev(path_or_state_dict) -> EvalResult``."""

    heldout_name = HELDOUT

    def __init__(self, recipe: Recipe, *, device: str | torch.device | None = None,
                 cache_dir: str | Path | None = None, use_cache: bool = True):

        self.recipe = recipe
        _check_paths(recipe)  # a typo in a data path fails now, not after the model is built
        self.rank, self.world, local_rank = _distributed()
        self.device = resolve_device(device if device is not None else recipe.device, local_rank)
        if self.world > 1:
            self._init_process_group()
        precision = recipe.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self._amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.batch_size = recipe.batch_size
        # early-stopping evaluations (greedy soup candidates) check after every batch of at most this many
        # examples: small enough to drop a losing candidate early, large enough to keep the device busy
        self.early_stop_batch = 64 if self.device.type == "cpu" else 256
        self.use_cache = use_cache
        self.cache = ScoreCache(cache_dir)
        self.forward_passes = 0
        self._data: dict[str, Any] = {}
        self._oom_warned = False

        adapter = registry.models.get(recipe.model.kind)
        where = f"{recipe.source}: model"
        built = adapter.fn(**recipe.model.params, context=BuildContext(recipe.folder, self.device, where))
        model = built.module.to(self.device).eval()
        self.memory_format = _memory_format(recipe.memory_format, self.device, model)
        self._channels_last = self.memory_format == "channels_last"
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._built = built
        self.model: torch.nn.Module = model
        self._keys = {name: recipe.dataset_key(name, precision=precision, device_type=self.device.type,
                                               memory_format=self.memory_format,
                                               model_fingerprint=built.fingerprint)
                      for name in recipe.datasets}

    @classmethod
    def from_recipe(cls, path_or_dict: str | Path | Mapping[str, Any] | Recipe, *,
                    device: str | torch.device | None = None, cache_dir: str | Path | None = None,
                    use_cache: bool = True) -> Evaluator:
        """Build from a recipe path, bare recipe name (``"digits"``) or mapping; ``device`` overrides the recipe's."""
        return cls(load_recipe(path_or_dict), device=device, cache_dir=cache_dir, use_cache=use_cache)

    # ------------------------------------------------------------------------------------------- datasets

    @property
    def dataset_names(self) -> list[str]:
        """The held-out set first, then the test sets in recipe order."""
        return list(self.recipe.datasets)

    @property
    def test_names(self) -> list[str]:
        return self.recipe.test_names

    @property
    def shift_names(self) -> list[str]:
        """Test sets marked (or defaulted, all but the first) as distribution shifts."""
        return self.recipe.shift_names

    def _check_name(self, name: str) -> None:
        if name not in self.recipe.datasets:
            raise ParameterError(unknown_choice(f"dataset (recipe {self.recipe.source})", name, self.recipe.datasets))

    def _prepared(self, name: str) -> Any:
        """The dataset's ready tensors, decoded on first use."""
        self._check_name(name)
        if name not in self._data:

            spec = self.recipe.datasets[name]
            adapter = registry.data.get(spec.kind)
            source = adapter.fn(**spec.params, context=DataContext(self.recipe.folder, self._built, spec.where))
            tokens = self.cache.folder / "tokens" / f"{self._keys[name]}-{self.rank}of{self.world}.safetensors"
            self._data[name] = prepare(spec, source, self._built, self.device, self.rank, self.world,
                                       self.recipe.num_workers, self.batch_size,
                                       tokens if self.use_cache and self._built.text is not None else None)
        return self._data[name]

    def require_class_scores(self, dataset: str, purpose: str) -> None:
        """Refuse ``purpose`` (e.g. Fisher information, which samples labels from class scores) on a dataset
        scored by log-likelihood."""
        if self._prepared(dataset).metric != "accuracy":
            raise ParameterError(f"{purpose} needs class or choice scores; dataset {dataset!r} of "
                                 f"{self.recipe.source} is plain text scored by log-likelihood (give it "
                                 "prompt_field, choices_field and answer_field instead)")

    def num_examples(self, dataset: str) -> int:
        """Examples in ``dataset`` (over all processes)."""
        return self._prepared(dataset).total

    def batches(self, dataset: str, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) on the device, preprocessed and ready for ``ev.model``, in dataset order (this
        process's shard under torchrun). For learned soups, Fisher information and BatchNorm recalibration.
        Text: packed token batches in length order, labels (or, for plain text, the target tokens, -100 where
        not scored) such that ``cross_entropy(ev.model(x), y)`` is the training loss."""
        data = self._prepared(dataset)
        size = batch_size or self.batch_size
        yield from self._batches(data, size, data.order_for(size, None))

    def _batches(self, data: Any, batch_size: int, order: torch.Tensor | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:

        if isinstance(data, TextData):
            for batch in data.batches(batch_size, order, self.device):
                interrupt.check()  # between two batches: a Ctrl-C stops a long evaluation here
                yield batch
            return
        for start in range(0, data.n, batch_size):
            interrupt.check()
            rows: slice | torch.Tensor = slice(start, start + batch_size)
            if order is not None:
                rows = order[start:start + batch_size].to(data.images.device)
            x = data.images[rows].to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)
                if data.mean is not None:
                    x = x.sub_(data.mean).div_(data.std)
            if self._channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, data.labels[rows.to(data.labels.device) if order is not None else rows]

    # -------------------------------------------------------------------------------------------- weights

    def load_state(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state dict>") -> None:
        """Copy weights into the model in place. Keys and shapes must match the model exactly; tensors already
        on the evaluator's device are copied device to device."""
        if not all(torch.is_tensor(v) for v in state_dict.values()):

            with open_checkpoint(state_dict, name=name) as reader:
                self._load_reader(reader)
            return
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        targets = self._targets(shapes, name)
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(state_dict[key], non_blocking=True)

    def check_fits(self, source: Any) -> None:
        """Raise the one-line "does not fit the recipe's model" error naming ``source`` (a checkpoint path or
        reader) if its keys or shapes do not match the model; reads the header only. Soup algorithms call it on
        their inputs so a mismatch names the file, not the in-memory soup made from it."""

        if isinstance(source, CheckpointReader):
            self._targets({k: tuple(source.info(k).shape) for k in source.keys()}, source.name)
            return
        with open_checkpoint(source) as reader:
            self._targets({k: tuple(reader.info(k).shape) for k in reader.keys()}, reader.name)

    def _load_reader(self, reader: Any) -> None:
        shapes = {k: tuple(reader.info(k).shape) for k in reader.keys()}
        targets = self._targets(shapes, reader.name)
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(reader.get(key), non_blocking=True)

    def _targets(self, shapes: Mapping[str, tuple[int, ...]], name: str) -> dict[str, torch.Tensor]:
        targets = self.model.state_dict()
        aliases = getattr(self.model, "aliases", {})  # tied copies (lm_head.weight): optional, never loaded twice
        missing = [k for k in targets if k not in shapes]
        unexpected = [k for k in shapes if k not in targets and k not in aliases]
        wrong = [k for k in targets if k in shapes and tuple(targets[k].shape) != shapes[k]]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} key(s) {_few(missing)}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} key(s) {_few(unexpected)}")
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k!r} is {shapes[k]} but the model has "
                             f"{tuple(targets[k].shape)}")
            raise CheckpointError(f"{name}: does not fit the recipe's model ({self.recipe.model.kind} "
                                  f"{_model_label(self.recipe)}): {'; '.join(parts)}")
        return targets

    def _load_source(self, source: Any, label: str) -> None:
        """The one place a checkpoint to score becomes the model's weights: a state dict, a reader, or a path
        (a file, a sharded index, an HF folder) opened by ``soupkit.io.open_checkpoint``; a PEFT LoRA adapter is
        applied to the model's base weights (``adapter_base``: a transformers recipe's model folder) as W + dW."""

        if isinstance(source, Mapping):
            self.load_state(source, label)
        elif isinstance(source, CheckpointReader):
            self._load_reader(source)
        else:
            base = None
            if is_adapter(source):
                base = self.adapter_base
                if base is None:
                    raise CheckpointError(f"{label}: a LoRA adapter, and this recipe's model has no base weights to "
                                          f"apply it to (a transformers model folder with its weights)")
            with open_checkpoint(source, name=label, base=base) as reader:
                self._load_reader(reader)

    def _base_of(self, source: Any) -> Any:
        """The base weights ``source`` is applied to when it is a LoRA adapter (part of its score's key)."""

        return self.adapter_base if isinstance(source, (str, Path)) and is_adapter(source) else None

    @property
    def adapter_base(self) -> Any:
        """The weights LoRA adapters are applied to when scored (None: the recipe's model has none)."""
        return self._built.base_weights

    # --------------------------------------------------------------------------------------------- scoring

    def __call__(self, state_dict_or_path: Any, datasets: list[str] | None = None, **options: Any) -> EvalResult:
        """``evaluate`` (all datasets by default)."""
        return self.evaluate(state_dict_or_path, datasets, **options)

    def evaluate(self, state_or_path: Any, datasets: list[str] | None = None, *, need_correct: int | None = None,
                 order: torch.Tensor | None = None, use_cache: bool | None = None,
                 progress: Any = False) -> EvalResult:
        """Score a checkpoint path or state dict on ``datasets`` (all when None).

        ``need_correct`` (one dataset only): stop as soon as ``correct_so_far + remaining < need_correct``; the
        result is then marked ``stopped_early`` (and not cached). Whether the checkpoint reaches
        ``need_correct`` is decided exactly as by a full evaluation. Under torchrun it is ignored (full runs).
        Early-stopping evaluations run in batches of at most ``early_stop_batch`` so a candidate that cannot
        win is dropped soon. ``order`` (with ``need_correct``): a permutation of the dataset's examples to
        evaluate them in — hardest first makes losing candidates fail fastest; the count, and so the decision,
        does not depend on the order, and the returned mask is in dataset order.
        """
        started = time.perf_counter()
        names, order = self._check_request(datasets, need_correct, order)
        label = str(state_or_path) if isinstance(state_or_path, (str, Path)) else getattr(
            state_or_path, "name", "<state dict>")
        if isinstance(state_or_path, Mapping) and not all(torch.is_tensor(v) for v in state_or_path.values()):
            # {"state_dict": ...}, "module." prefixes, ...
            state_or_path = StateDictReader(state_or_path, name=label).state_dict
        caching = self.use_cache if use_cache is None else use_cache
        fingerprint = hits = None
        if caching:
            if isinstance(state_or_path, (str, Path)) and not Path(state_or_path).exists():
                raise CheckpointError(f"{state_or_path}: no such file")
            fingerprint = source_fingerprint(state_or_path, self._base_of(state_or_path)) \
                if isinstance(state_or_path, (str, Path, Mapping)) else None
        results: dict[str, DatasetResult] = {}
        if fingerprint is not None:
            hits = {name: self.cache.get(fingerprint, self._keys[name]) for name in names}
            if self.world > 1:  # every process must agree, or some would wait for the others in a collective
                agreed = self._all_min([1 if hits[n] is not None else 0 for n in names])
                hits = {n: hits[n] if ok else None for n, ok in zip(names, agreed)}
            for name, entry in hits.items():
                if entry is not None:
                    results[name] = _cached(name, entry)
        todo = [n for n in names if n not in results]
        if todo:
            bar = _Progress(progress, label)
            try:
                bar.stage("loading weights")
                self._load_source(state_or_path, label)  # first: a checkpoint that does not fit fails fast
                bar.stage("preparing data")  # decoding a large image folder takes a while: show it
                bar.stage("", sum(-(-self._prepared(n).n // self.batch_size) for n in todo))
                for name in todo:
                    bar.stage(name)
                    result = self._score(name, need_correct if self.world == 1 else None, bar,
                                         order if self.world == 1 else None)
                    results[name] = result
                    if fingerprint is not None and not result.stopped_early and self.rank == 0:
                        self.cache.put(fingerprint, self._keys[name], correct=result.correct, n=result.n,
                                       loss=result.loss, mask=result.correct_mask, seconds=result.seconds,
                                       dataset=name, values=result.values, tokens=result.tokens)
            finally:
                bar.close()
            if fingerprint is not None and self.world > 1:
                self._all_min([0])  # every process waits for rank 0's cache writes: the next call finds them
        return EvalResult({n: results[n] for n in names}, time.perf_counter() - started, label, fingerprint)

    def _check_request(self, datasets: list[str] | None, need_correct: int | None, order: Any
                       ) -> tuple[list[str], torch.Tensor | None]:
        """``evaluate``'s arguments checked: the dataset names, and ``order`` as an int64 permutation."""
        names = list(self.dataset_names if datasets is None else datasets)
        if isinstance(datasets, str):
            raise ParameterError(f"datasets: expected a list of dataset names, got the string {datasets!r}")
        for name in names:
            self._check_name(name)
        if need_correct is not None and len(names) != 1:
            raise ParameterError(f"need_correct applies to exactly one dataset, got {len(names)}")
        if need_correct is not None and self._prepared(names[0]).metric != "accuracy":
            raise ParameterError(f"need_correct applies to accuracy datasets; {names[0]!r} is scored by "
                                 "log-likelihood")
        if order is None:
            return names, None
        if need_correct is None:
            raise ParameterError("order applies only to early-stopping evaluations (with need_correct)")
        order = torch.as_tensor(order, dtype=torch.int64).reshape(-1)
        n = self._prepared(names[0]).n
        if len(order) != n or not torch.equal(torch.sort(order).values, torch.arange(n)):
            raise ParameterError(f"order must be a permutation of the {n} examples of {names[0]!r}")
        return names, order

    def _autocast(self) -> Any:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

    def _score(self, name: str, need_correct: int | None, bar: Any, order: torch.Tensor | None = None
               ) -> DatasetResult:
        started = time.perf_counter()
        data = self._prepared(name)
        total = data.total
        if data.metric == "log_likelihood":
            return self._score_likelihood(name, data, bar, started)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        masks: list[torch.Tensor] = []
        seen, stopped = 0, False
        with torch.inference_mode(), self._autocast():
            batch_size = self.batch_size if need_correct is None else min(self.batch_size, self.early_stop_batch)
            order = data.order_for(batch_size, order)  # text: bucketed by length
            for images, labels in self._batches(data, batch_size, order):
                if need_correct is not None and int(correct) + (total - seen) < need_correct:
                    stopped = True
                    break
                logits = self._logits(images)
                if data.class_subset is not None:
                    logits = logits.index_select(1, data.class_subset)
                hit = logits.argmax(1) == labels
                correct += hit.sum()
                loss += F.cross_entropy(logits.float(), labels, reduction="sum").double()
                masks.append(hit)
                seen += len(labels)
                bar.advance()
        mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=self.device)
        if order is not None and not stopped:
            mask = _dataset_order(mask, order)
        if need_correct is not None and not stopped and seen < total and int(correct) + (total - seen) < need_correct:
            stopped = True
        if self.world > 1:
            (correct, loss), (mask,) = self._combine(data, [correct, loss], [mask])
            correct = correct.round().long()
            seen = total
        count = int(correct)
        mean_loss = float(loss) / seen if seen else None
        return DatasetResult(name, count, total, mask.to("cpu", torch.bool), mean_loss,
                             time.perf_counter() - started, stopped, seen)

    def _score_likelihood(self, name: str, data: Any, bar: Any, started: float) -> DatasetResult:
        """Plain text under a causal LM: summed token log-likelihoods, and each example's mean (dataset order)."""

        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        values: list[torch.Tensor] = []
        order = data.order_for(self.batch_size, None)
        with torch.inference_mode(), self._autocast():
            for x, targets in self._batches(data, self.batch_size, order):
                summed, count = token_nll(self._logits(x), targets)
                nll += summed.sum().double()
                tokens += count.sum()
                values.append(-summed / count.clamp(min=1))
                bar.advance()
        per_example = _dataset_order(torch.cat(values), order)
        if self.world > 1:
            (nll, tokens), (per_example,) = self._combine(data, [nll, tokens], [per_example])
        count = round(float(tokens))
        return DatasetResult(name, None, data.total, None, float(nll) / max(count, 1),
                             time.perf_counter() - started, False, data.total, metric="log_likelihood",
                             values=per_example.to("cpu", torch.float32), tokens=count)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's logits, in chunks that fit: on CUDA out-of-memory the chunk size halves and is kept."""
        while True:
            try:
                chunk = min(self.batch_size, len(images))
                outputs = []
                for part in images.split(chunk):
                    out = self.model(part)
                    self.forward_passes += 1
                    outputs.append(_logits_of(out))
                return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise SoupkitError(f"out of GPU memory even with batch size 1 on {self.device}") from None
                self.batch_size = max(1, min(self.batch_size, len(images)) // 2)
                torch.cuda.empty_cache()
                if not self._oom_warned:
                    self._oom_warned = True
                    warnings.warn(f"out of GPU memory: batch size lowered to {self.batch_size}", stacklevel=3)

    # -------------------------------------------------------------------------------------------- torchrun

    def _init_process_group(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            # imported before the group exists, on purpose: its functions default to ``group=group.WORLD``,
            # evaluated at import, so imported later (transformers and open_clip import it while building a
            # model) it pins the group past destroy_process_group; the group's gloo worker threads then outlive
            # the interpreter, and one releasing a finished collective's tensors as it shuts down aborts the
            # process ("terminate called without an active exception") after all the work succeeded
            import torch.distributed.nn.functional  # noqa: F401

            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            # we opened the group, so we close it (and so join its threads) before the interpreter shuts down
            atexit.register(_destroy_process_group)

    def _all_min(self, flags: list[int]) -> list[int]:
        import torch.distributed as dist

        tensor = torch.tensor(flags, dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor.tolist()

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _combine(self, data: Any, sums: list[torch.Tensor], per_example: list[torch.Tensor]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Sum ``sums`` over processes (as float64); gather each per-example tensor (this shard's, in dataset
        order) back into the whole dataset's order."""
        import torch.distributed as dist

        device = self._collective_device()
        totals = torch.stack([t.double() for t in sums]).to(device)
        dist.all_reduce(totals)
        sizes = [data.total * (r + 1) // self.world - data.total * r // self.world for r in range(self.world)]
        gathered_all = []
        for values in per_example:
            wire = torch.float32 if values.is_floating_point() else torch.uint8
            padded = torch.zeros(max(sizes), dtype=wire, device=device)
            padded[: len(values)] = values.to(device, wire)
            gathered = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(gathered, padded)
            full = torch.cat([g[:size] for g, size in zip(gathered, sizes)])
            gathered_all.append(full if values.is_floating_point() else full.bool())
        return list(totals), gathered_all

    def __repr__(self) -> str:
        return (f"Evaluator({self.recipe.source!r}, model={self.recipe.model.kind}:{_model_label(self.recipe)}, "
                f"datasets={self.dataset_names}, device={self.device}, precision={self.precision})")


def _dataset_order(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-example values computed in ``order`` put back in dataset order."""
    out = torch.empty_like(values)
    out[order[: len(values)].to(values.device)] = values
    return out


def _cached(name: str, entry: Mapping[str, Any]) -> DatasetResult:
    n = int(entry["n"])
    if entry.get("metric") == "log_likelihood":
        return DatasetResult(name, None, n, None, entry.get("loss"), 0.0, False, n, cached=True,
                             metric="log_likelihood", values=entry["values"], tokens=entry.get("tokens"))
    return DatasetResult(name, int(entry["correct"]), n, entry["correct_mask"], entry.get("loss"), 0.0, False, n,
                         cached=True)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _memory_format(requested: str, device: torch.device, model: torch.nn.Module) -> str:
    """``auto``: channels_last on CUDA, and on the CPU for convnets (oneDNN's NHWC kernels: forward passes 1.9x
    faster for the digits CNN and 1.7x for a timm ResNet here); contiguous otherwise. A single convolution is a
    ViT's patch embedding, not a convnet: there NHWC only adds layout changes (~5% slower for ViT-B/32)."""
    if requested != "auto":
        return requested
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if device.type == "cuda" or convolutions > 1:
        return "channels_last"
    return "contiguous"


def _check_paths(recipe: Recipe) -> None:
    """Every file or folder the recipe names must exist (errors name the recipe field)."""

    specs = [(f"{recipe.source}: model", recipe.model.params),
             *((spec.where, spec.params) for spec in recipe.datasets.values())]
    for where, params in specs:
        for key, value in params.items():
            if isinstance(value, Path) and not value.exists():
                raise RecipeError(f"{where}.{key}: {value} does not exist")


def _logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SoupkitError(f"the model returned a {type(output).__name__}; expected logits (a tensor)")


def _few(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:3])
    return f"({shown}{', ...' if len(keys) > 3 else ''})"


def _model_label(recipe: Recipe) -> str:
    params = recipe.model.params
    return str(params.get("name") or params.get("factory") or params.get("path") or "")


class _Progress:
    """Per-batch progress of one evaluation with its ETA, on stderr, only when stderr is a terminal (silent in
    pipes, log files and notebooks). The bar appears before the data is prepared, so a slow first decode of
    an image folder shows as activity rather than a frozen screen."""

    def __init__(self, enabled: Any, label: str):
        """``enabled``: True for a display of its own, or a running rich ``Progress`` (a soup algorithm's step
        bar) to add this evaluation's line to, removed when it ends."""
        self._bar: Any = None
        self._label = f"eval {Path(label).name if not label.startswith('<') else 'candidate'}"
        self._shared = enabled is not True and hasattr(enabled, "add_task")
        if self._shared:
            self._bar = enabled
            self._task = self._bar.add_task(self._label, total=None)
            return
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        from rich import progress as p

        self._bar = p.Progress(p.SpinnerColumn(), p.TextColumn("{task.description}"), p.BarColumn(),
                               p.MofNCompleteColumn(), p.TextColumn("batches, eta"), p.TimeRemainingColumn(),
                               p.TimeElapsedColumn(), console=console, transient=True)
        self._task = self._bar.add_task(self._label, total=None)
        self._bar.start()

    def stage(self, what: str, total: int | None = None) -> None:
        """Say what is being done now (a dataset's name); ``total`` batches once they are known."""
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self._label}: {what}",
                             **({"total": total} if total is not None else {}))

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None and self._shared:
            self._bar.remove_task(self._task)
        elif self._bar is not None:
            self._bar.stop()
