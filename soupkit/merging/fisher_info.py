"""Diagonal Fisher information of a checkpoint, for Fisher merging (``--method fisher``).

F_j = mean over held-out examples x of (d/dtheta_j log p(y | x))^2 with y sampled from the model's own
predictive distribution p(. | x) (Matena & Raffel 2022; as the WiSE-FT code does), i.e. squared per-example
gradients, not the square of a batch gradient. Per-example gradients come from ``torch.func`` (vmap over grad);
models vmap cannot trace fall back to one backward pass per example. The model runs in eval mode (dropout off,
BatchNorm on its running statistics), so each example's gradient is its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soupkit.errors import ParameterError
from soupkit.io import CheckpointSource, check_output_path, load_checkpoint, save_checkpoint
from soupkit.merging.bn import checkpoint_keys, resolve_evaluator

#: per-example gradients held at once by vmap (examples x parameters x 4 bytes) stay under this
_VMAP_BYTES = 1 << 30


def squared_grads(model: nn.Module, params: dict[str, Tensor], images: Tensor, labels: Tensor, *,
                  vectorised: bool = True) -> dict[str, Tensor]:
    """Sum over the batch of each example's squared gradient of ``cross_entropy(model(x), y)``."""
    buffers = dict(model.named_buffers())
    if vectorised:
        from torch.func import functional_call, grad, vmap

        def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
            return F.cross_entropy(logits.float(), y.unsqueeze(0))

        per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)
        return {name: g.square().sum(0) for name, g in per_example.items()}
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    live = dict(model.named_parameters())
    for x, y in zip(images, labels):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.unsqueeze(0)).float(), y.unsqueeze(0)).backward()
        for name, total in sums.items():
            if live[name].grad is not None:
                total += live[name].grad.square()
    model.zero_grad(set_to_none=True)
    return sums


def compute_fisher(
    checkpoint: CheckpointSource,
    evaluator_or_recipe: Any,
    output: str | Path | None = None,
    max_examples: int | None = None,
    *,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Tensor] | Path:
    """The diagonal empirical Fisher of ``checkpoint`` on the evaluator's held-out data.

    Returns ``{key: Fisher}`` keyed like the checkpoint (trainable floating parameters only; float32), or writes
    it to ``output`` (safetensors) and returns the path. ``max_examples`` caps the examples used; ``seed`` seeds
    the label sampling.
    """
    if max_examples is not None and max_examples < 1:
        raise ParameterError(f"--max-examples must be >= 1, got {max_examples}")
    if output is not None:
        protect = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else []
        check_output_path(output, inputs=protect, force=force)  # fail before the (long) computation
    state = load_checkpoint(checkpoint)
    ev = resolve_evaluator(evaluator_or_recipe)
    check = getattr(ev, "require_class_scores", None)
    if check is not None:
        check(ev.heldout_name, "Fisher information")
    ev.load_state(state)
    model: nn.Module = ev.model
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    keys = checkpoint_keys(params, state)
    if not keys:
        raise ParameterError(f"compute_fisher: none of the model's parameters (e.g. {next(iter(params))!r}) is a "
                             "key of the checkpoint; is the recipe for this architecture?")
    was_training = model.training
    model.eval()  # dropout off, BatchNorm on its running statistics: each example's gradient is its own
    try:
        sums, count = _squared_grad_sums(model, params, ev, max_examples, seed)
    finally:
        model.train(was_training)
    if count == 0:
        raise ParameterError(f"compute_fisher: the held-out data {ev.heldout_name!r} has no examples")
    fisher = {keys[n]: (total / count).cpu() for n, total in sums.items() if n in keys}
    if output is None:
        return fisher
    metadata = {"soupkit.fisher.examples": str(count), "soupkit.fisher.seed": str(seed),
                "soupkit.fisher.checkpoint": str(checkpoint) if isinstance(checkpoint, (str, Path)) else "<state>"}
    return save_checkpoint(fisher, output, metadata, force=force,
                           protect=[checkpoint] if isinstance(checkpoint, (str, Path)) else [])


def _squared_grad_sums(model: nn.Module, params: dict[str, Tensor], ev: Any, max_examples: int | None,
                       seed: int) -> tuple[dict[str, Tensor], int]:
    """Sum over the held-out examples (at most ``max_examples``) of each example's squared gradient, with labels
    sampled from the model's own predictions; returns the sums and the number of examples."""
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    numel = sum(p.numel() for p in params.values())
    micro = max(1, min(64, _VMAP_BYTES // max(4 * numel, 1)))
    generator = torch.Generator(device=ev.device).manual_seed(seed)
    vectorised, count = True, 0
    for images, _ in ev.batches(ev.heldout_name):
        if max_examples is not None:
            images = images[: max_examples - count]
        with torch.no_grad():
            probs = F.softmax(model(images).float(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # the model's own predictions
        for start in range(0, len(images), micro):
            x, y = images[start:start + micro], labels[start:start + micro]
            try:
                batch = squared_grads(model, params, x, y, vectorised=vectorised)
            except (RuntimeError, NotImplementedError):
                if not vectorised:
                    raise
                vectorised = False  # an operation vmap cannot batch: one backward pass per example
                batch = squared_grads(model, params, x, y, vectorised=False)
            for name, value in batch.items():
                sums[name] += value.float()
        count += len(images)
        if max_examples is not None and count >= max_examples:
            break
    return sums, count
