"""Learned soup (Wortsman et al., ICML 2022, appendix I): mixing coefficients optimised on the held-out set.

The soup is ``θ = Σ_i softmax(a)_i θ_i`` with one logit per ingredient (``by_layer``: one per ingredient per
tensor); a learned scalar β multiplies the logits during training, as in the paper, so the coefficients are not
bent to fix calibration. Both are trained with AdamW on the held-out cross-entropy through
``torch.func.functional_call``, so the evaluator's model is never modified. Every ingredient is held on the device
at once (fp32), which is why this refuses early, with an estimate, when they would not fit.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import IncompatibleCheckpointsError, ParameterError, SoupkitError
from soupkit.io import CheckpointSource, check_output_path, provenance_metadata, save_checkpoint
from soupkit.io.provenance import ingredient_record
from soupkit.merging.engine import check_compatible
from soupkit.soups.result import LearnedWeights, SoupResult
from soupkit.soups.scoring import (
    Judge,
    Steps,
    close_all,
    dataset_score,
    input_name,
    open_inputs,
    protected_files,
    read_tensors,
)


class InsufficientMemoryError(SoupkitError):
    """The ingredients of a learned soup would not fit in the evaluation device's memory."""


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: ``cuda.mem_get_info`` on CUDA, available physical pages on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: do not refuse on a guess
        return 1 << 62


def activation_bytes(model: torch.nn.Module, batch: torch.Tensor) -> int:
    """Bytes of the activations one training step keeps: the outputs of every leaf module on ``batch`` (measured
    with forward hooks, no grad), doubled for their gradients."""
    total = [batch.numel() * batch.element_size()]

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if torch.is_tensor(tensor):
                total[0] += tensor.numel() * tensor.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return 2 * total[0]


def learned_soup(
    checkpoints: Sequence[CheckpointSource],
    evaluator: Any,
    *,
    by_layer: bool = False,
    steps: int = 100,
    lr: float = 0.05,
    weight_decay: float = 0.0,
    output: str | Path | None = None,
    force: bool = False,
    report_dir: str | Path | None = None,
    progress: bool = False,
    memory_limit: int | None = None,
) -> SoupResult:
    """Learn mixing weights for ``checkpoints`` on the evaluator's held-out set; write or return the soup.

    ``evaluator``: an ``Evaluator`` or recipe (the model and held-out batches are needed, so a plain callable is
    refused). ``steps``: AdamW steps, one held-out batch each (cycling). ``memory_limit``: bytes to plan for
    instead of the device's free memory. The result's ``extra`` holds ``weights`` (per ingredient; the mean over
    tensors with ``by_layer``), ``temperature``, and held-out ``heldout_loss`` vs ``uniform_loss``.
    """
    if not (isinstance(steps, int) and steps > 0):
        raise ParameterError(f"--steps: expected a positive integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ParameterError(f"--lr: expected a positive learning rate, got {lr!r}")
    started = time.perf_counter()
    readers = open_inputs(checkpoints)
    try:
        keys = check_compatible(readers, allow_missing=False)
        protect = protected_files(readers)
        out = check_output_path(output, inputs=protect, force=force) if output is not None else None
        judge = Judge(evaluator)
        if not judge.is_evaluator:
            raise ParameterError("learned soup needs an Evaluator or a recipe (--eval RECIPE): it trains through "
                                 "the evaluator's model on its held-out batches; a scoring function is not enough")
        ev = judge.evaluator
        names = [input_name(src, i) for i, src in enumerate(checkpoints)]
        model, device = ev.model, judge.device
        model_keys = list(model.state_dict())
        missing = [k for k in model_keys if k not in keys]
        if missing:
            raise IncompatibleCheckpointsError(f"{names[0]}: lacks {len(missing)} tensor(s) the evaluator's model "
                                               f"has, e.g. {missing[0]!r}")
        extra = [k for k in keys if k not in set(model_keys)]
        if extra:
            raise IncompatibleCheckpointsError(f"{names[0]}: has {len(extra)} tensor(s) the evaluator's model "
                                               f"lacks, e.g. {extra[0]!r}; is the recipe's model the right one?")
        float_keys = [k for k in model_keys if readers[0].info(k).is_float]

        # refuse before loading anything when N fp32 copies + the mix + activations do not fit
        count = len(readers)
        model_bytes = sum(readers[0].info(k).numel * 4 for k in float_keys)
        batches = _cycle(ev, judge.heldout)
        first_x, _ = next(batches)
        was_training = model.training
        model.eval()  # no BatchNorm statistics update from the probe; the soup trains in eval mode too
        try:
            activations = activation_bytes(model, first_x)
        finally:
            model.train(was_training)
        need = (count + 1) * model_bytes + activations
        free = memory_limit if memory_limit is not None else available_memory(device)
        if need > 0.9 * free:
            raise InsufficientMemoryError(
                f"learned soup of {count} ingredients needs about {need / 1e9:.2f} GB on {device} ({count} x "
                f"{model_bytes / 1e9:.2f} GB fp32 weights + the mix + {activations / 1e9:.2f} GB activations) but "
                f"{free / 1e9:.2f} GB is free; use fewer ingredients or the greedy soup")

        # every ingredient, read once, into one (N, ...) fp32 stack per tensor on the device
        stacks = {k: torch.empty((count, *readers[0].info(k).shape), dtype=torch.float32, device=device)
                  for k in float_keys}
        fixed: dict[str, torch.Tensor] = {}
        for i, reader in enumerate(readers):
            for key, tensor in read_tensors(reader, model_keys if i == 0 else float_keys, device):
                if key in stacks:
                    stacks[key][i].copy_(tensor)
                else:
                    fixed[key] = tensor
        dtypes = {k: readers[0].info(k).dtype for k in model_keys}

        shape = (count, len(float_keys)) if by_layer else (count, 1)
        logits = torch.zeros(shape, device=device, requires_grad=True)
        beta = torch.ones((), device=device, requires_grad=True)
        optimiser = torch.optim.AdamW([logits, beta], lr=lr, weight_decay=weight_decay)
        column = {k: (j if by_layer else 0) for j, k in enumerate(float_keys)}

        def mix(weights: torch.Tensor) -> dict[str, torch.Tensor]:
            mixed = {k: torch.tensordot(weights[:, column[k]], stacks[k], dims=1) for k in float_keys}
            return {**mixed, **fixed}

        model.eval()  # BatchNorm uses the mixed running statistics, as the soup will at test time
        losses: list[float] = []
        bar = Steps(steps, progress, "learned soup")
        try:
            for _ in range(steps):
                x, y = next(batches)
                weights = torch.softmax(logits, dim=0)
                output_logits = torch.func.functional_call(model, mix(weights), (x,))
                loss = torch.nn.functional.cross_entropy(beta * output_logits, y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise ParameterError(f"--lr {lr}: the learned soup's loss became {losses[-1]} at step "
                                         f"{len(losses)}; lower the learning rate")
                bar.advance()
        finally:
            bar.close()
            model.train(was_training)

        with torch.no_grad():
            weights = torch.softmax(logits.detach(), dim=0)
            learned_state = {k: v.detach() for k, v in mix(weights).items()}
            uniform_state = mix(torch.full(shape, 1.0 / count, device=device))
            learned = ev.evaluate(learned_state, [judge.heldout], use_cache=False).datasets[judge.heldout]
            uniform = ev.evaluate(uniform_state, [judge.heldout], use_cache=False).datasets[judge.heldout]
            soup = {k: learned_state[k].to(device="cpu", dtype=dtypes[k]) for k in model_keys}
        stacks.clear()  # free the N device copies before scoring
        scores = [judge.score(src) for src in checkpoints]
        per_ingredient = weights.mean(dim=1).cpu().tolist()
        history = ([LearnedWeights(k, weights[:, j].cpu().tolist()) for j, k in enumerate(float_keys)] if by_layer
                   else [LearnedWeights("*", per_ingredient)])
        result = SoupResult(
            method="learned", names=names, ingredients=list(range(count)),
            scores=[s.accuracy if s.valid else None for s in scores], history=history,
            score=dataset_score(learned),
            rule={"by_layer": by_layer, "steps": steps, "lr": lr, "weight_decay": weight_decay,
                  "heldout": judge.heldout},
            stats={"seconds": time.perf_counter() - started, "memory_estimate_bytes": need,
                   "memory_free_bytes": free},
            extra={"weights": per_ingredient, "temperature": float(beta.detach()),
                   "heldout_loss": _loss(learned), "uniform_loss": _loss(uniform),
                   "uniform_accuracy": dataset_score(uniform), "train_losses": losses},
        )
        if out is not None:
            records = [ingredient_record(names[i], readers[i].path, readers[i].nbytes,
                                         checkpoints[i] if isinstance(checkpoints[i], Mapping) else None)
                       for i in range(count)]
            learned_record = {"weights": per_ingredient, "temperature": result.extra["temperature"],
                              "by_layer": by_layer, "heldout_accuracy": result.score}
            metadata = provenance_metadata("learned_soup", dict(result.rule), records,
                                           {"soupkit.learned": learned_record})
            result.path = save_checkpoint(soup, out, metadata, force=force, protect=protect)
        else:
            result.state_dict = soup
        if report_dir is not None:
            from soupkit.report.plots import plot_learned_weights, write_json

            folder = Path(report_dir)
            result.report_files += [plot_learned_weights(names, per_ingredient, folder / "learned_weights.png"),
                                    folder / "learned.json"]
            write_json(result.to_dict(), folder / "learned.json")
        return result
    finally:
        close_all(readers, checkpoints)


def _loss(result: Any) -> float | None:
    loss = getattr(result, "loss", None)
    return None if loss is None else float(loss)


def _cycle(ev: Any, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out batches, round and round."""
    while True:
        empty = True
        for batch in ev.batches(name):
            empty = False
            yield batch
        if empty:
            raise ParameterError(f"the evaluator's {name!r} dataset has no examples to learn the soup on")
