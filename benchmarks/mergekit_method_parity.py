"""soupkit's mergekit methods against mergekit's own code, tensor by tensor (a check run by hand; the golden files
under tests/ are what CI compares with).

Imports mergekit's merge-method classes from an unpacked wheel or checkout (they need only torch and pydantic, so
mergekit's own dependencies need not be installed), calls each method's ``merge_group`` on random tensors of a
matrix, a vector and a 3-D shape, and prints the largest relative difference from ``soupkit.merge`` with the
translated parameters. Deterministic methods must agree to fp32 rounding; DELLA's random masks differ (mergekit
draws from torch's global RNG, soupkit from a seeded hash), so it is compared at density 1 exactly and as a mean
over many draws otherwise. Exit code 1 when a deterministic method differs by more than 1e-5.

    pip download mergekit==0.1.5 --no-deps -d /tmp/mk && unzip -q /tmp/mk/mergekit-*.whl -d /tmp/mk/src
    python benchmarks/mergekit_method_parity.py --mergekit-src /tmp/mk/src [--draws 300]

Measured (mergekit 0.1.5, 2026-12-03): every deterministic case <= 4e-7 (most bit-identical); della_linear's
mean over 300 draws within 1.8% of mergekit's mean (sampling noise).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

SHAPES = {"w": (12, 10), "b": (10,), "c": (4, 3, 5)}
W, D, G = [1.0, 0.5, 2.0], [0.7, 0.5, 0.9], [0.05, 0.1, 0.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-src", required=True, help="folder holding the mergekit package")
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args()
    sys.path.insert(0, args.mergekit_src)
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup

    import soupkit

    torch.manual_seed(0)
    base = {k: torch.randn(s) for k, s in SHAPES.items()}
    models = [{k: base[k] + 0.3 * torch.randn(s) + 0.1 for k, s in SHAPES.items()} for _ in range(3)]

    def group(key: str, n: int, with_base: bool) -> Any:
        entries = [TensorEntry(f"m{i}", models[i][key]) for i in range(n)]
        return TensorGroup(tuple(([TensorEntry("base", base[key], is_base=True)] if with_base else []) + entries))

    def per(values: list[float], n: int) -> Any:
        return PerInputValues([(f"m{i}", v) for i, v in enumerate(values[:n])])

    def gta(normalize: bool, rescale: bool, scaling: float = 1.0, **per_model: Any) -> dict[str, Any]:
        return {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": scaling, **per_model}

    cases = [
        ("breadcrumbs", gta(False, False, weight=per(W, 3), density=per(D, 3), gamma=per(G, 3)),
         {"weights": W, "density": D, "gamma": G}, 3, True),
        ("breadcrumbs", gta(True, True, 0.7, weight=per(W, 3), density=per(D, 3), gamma=per(G, 3)),
         {"weights": W, "density": D, "gamma": G, "normalize": True, "rescale": True, "scaling": 0.7}, 3, True),
        ("breadcrumbs_ties", gta(False, False, weight=per(W, 3), density=per(D, 3), gamma=per(G, 3)),
         {"weights": W, "density": D, "gamma": G}, 3, True),
        ("breadcrumbs_ties", gta(True, True, 1.3, weight=per(W, 3), density=per(D, 3), gamma=per(G, 3)),
         {"weights": W, "density": D, "gamma": G, "normalize": True, "rescale": True, "scaling": 1.3}, 3, True),
        ("della", gta(True, True, weight=per(W, 3), density=per([1.0] * 3, 3), epsilon=per([0.1] * 3, 3)),
         {"weights": W, "density": 1.0, "epsilon": 0.1}, 3, True),
        ("della_linear", gta(False, True, weight=per(W, 3), density=per([1.0] * 3, 3), epsilon=per([0.1] * 3, 3)),
         {"weights": W, "density": 1.0, "epsilon": 0.1}, 3, True),
        ("sce", {"int8_mask": False, "select_topk": 1.0}, {}, 3, True),
        ("sce", {"int8_mask": False, "select_topk": 0.3}, {"select_topk": 0.3}, 3, True),
        ("nuslerp", {"weight": per([0.3, 0.7], 2), "nuslerp_row_wise": False, "nuslerp_flatten": True},
         {"weights": [0.3, 0.7]}, 2, False),
        ("nuslerp", {"weight": per([0.3, 0.7], 2), "nuslerp_row_wise": False, "nuslerp_flatten": False},
         {"weights": [0.3, 0.7], "nuslerp_flatten": False}, 2, False),
        ("nuslerp", {"weight": per([0.3, 0.7], 2), "nuslerp_row_wise": True, "nuslerp_flatten": False},
         {"weights": [0.3, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, False),
        ("nuslerp", {"weight": per([0.3, 0.7], 2), "nuslerp_row_wise": False, "nuslerp_flatten": True},
         {"weights": [0.3, 0.7]}, 2, True),
        ("multislerp", {"weight": per(W, 3), "normalize_weights": True, "eps": 1e-8}, {"weights": W}, 3, False),
        ("multislerp", {"weight": per(W, 3), "normalize_weights": True, "eps": 1e-8}, {"weights": W}, 3, True),
        ("multislerp", {"weight": per(W, 3), "normalize_weights": False, "eps": 1e-8},
         {"weights": W, "normalize_weights": False}, 3, False),
        ("karcher", {"max_iter": 10, "tol": 1e-5}, {}, 3, False),
        ("karcher", {"max_iter": 3, "tol": 1e-5}, {"max_iter": 3}, 3, False),
        ("nearswap", {"t": 0.2}, {"t": 0.2}, 1, True),
        ("arcee_fusion", {}, {}, 1, True),
    ]
    failed = False
    for name, mk_params, sk_params, n, with_base in cases:
        ours = soupkit.merge(models[:n], name, base=base if with_base else None, **sk_params)
        worst = 0.0
        for key in SHAPES:
            theirs = registry.get(name).merge_group(group(key, n, with_base), **mk_params)
            worst = max(worst, float((theirs - ours[key]).abs().max() / (theirs.abs().max() + 1e-12)))
        failed |= worst > 1e-5
        print(f"{name:<17} base={'yes' if with_base else 'no ':<4} {sk_params}: max relative difference {worst:.1e}")
    della = registry.get("della_linear")
    params = gta(False, True, weight=per(W, 3), density=per(D, 3), epsilon=per([0.08] * 3, 3))
    theirs = sum(della.merge_group(group("w", 3, True), **params) for _ in range(args.draws)) / args.draws
    ours = sum(soupkit.merge(models, "della_linear", base=base, weights=W, density=D, epsilon=0.08, seed=s)["w"]
               for s in range(args.draws)) / args.draws
    gap = float((theirs - ours).norm() / theirs.norm())
    print(f"della_linear mean of {args.draws} draws: relative difference {gap:.3f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
