"""Learned soup (Wortsman et al., ICML 2022, appendix I): mixing coefficients optimised on the held-out set.

The soup is ``θ = Σ_i softmax(a)_i θ_i`` with one logit per ingredient (``by_layer``: one per ingredient per
tensor); a learned scalar β multiplies the logits during training, as in the paper, so the coefficients are not
bent to fix calibration. Both are trained with AdamW on the held-out cross-entropy through
``torch.func.functional_call``, so the evaluator's model is never modified. Every ingredient is held on the device
at once (fp32), which is why this refuses early, with an estimate, when they would not fit.

Training mixes with a differentiable ``tensordot``; the soup that is scored and written is the ``linear`` method
with the learned weights (normalised by it), the soup scored in memory by the method's own function and the one
written by the merge engine (``merge(ingredients, "linear", weights=...)``), so the two hold the same numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit import interrupt
from soupkit.errors import IncompatibleCheckpointsError, ParameterError, SoupkitError
from soupkit.io import CheckpointSource
from soupkit.merging import merge
from soupkit.merging.api import merge_variants
from soupkit.merging.registry import get_method
from soupkit.report.plots import plot_learned_weights
from soupkit.soups.common import Candidates, SoupRun, read_tensors
from soupkit.soups.result import LearnedWeights, SoupResult
from soupkit.soups.scoring import Steps, dataset_score


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


@interrupt.cooperative()  # Ctrl-C / SIGTERM stop it between steps, never inside a finaliser
def learned_soup(
    checkpoints: Sequence[CheckpointSource],
    evaluator: Any,
    *,
    by_layer: bool = False,
    steps: int = 100,
    lr: float = 0.05,
    weight_decay: float = 0.0,
    output: str | Path | None = None,
    report_dir: str | Path | None = None,
    progress: bool = False,
    memory_limit: int | None = None,
    **output_options: Any,
) -> SoupResult:
    """Learn mixing weights for ``checkpoints`` on the evaluator's held-out set; write or return the soup.

    ``evaluator``: an ``Evaluator`` or recipe (the model and held-out batches are needed, so a plain callable is
    refused). ``steps``: AdamW steps, one held-out batch each (cycling). ``memory_limit``: bytes to plan for
    instead of the device's free memory. ``output_options``: the merge engine's (see ``soupkit.soups.common``).
    The result's ``extra`` holds ``weights`` (per ingredient; the mean over tensors with ``by_layer``),
    ``temperature``, and held-out ``heldout_loss`` vs ``uniform_loss``.
    """
    if not (isinstance(steps, int) and steps > 0):
        raise ParameterError(f"--steps: expected a positive integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ParameterError(f"--lr: expected a positive learning rate, got {lr!r}")
    with SoupRun("learned soup", checkpoints, evaluator, output=output, report_dir=report_dir,
                 output_options=output_options) as run:
        judge = run.judge
        if not judge.is_evaluator:
            raise ParameterError("learned soup needs an Evaluator or a recipe (--eval RECIPE): it trains through "
                                 "the evaluator's model on its held-out batches; a scoring function is not enough")
        ev, device, count = judge.evaluator, judge.device, len(run.readers)
        float_keys = _check_model(run, ev.model)
        batches = _cycle(ev, judge.heldout)
        need, free = _plan_memory(run, ev.model, float_keys, next(batches)[0], memory_limit)
        stacks, layout = _load(run, float_keys, device)
        column = {k: (j if by_layer else 0) for j, k in enumerate(float_keys)}
        shape = (count, len(float_keys) if by_layer else 1)
        logits, beta, losses = _train(ev.model, stacks, layout, column, batches, shape, steps=steps, lr=lr,
                                      weight_decay=weight_decay, progress=progress)
        with torch.no_grad():
            weights = torch.softmax(logits.detach(), dim=0)
            per_key = {k: weights[:, column[k]].cpu().tolist() for k in float_keys}
            learned, uniform = (ev.evaluate(layout(_mix(run, stacks, w)), [judge.heldout],
                                            use_cache=False).datasets[judge.heldout] for w in (per_key, None))
        stacks.clear()  # free the N device copies before scoring
        per_ingredient = weights.mean(dim=1).cpu().tolist()
        result = SoupResult(
            method="learned", names=run.names, ingredients=list(range(count)),
            scores=[s.accuracy if s.valid else None for s in map(judge.score, run.scoring_sources)],
            history=([LearnedWeights(k, per_key[k]) for k in float_keys] if by_layer
                     else [LearnedWeights("*", per_ingredient)]),
            score=dataset_score(learned),
            rule={"by_layer": by_layer, "steps": steps, "lr": lr, "weight_decay": weight_decay,
                  "heldout": judge.heldout},
            stats={"memory_estimate_bytes": need, "memory_free_bytes": free},
            extra={"weights": per_ingredient, "temperature": float(beta.detach()),
                   "heldout_loss": _loss(learned), "uniform_loss": _loss(uniform),
                   "uniform_accuracy": dataset_score(uniform), "train_losses": losses},
        )
        return _publish(run, checkpoints, result, per_key if by_layer else None)


def _publish(run: SoupRun, checkpoints: Sequence[CheckpointSource], result: SoupResult,
             per_key: Mapping[str, list[float]] | None) -> SoupResult:
    """Write the soup (the linear method with the learned weights; ``per_key``: by layer) and the report."""
    weights = result.extra["weights"]
    record = {"weights": weights, "temperature": result.extra["temperature"], "heldout_accuracy": result.score,
              **result.rule}

    def write(out: Path | None, **options: Any) -> Any:
        if per_key is not None:
            return _write_by_layer(run, checkpoints, per_key, out, {"soupkit.learned": record})

        return merge(checkpoints, "linear", out, weights=weights, metadata={"soupkit.learned": record},
                     base=run.base_for(checkpoints), **options)

    def plots(name: Callable[[str], Path]) -> list[Path]:
        return [plot_learned_weights(run.names, weights, name("weights"))]

    return run.finish(result, write, plots)


def _check_model(run: SoupRun, model: torch.nn.Module) -> list[str]:
    """The merged floating keys in the model's order, after checking the inputs are the model's checkpoints."""
    model_keys = list(model.state_dict())
    missing = [k for k in model_keys if k not in run.keys]
    if missing:
        raise IncompatibleCheckpointsError(f"{run.names[0]}: lacks {len(missing)} tensor(s) the evaluator's model "
                                           f"has, e.g. {missing[0]!r}")
    extra = [k for k in run.keys if k not in set(model_keys)]
    if extra:
        raise IncompatibleCheckpointsError(f"{run.names[0]}: has {len(extra)} tensor(s) the evaluator's model "
                                           f"lacks, e.g. {extra[0]!r}; is the recipe's model the right one?")
    merged = set(run.float_keys(run.readers[0]))
    return [k for k in model_keys if k in merged]


def _plan_memory(run: SoupRun, model: torch.nn.Module, float_keys: Sequence[str], batch: torch.Tensor,
                 memory_limit: int | None) -> tuple[int, int]:
    """Refuse before loading anything when N fp32 copies + the mix + activations do not fit."""
    count, device = len(run.readers), run.judge.device
    model_bytes = sum(run.readers[0].info(k).numel * 4 for k in float_keys)
    was_training = model.training
    model.eval()  # no BatchNorm statistics update from the probe; the soup trains in eval mode too
    try:
        activations = activation_bytes(model, batch)
    finally:
        model.train(was_training)
    need = (count + 1) * model_bytes + activations
    free = memory_limit if memory_limit is not None else available_memory(device)
    if need > 0.9 * free:
        raise InsufficientMemoryError(
            f"learned soup of {count} ingredients needs about {need / 1e9:.2f} GB on {device} ({count} x "
            f"{model_bytes / 1e9:.2f} GB fp32 weights + the mix + {activations / 1e9:.2f} GB activations) but "
            f"{free / 1e9:.2f} GB is free; use fewer ingredients or the greedy soup")
    return need, free


def _load(run: SoupRun, float_keys: Sequence[str], device: torch.device
          ) -> tuple[dict[str, torch.Tensor], Candidates]:
    """Every ingredient, read once, into one (N, ...) fp32 stack per merged tensor on the device; the layout
    of the soups to score (the first ingredient's other tensors)."""
    first = run.readers[0]
    stacks = {k: torch.empty((len(run.readers), *first.info(k).shape), dtype=torch.float32, device=device)
              for k in float_keys}
    for i, reader in enumerate(run.readers):
        for key, tensor in read_tensors(reader, float_keys, device):
            stacks[key][i].copy_(tensor)
    return stacks, run.candidates(first, device)


def _mix(run: SoupRun, stacks: Mapping[str, torch.Tensor], weights: Mapping[str, list[float]] | None
         ) -> dict[str, torch.Tensor]:
    """The ``linear`` method's own function over the stacked ingredients (``weights`` per key; None: uniform)."""
    spec = get_method("linear")
    mixed = {}
    for key, stack in stacks.items():
        params = spec.bind({} if weights is None else {"weights": weights[key]}, len(stack))
        mixed[key] = spec.fn([row.to(run.acc_dtype) for row in stack], **params)
    return mixed


def _train(model: torch.nn.Module, stacks: Mapping[str, torch.Tensor], layout: Candidates,
           column: Mapping[str, int], batches: Iterator[tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, int],
           *, steps: int, lr: float, weight_decay: float, progress: bool
           ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """AdamW on the logits and β through ``functional_call`` (the model itself is never modified)."""
    device = next(iter(stacks.values())).device if stacks else torch.device("cpu")
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    # the unmerged tensors as the soup holds them, in the model's dtype (functional_call uses them as they are)
    fixed = {k: v.to(dtypes[k]) if v.is_floating_point() else v for k, v in layout.fixed.items()}
    logits = torch.zeros(shape, device=device, requires_grad=True)
    beta = torch.ones((), device=device, requires_grad=True)
    optimiser = torch.optim.AdamW([logits, beta], lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.eval()  # BatchNorm uses the mixed running statistics, as the soup will at test time
    losses: list[float] = []
    bar = Steps(steps, progress, "learned soup")
    try:
        for _ in range(steps):
            interrupt.check()  # between two optimiser steps
            x, y = next(batches)
            weights = torch.softmax(logits, dim=0)
            mixed = {k: torch.tensordot(weights[:, column[k]], stacks[k], dims=1) for k in stacks}
            output_logits = torch.func.functional_call(model, {**mixed, **fixed}, (x,))
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
    return logits, beta, losses


def _write_by_layer(run: SoupRun, checkpoints: Sequence[CheckpointSource], per_key: Mapping[str, list[float]],
                    out: Path | None, metadata: Mapping[str, Any]) -> Any:
    """A by-layer learned soup through the engine: the linear method with per-tensor weights (tensors without
    learned weights are copied from the first input, as the engine does for excluded keys)."""

    options = run.options.model_copy(update={"exclude": (*run.options.exclude, *(k for k in run.keys
                                                                                 if k not in per_key))})
    default = {"weights": [1.0] * len(checkpoints)}
    return merge_variants(checkpoints, "linear", [(lambda key: {"weights": per_key[key]} if key in per_key
                                                   else default, out)],
                          options=options, metadata=metadata)[0]


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
