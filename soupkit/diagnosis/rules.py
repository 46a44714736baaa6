"""The doctor's rules: from the Gram matrix (and, with an evaluator, the interpolation barriers) to a verdict per
ingredient and one overall. Every threshold is a named constant here, and the README states them.

Per ingredient, checked in this order (the first that applies wins):

- ``incompatible``: its keys or shapes differ from the majority's (``check_compatible``'s message says where).
- ``duplicate``: bit-identical floating tensors to an earlier input, or L2 distance ≤ ``DUPLICATE_REL`` × its
  weight norm, or cosine ≥ ``DUPLICATE_COSINE`` between the two task vectors. The later input is the duplicate.
  With a base, an ingredient whose task vector is zero (‖τ‖ ≤ ``DUPLICATE_REL`` × its weight norm: it is the base
  again, and its cosines are 0/0) is a duplicate of the base.
- ``different_init``: single-linkage grouping of the ingredients (and the base, when given) by L2 distance. An
  edge of the minimum spanning tree is cut when it is longer than ``GAP_FACTOR`` × the median edge, or longer
  than ``FAR_REL`` × the weight norm (fine-tuning moves weights by a few percent of their norm; two independent
  initialisations are ~√2 norms apart). With a base, a cut also needs the cosine test: the group's median cosine
  to the main group's task vectors below ``max(COSINE_NEAR_ZERO, ½ × the main group's own median cosine)``
  (task vectors from another initialisation are near-orthogonal to the others). The main group holds the base,
  else is the largest (ties: the best held-out score, else the earliest input); the rest are ``different_init``.
- ``different_basin`` (with an evaluator only): the held-out accuracy along the straight path from the best
  ingredient dips more than ``BARRIER_MAX`` below the line between the endpoints' accuracies.
- otherwise ``soupable``.

Overall: fewer than two soupable ingredients -> "will not soup"; any ingredient flagged other than as a
duplicate, or (with an evaluator) the uniform soup scoring below the best ingredient -> "use greedy"; otherwise
"uniform soup likely fine".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

DUPLICATE_COSINE = 0.9999
DUPLICATE_REL = 1e-6
GAP_FACTOR = 3.0
FAR_REL = 1.0
COSINE_NEAR_ZERO = 0.2
BARRIER_MAX = 0.05

VERDICTS = ("soupable", "duplicate", "different_init", "different_basin", "incompatible")
UNIFORM_FINE, USE_GREEDY, WILL_NOT_SOUP = "uniform soup likely fine", "use greedy", "will not soup"


def duplicates(distance: torch.Tensor, cosine: torch.Tensor, identical: torch.Tensor, norm: torch.Tensor
               ) -> dict[int, tuple[int, str]]:
    """Row -> (earlier row it duplicates, the numbers why) for every later copy."""
    found: dict[int, tuple[int, str]] = {}
    n = distance.shape[0]
    for j in range(n):
        for i in range(j):
            if i in found:
                continue
            d, c = float(distance[i, j]), float(cosine[i, j])
            if bool(identical[i, j]):
                found[j] = (i, "bit-identical weights")
            elif d <= DUPLICATE_REL * float(norm[j]):
                found[j] = (i, f"distance {d:.3g} (≤ {DUPLICATE_REL:g} × its norm {float(norm[j]):.4g})")
            elif math.isfinite(c) and c >= DUPLICATE_COSINE:
                found[j] = (i, f"cosine {c:.6f} ≥ {DUPLICATE_COSINE}")
            if j in found:
                break
    return found


def zero_task_vectors(task_norm: torch.Tensor, weight_norm: torch.Tensor) -> dict[int, str]:
    """Row -> why, for every ingredient whose task vector is zero (it equals the base)."""
    found = {}
    for i in range(task_norm.shape[0]):
        tau, weight = float(task_norm[i]), float(weight_norm[i])
        if tau <= DUPLICATE_REL * weight:
            found[i] = (f"of the base: its task vector is zero (‖τ‖ {tau:.3g} ≤ {DUPLICATE_REL:g} × its norm "
                        f"{weight:.4g}); it adds nothing to a soup")
    return found


def spanning_tree(distance: torch.Tensor) -> list[tuple[int, int, float]]:
    """Prim's minimum spanning tree over a full distance matrix: (inside, outside, length) edges."""
    n = distance.shape[0]
    if n < 2:
        return []
    inside, edges = {0}, []
    while len(inside) < n:
        i, j = min(((a, b) for a in inside for b in range(n) if b not in inside),
                   key=lambda e: float(distance[e[0], e[1]]))
        edges.append((i, j, float(distance[i, j])))
        inside.add(j)
    return edges


def groups(distance: torch.Tensor, norm: torch.Tensor, cosine: torch.Tensor | None, preference: Sequence[int],
           anchor: int | None = None) -> tuple[list[int], dict[int, str]]:
    """Split points into the main group and the rest by the gap rule; ``cosine`` (task vectors, rows as
    ``distance``) confirms cuts when given. The main group holds ``anchor`` (the base's row), else is the largest;
    ties go to the group holding the row earliest in ``preference``. Returns (main rows, row -> reason)."""
    edges = spanning_tree(distance)
    if not edges:
        return list(range(distance.shape[0])), {}
    median = statistics.median(length for _, _, length in edges)
    cut = []
    for i, j, length in edges:
        scale = 0.5 * (float(norm[i]) + float(norm[j]))
        if length > GAP_FACTOR * median or length > FAR_REL * scale:
            cut.append((i, j, length))
    parts = _components(distance.shape[0], [(i, j) for i, j, length in edges if (i, j, length) not in cut])
    rank = {row: position for position, row in enumerate(preference)}
    main = max(parts, key=lambda p: (anchor in p, len(p), -min(rank.get(r, len(rank)) for r in p)))
    reasons: dict[int, str] = {}
    main_cos = _median_cosine(cosine, main, main) if cosine is not None else None
    for part in parts:
        if part is main:
            continue
        gap = min(length for i, j, length in cut if (i in part) != (j in part))
        why = f"{gap:.3g} away across a gap ({gap / max(median, 1e-30):.1f}× the median link {median:.3g})"
        if cosine is not None and main_cos is not None:
            across = _median_cosine(cosine, part, main)
            bar = max(COSINE_NEAR_ZERO, 0.5 * main_cos)
            if not across < bar:
                continue  # far, but its task vector points the main group's way: same start, longer training
            why += f"; cosine {across:.2f} to the main group < {bar:.2f} (theirs {main_cos:.2f})"
        for row in part:
            reasons[row] = why
    return [r for r in range(distance.shape[0]) if r not in reasons], reasons


def _components(n: int, links: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in links:
        parent[root(i)] = root(j)
    parts: dict[int, list[int]] = {}
    for i in range(n):
        parts.setdefault(root(i), []).append(i)
    return list(parts.values())


def _median_cosine(cosine: torch.Tensor, rows: Sequence[int], cols: Sequence[int]) -> float | None:
    values = [float(cosine[i, j]) for i in rows for j in cols if i != j and math.isfinite(float(cosine[i, j]))]
    return statistics.median(values) if values else None


def barrier(line_start: float, line_end: float, path: Sequence[tuple[float, float]]) -> float:
    """The largest drop of held-out accuracy below the straight line between the endpoints' accuracies
    (0 when the path never dips below it). ``path`` holds (α, accuracy) points. Rounded to 12 decimals: accuracies
    are counts over n examples, and a float residue of 1e-16 is not a barrier."""
    drops = [(1 - a) * line_start + a * line_end - acc for a, acc in path]
    return round(max(0.0, *drops), 12)


def overall(verdicts: Sequence[str], uniform: float | None, best: float | None) -> tuple[str, str]:
    """The overall verdict and its reason."""
    soupable = verdicts.count("soupable")
    flagged = {v: verdicts.count(v) for v in VERDICTS[2:] if v in verdicts}
    listed = ", ".join(f"{count} {word}" for word, count in flagged.items())
    if soupable < 2:
        return WILL_NOT_SOUP, (f"only {soupable} of {len(verdicts)} ingredients are soupable"
                               + (f" ({listed})" if listed else "") + "; keep the best ingredient alone")
    if flagged:
        return USE_GREEDY, (f"{listed} of {len(verdicts)} would pull a uniform soup off the basin; a greedy soup "
                            f"keeps only what helps ({soupable} soupable)")
    if uniform is not None and best is not None and uniform < best:
        return USE_GREEDY, (f"the uniform soup scores {100 * uniform:.2f}% held-out, below the best ingredient's "
                            f"{100 * best:.2f}%")
    if uniform is not None and best is not None:
        return UNIFORM_FINE, (f"all {soupable} soupable ingredients share a basin and the uniform soup scores "
                              f"{100 * uniform:.2f}% held-out vs {100 * best:.2f}% for the best ingredient")
    dup = verdicts.count("duplicate")
    return UNIFORM_FINE, (f"{soupable} ingredients share one initialisation (no outliers"
                          + (f"; {dup} duplicate(s) would be weighted twice" if dup else "")
                          + "); --eval checks the basin")
