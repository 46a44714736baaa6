"""The doctor's one streaming pass: the N×N Gram matrix of task vectors, whole model and per module, in float64.

Every floating tensor of every input is read once, chunk by chunk, into an ``N × chunk`` float64 buffer whose
size is fixed (``BUDGET_ELEMENTS`` in all, so the chunk shrinks as N grows): memory is flat in N and in model
size. Integer and bool tensors (step counters, BatchNorm's ``num_batches_tracked``) are skipped.

With a base θ₀ the rows are the task vectors θᵢ − θ₀. Without one, the rows are θᵢ − θ_ref (θ_ref = the first
input) and the Gram of θᵢ − mean θ follows exactly from G_c = C G C with C = I − (1/N)·11ᵀ (centring is blind to
the shift, since C·1 = 0). The shift costs nothing and keeps the digits that the raw Gram of θᵢ would lose to
cancellation: ‖θ‖² is typically 10³–10⁶ times ‖θᵢ − θⱼ‖².
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from soupkit.errors import IncompatibleCheckpointsError, NonFiniteError
from soupkit.io import CheckpointReader

#: float64 elements held at once over all inputs (8 MB; the chunk is BUDGET_ELEMENTS // N): the N×chunk · chunk×N
#: product is memory-bound, and for 8 ViT-B-32-shaped inputs a 32 MB buffer cost 1.3-1.5 CPU-s vs 0.8 for this one
#: (64K-256K elements measured no better on this 2-core machine)
BUDGET_ELEMENTS = 1 << 20
#: modules the per-module Grams are kept for (the rest are pooled): a report reads ~30 at most
MAX_MODULES = 32
#: chunks at least this big are memory-mapped (no copy) where the reader can; smaller ones are read
MAP_MIN_BYTES = 256 << 10


@dataclass
class GramStats:
    """What the pass accumulated. ``gram[m]`` is the N×N Gram of the rows over module ``m``'s tensors (``""`` is
    the whole model); ``raw_sq[i]`` is ‖θᵢ‖² (the weights themselves, for relative distances); ``identical[i][j]``
    is True when inputs i and j hold bit-identical floating tensors."""

    gram: dict[str, torch.Tensor]
    raw_sq: torch.Tensor
    identical: torch.Tensor
    centred: bool
    numel: dict[str, int] = field(default_factory=dict)
    base_sq: float | None = None  # ‖θ_base‖²


def module_of(keys: Sequence[str], sizes: dict[str, int]) -> dict[str, str]:
    """Key -> module: the first name component; a component holding more than half of all parameters and more
    than one child is split by its second component (``model.layers``/``model.embed_tokens`` in a Llama,
    ``head.1``/``head.3`` in a small CNN), so one wrapper prefix does not swallow the whole model."""
    first = {k: k.split(".", 1)[0] for k in keys}
    total = sum(sizes.values()) or 1
    by_first: dict[str, list[str]] = {}
    for key in keys:
        by_first.setdefault(first[key], []).append(key)
    modules = {}
    for name, members in by_first.items():
        children = {k.split(".")[1] for k in members if k.count(".") >= 2}
        split = sum(sizes[k] for k in members) > total / 2 and len(children) > 1
        for key in members:
            parts = key.split(".")
            modules[key] = ".".join(parts[:2]) if split and len(parts) >= 3 else name
    return _capped(modules, sizes)


def _capped(modules: dict[str, str], sizes: dict[str, int], limit: int | None = None) -> dict[str, str]:
    """At most ``MAX_MODULES`` modules: the largest keep their names, the rest share one ("N others"). A
    checkpoint of 10k tiny top-level tensors would otherwise give 10k N×N Grams and a report line per module."""
    limit = MAX_MODULES if limit is None else limit
    weight: dict[str, int] = {}
    for key, module in modules.items():
        weight[module] = weight.get(module, 0) + sizes[key]
    if len(weight) <= limit:
        return modules
    kept = set(sorted(weight, key=lambda m: (-weight[m], m))[: limit - 1])
    rest = f"({len(weight) - len(kept)} others)"
    return {key: module if module in kept else rest for key, module in modules.items()}


def gram_pass(readers: Sequence[CheckpointReader], keys: Sequence[str], base: CheckpointReader | None = None,
              budget: int = BUDGET_ELEMENTS) -> GramStats:
    """Accumulate the Gram matrices over ``keys`` (floating tensors only) of ``readers`` in one pass.

    The buffer's rows are θᵢ − θ_anchor for every input, and θ_anchor itself in the anchor's row (the base's, an
    extra last row; else input 0's, whose own difference is zero anyway). One product per chunk then also gives
    ‖θᵢ‖² = ‖θᵢ − θ_a‖² + 2⟨θᵢ − θ_a, θ_a⟩ + ‖θ_a‖², with no separate pass for the weight norms."""
    infos = {k: readers[0].info(k) for k in keys}
    floats = [k for k in keys if infos[k].is_float and not infos[k].dtype.is_complex]
    if not floats:
        raise IncompatibleCheckpointsError(f"{readers[0].name}: no floating-point tensors to compare")
    sources = [*readers, *([base] if base is not None else [])]
    rows_n, anchor = len(sources), len(sources) - 1 if base is not None else 0
    modules = module_of(floats, {k: infos[k].numel for k in floats})
    gram = {m: torch.zeros(rows_n, rows_n, dtype=torch.float64) for m in ["", *dict.fromkeys(modules.values())]}
    numel = dict.fromkeys(gram, 0)
    identical = {(i, j) for i in range(len(readers)) for j in range(i + 1, len(readers))}
    step = max(1, budget // rows_n)
    rows = torch.empty(rows_n, min(step, max(infos[k].numel for k in floats)), dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the chunks are small: intra-op threads only spin (see merging/engine.py)
    spans = [(key, start, min(start + step, infos[key].numel)) for key in floats
             for start in range(0, infos[key].numel, step)]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soupkit-doctor-read")
    try:
        # the next chunk is read (mapped and faulted in, off the GIL) while this one is multiplied
        pending = pool.submit(_read_all, sources, *spans[0]) if spans else None
        for number, (key, start, stop) in enumerate(spans):
            raw = pending.result()  # type: ignore[union-attr]
            if number + 1 < len(spans):
                pending = pool.submit(_read_all, sources, *spans[number + 1])
            block = rows[:, : stop - start]
            _fill(block, raw, anchor, identical)
            gram[modules[key]].addmm_(block, block.T)
            del raw
        for key in floats:
            numel[modules[key]] += infos[key].numel
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
    for module, matrix in gram.items():
        if module:
            gram[""] += matrix
    numel[""] = sum(numel.values())
    if base is not None and not torch.isfinite(gram[""][anchor, anchor]):
        raise NonFiniteError(f"{base.name}: the base holds NaN or Inf weights; task vectors cannot be measured "
                             f"from it")
    return _finish(gram, numel, anchor, base is not None, identical, readers)


def _finish(gram: dict[str, torch.Tensor], numel: dict[str, int], anchor: int, has_base: bool,
            identical: set[tuple[int, int]], readers: Sequence[CheckpointReader]) -> GramStats:
    """From the anchor-row Grams to the task vectors' Grams, ‖θᵢ‖² and ‖θ_base‖²."""
    n = len(readers)
    whole = gram[""]
    anchor_sq, cross = whole[anchor, anchor], whole[anchor].clone()
    cross[anchor] = 0.0
    diffs = whole.diagonal().clone()
    diffs[anchor] = 0.0
    raw_sq = (diffs + 2 * cross + anchor_sq)[:n]
    _check_finite(raw_sq, diffs, readers)  # before centring spreads one input's NaN over every row
    out = {}
    for module, matrix in gram.items():
        task = matrix.clone()
        task[anchor, :] = 0.0
        task[:, anchor] = 0.0
        out[module] = task[:n, :n] if has_base else centre(task)
    same = torch.eye(n, dtype=torch.bool)
    for i, j in identical:
        same[i, j] = same[j, i] = True
    return GramStats(out, raw_sq, same, not has_base, numel, float(anchor_sq) if has_base else None)


def centre(gram: torch.Tensor) -> torch.Tensor:
    """The Gram of the rows minus their mean: C G C with C = I − (1/N)·11ᵀ."""
    n = gram.shape[0]
    c = torch.eye(n, dtype=gram.dtype) - 1.0 / n
    return c @ gram @ c


def _read(reader: CheckpointReader, key: str, start: int, stop: int) -> torch.Tensor:
    if (stop - start) * reader.info(key).dtype.itemsize >= MAP_MIN_BYTES:
        mapped = reader.map_flat(key, start, stop)
        if mapped is not None:
            return mapped
    return reader.read_flat(key, start, stop)


def _read_all(sources: Sequence[CheckpointReader], key: str, start: int, stop: int) -> list[torch.Tensor]:
    return [_read(source, key, start, stop) for source in sources]


def _fill(block: torch.Tensor, raw: list[torch.Tensor], anchor: int, identical: set[tuple[int, int]]) -> None:
    """The anchor's row holds its chunk as is, every other row its difference from the anchor (converted and
    subtracted in one pass). Clears ``identical`` for input pairs whose raw values differ."""
    block[anchor].copy_(raw[anchor])
    for i, chunk in enumerate(raw):
        if i != anchor:
            if chunk.dtype.itemsize == 1:  # float8 has no type promotion to float64
                chunk = chunk.to(torch.float64)
            torch.sub(chunk, block[anchor], out=block[i])
    for i, j in list(identical):  # pairs still bit-identical: after the first chunk, usually none
        if not (raw[i].dtype == raw[j].dtype and torch.equal(raw[i], raw[j])):
            identical.discard((i, j))


def _check_finite(raw_sq: torch.Tensor, diffs: torch.Tensor, readers: Sequence[CheckpointReader]) -> None:
    for i, reader in enumerate(readers):
        if not (torch.isfinite(raw_sq[i]) and torch.isfinite(diffs[i])):
            raise NonFiniteError(f"{reader.name}: holds NaN or Inf weights; the doctor cannot compare it (and no "
                                 f"soup can use it)")
