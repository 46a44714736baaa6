"""Golden outputs from real mergekit, for tests/merging/methods/test_mergekit_golden.py.

Run by hand, with mergekit in its own venv (never soupkit's: mergekit pins its own transformers and peft)::

    python3.11 -m venv /work/mkvenv
    /work/mkvenv/bin/pip install torch==2.14.1 mergekit==0.1.5
    /work/mkvenv/bin/python benchmarks/mergekit_golden.py            # every config (~2 minutes on 2 CPUs)
    /work/mkvenv/bin/python benchmarks/mergekit_golden.py ties_readme  # some of them

It builds the tiny Llama / Mistral / GPT-2 folders of ``tests/golden/models.py`` (seeded, bit-identical in either
venv), runs mergekit on every config below on the CPU with ``dtype`` and ``out_dtype`` float32 through
``mergekit.merge.run_merge`` (the one library call ``mergekit-yaml`` makes: same config model, same options, one
process instead of one interpreter start per config) and writes ``tests/golden/mergekit/NAME.json``: the config
template (``@llama_ft1`` stands for that model's folder), mergekit's version, the output's ``config.json`` layer
count and a fingerprint of every output tensor (``models.fingerprint``: shape, sha256, sum, norm, a random
projection, 16 sampled values) -- a few KB per config, never the weights.

``kind`` says how the test compares: ``exact`` to fp32 rounding; ``bits`` bit for bit (passthrough and slices
only copy); ``expectation`` for DARE at density < 1 (mergekit draws its masks from torch's global RNG, soupkit
from its own seeded generator, so single runs differ: the test checks the mean over seeds against mergekit's
density-1 output, the expectation of ``dare_linear``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "mergekit"
sys.path.insert(0, str(ROOT))  # run from anywhere, with mergekit's venv

from tests.golden.models import build_models, fingerprint, substitute  # noqa: E402


def _models(base: str | None, *entries: tuple[str, dict | None]) -> dict:
    config: dict = {"models": [{"model": f"@{m}", **({"parameters": p} if p else {})} for m, p in entries]}
    if base:
        config["base_model"] = f"@{base}"
    return config


def _cfg(method: str, body: dict, parameters: dict | None = None, kind: str = "exact", **extra) -> dict:
    config = {"merge_method": method, **body, **extra, "dtype": "float32", "out_dtype": "float32"}
    if parameters:
        config["parameters"] = parameters
    return {"kind": kind, "config": config}


L, M, G = "llama", "mistral", "gpt2"
ATTN_MLP = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5}]

CONFIGS: dict[str, dict] = {
    # ---- linear: weights, normalize both ways, gradients, filters, the base among the models
    "linear_weights": _cfg("linear", _models(None, (f"{L}_ft1", {"weight": 0.7}), (f"{L}_ft2", {"weight": 0.2}))),
    "linear_no_normalize": _cfg("linear", _models(None, (f"{M}_ft1", {"weight": 0.7}), (f"{M}_ft2", {"weight": 0.2})),
                                {"normalize": False}),
    "linear_gradient2_per_model": _cfg("linear", _models(None, (f"{L}_ft1", {"weight": [1, 0]}),
                                                         (f"{L}_ft2", {"weight": [0, 1]}))),
    "linear_filter_gpt2": _cfg("linear", _models(None, (f"{G}_ft1", {"weight": [{"filter": "attn", "value": 0.9},
                                                                               {"value": 0.3}]}),
                                                 (f"{G}_ft2", {"weight": 0.5}), (f"{G}_ft3", {"weight": 0.2}))),
    # ---- task_arithmetic: lambda, normalize, a global gradient of 3
    "task_arithmetic_lambda": _cfg("task_arithmetic", _models(f"{L}_base", (f"{L}_ft1", {"weight": 1.0}),
                                                              (f"{L}_ft2", {"weight": 0.5})), {"lambda": 0.8}),
    "task_arithmetic_normalize": _cfg("task_arithmetic", _models(f"{M}_base", (f"{M}_ft1", {"weight": 0.6}),
                                                                 (f"{M}_ft2", {"weight": 0.9})), {"normalize": True}),
    "task_arithmetic_gradient3": _cfg("task_arithmetic", _models(f"{L}_base", (f"{L}_ft1", None), (f"{L}_ft2", None)),
                                      {"weight": [0.2, 1.0, 0.4]}),
    "task_arithmetic_gpt2": _cfg("task_arithmetic", _models(f"{G}_base", (f"{G}_ft1", {"weight": 0.5}),
                                                            (f"{G}_ft2", {"weight": 0.5}), (f"{G}_ft3", {"weight": 1})),
                                 {"lambda": 1.5}),
    # ---- ties: the README's example, normalize off, filters, int8_mask, rescale, gradients of 4 and 5
    "ties_readme": _cfg("ties", _models(f"{L}_base", (f"{L}_ft1", {"weight": 1.0, "density": [1, 0.7, 0.1]}),
                                        (f"{L}_ft2", {"weight": 0.5, "density": 0.5})),
                        {"normalize": True, "int8_mask": True}),
    "ties_no_normalize": _cfg("ties", _models(f"{L}_base", (f"{L}_ft1", {"weight": 0.5, "density": 0.3}),
                                              (f"{L}_ft2", {"weight": 0.5, "density": 0.6})), {"normalize": False}),
    "ties_filters": _cfg("ties", _models(f"{M}_base", (f"{M}_ft1", {"weight": 1.0}), (f"{M}_ft2", {"weight": 0.8}),
                                         (f"{M}_ft3", {"weight": 0.5})),
                         {"density": [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.7},
                                      {"value": 0.5}]}),
    "ties_rescale": _cfg("ties", _models(f"{L}_base", (f"{L}_ft1", {"weight": 1.0, "density": 0.4}),
                                         (f"{L}_ft2", {"weight": 1.0, "density": 0.6})), {"rescale": True}),
    "ties_gradient4": _cfg("ties", _models(f"{L}_base", (f"{L}_ft1", {"weight": 1.0}), (f"{L}_ft2", {"weight": 0.7})),
                           {"density": [0.2, 0.4, 0.6, 0.8], "lambda": 1.2}),
    "ties_gradient5_per_model": _cfg("ties", _models(f"{L}_base",
                                                     (f"{L}_ft1", {"weight": [1, 0.5, 1, 0.5, 1],
                                                                   "density": [0.1, 0.3, 0.5, 0.7, 0.9]}),
                                                     (f"{L}_ft2", {"weight": 0.6, "density": [0.9, 0.2]}))),
    "ties_gpt2": _cfg("ties", _models(f"{G}_base", (f"{G}_ft1", {"weight": 1, "density": 0.5}),
                                      (f"{G}_ft3", {"weight": 1, "density": 0.5}))),
    "ties_gradient1": _cfg("ties", _models(f"{M}_base", (f"{M}_ft1", {"weight": [0.9], "density": [0.4]}),
                                           (f"{M}_ft2", {"weight": 0.4, "density": 0.8}))),
    # ---- DARE: exact at density 1; expectation below
    "dare_ties_density1": _cfg("dare_ties", _models(f"{L}_base", (f"{L}_ft1", {"weight": 1.0, "density": 1.0}),
                                                    (f"{L}_ft2", {"weight": 0.5, "density": 1.0}))),
    "dare_linear_density1_normalize": _cfg("dare_linear", _models(f"{M}_base", (f"{M}_ft1", {"weight": 0.3}),
                                                                  (f"{M}_ft2", {"weight": 0.6})),
                                           {"normalize": True, "lambda": 0.5}),
    "dare_linear_expectation": _cfg("dare_linear", _models(f"{L}_base", (f"{L}_ft1", {"weight": 0.5, "density": 0.5}),
                                                           (f"{L}_ft2", {"weight": 0.5, "density": 0.5})),
                                    kind="expectation"),
    # ---- slerp: t per filter with gradients, t outside [0, 1], a sparse task vector
    "slerp_t": _cfg("slerp", _models(f"{L}_base", (f"{L}_base", None), (f"{L}_ft1", None)), {"t": 0.3}),
    "slerp_readme_filters": _cfg("slerp", _models(f"{M}_ft1", (f"{M}_ft1", None), (f"{M}_ft2", None)), {"t": ATTN_MLP}),
    "slerp_t_above_1": _cfg("slerp", _models(f"{L}_ft1", (f"{L}_ft1", None), (f"{L}_ft2", None)), {"t": 1.3}),
    "slerp_t_below_0": _cfg("slerp", _models(f"{G}_ft1", (f"{G}_ft1", None), (f"{G}_ft2", None)), {"t": -0.2}),
    "slerp_sparse_gpt2": _cfg("slerp", _models(f"{G}_base", (f"{G}_base", None), (f"{G}_ft3", None)),
                              {"t": [0.1, 0.9]}),
    # ---- model_stock
    "model_stock_llama": _cfg("model_stock", _models(f"{L}_base", (f"{L}_ft1", None), (f"{L}_ft2", None),
                                                     (f"{L}_ft3", None))),
    "model_stock_gpt2": _cfg("model_stock", _models(f"{G}_base", (f"{G}_ft1", None), (f"{G}_ft2", None))),
    # ---- passthrough and slices (frankenmerges)
    "passthrough_scale": _cfg("passthrough", _models(None, (f"{L}_ft1", {"scale": [{"filter": "o_proj", "value": 0.5},
                                                                                   {"value": 1.0}]})), kind="bits"),
    "slices_stack": _cfg("passthrough", {"slices": [
        {"sources": [{"model": f"@{L}_ft1", "layer_range": [0, 4]}]},
        {"sources": [{"model": f"@{L}_ft2", "layer_range": [2, 6]}]}]}, kind="bits"),
    "slices_interleave": _cfg("passthrough", {"slices": [
        {"sources": [{"model": f"@{M}_ft1", "layer_range": [0, 2]}]},
        {"sources": [{"model": f"@{M}_ft2", "layer_range": [1, 3]}]},
        {"sources": [{"model": f"@{M}_ft1", "layer_range": [3, 6]}]}]}, kind="bits"),
    "slices_gpt2_repeat": _cfg("passthrough", {"slices": [
        {"sources": [{"model": f"@{G}_ft1", "layer_range": [0, 3]}]},
        {"sources": [{"model": f"@{G}_ft1", "layer_range": [1, 6]}]}]}, kind="bits"),
    "slices_linear": _cfg("linear", {"slices": [
        {"sources": [{"model": f"@{L}_ft1", "layer_range": [0, 3], "parameters": {"weight": [1, 0]}},
                     {"model": f"@{L}_ft2", "layer_range": [0, 3], "parameters": {"weight": [0, 1]}}]},
        {"sources": [{"model": f"@{L}_ft2", "layer_range": [3, 6], "parameters": {"weight": 0.3}},
                     {"model": f"@{L}_ft3", "layer_range": [2, 5], "parameters": {"weight": 0.7}}]}]}),
    "slices_ties_base": _cfg("ties", {"slices": [
        {"sources": [{"model": f"@{L}_base", "layer_range": [0, 6]}, {"model": f"@{L}_ft1", "layer_range": [0, 6]},
                     {"model": f"@{L}_ft2", "layer_range": [0, 6]}],
         "parameters": {"density": [0.3, 0.9]}}], "base_model": f"@{L}_base"}, {"weight": 1.0}),
    "slices_slerp_stack": _cfg("slerp", {"slices": [
        {"sources": [{"model": f"@{M}_ft1", "layer_range": [0, 4]}, {"model": f"@{M}_ft2", "layer_range": [0, 4]}],
         "parameters": {"t": [0, 1]}},
        {"sources": [{"model": f"@{M}_ft1", "layer_range": [2, 6]}, {"model": f"@{M}_ft2", "layer_range": [2, 6]}],
         "parameters": {"t": 0.5}}], "base_model": f"@{M}_ft1"}),
    # ---- methods the mkmethods branch adds
    "breadcrumbs": _cfg("breadcrumbs", _models(f"{L}_base",
                                               (f"{L}_ft1", {"weight": 1.0, "density": 0.8, "gamma": 0.05}),
                                               (f"{L}_ft2", {"weight": 0.5, "density": 0.6}))),
    "breadcrumbs_ties": _cfg("breadcrumbs_ties", _models(f"{M}_base", (f"{M}_ft1", {"weight": 1.0, "density": 0.7}),
                                                         (f"{M}_ft2", {"weight": 0.8, "density": 0.5, "gamma": 0.1})),
                             {"normalize": True}),
    "della_density1": _cfg("della", _models(f"{L}_base", (f"{L}_ft1", {"weight": 1.0, "density": 1.0}),
                                            (f"{L}_ft2", {"weight": 0.5, "density": 1.0})), {"lambda": 0.9}),
    "della_linear_density1": _cfg("della_linear", _models(f"{G}_base", (f"{G}_ft1", {"weight": 0.6, "density": 1.0}),
                                                          (f"{G}_ft2", {"weight": 0.4, "density": 1.0}))),
    "sce": _cfg("sce", _models(f"{L}_base", (f"{L}_ft1", None), (f"{L}_ft2", None), (f"{L}_ft3", None)),
                {"select_topk": 0.5}),
    "sce_all": _cfg("sce", _models(f"{M}_base", (f"{M}_ft1", None), (f"{M}_ft2", None))),
    "nuslerp_base": _cfg("nuslerp", _models(f"{L}_base", (f"{L}_ft1", {"weight": 0.3}), (f"{L}_ft2", {"weight": 0.7}))),
    "nuslerp_rowwise": _cfg("nuslerp", _models(None, (f"{M}_ft1", {"weight": 1.0}), (f"{M}_ft2", {"weight": 2.0})),
                            {"nuslerp_row_wise": True, "nuslerp_flatten": False}),
    "multislerp": _cfg("multislerp", _models(None, (f"{L}_ft1", {"weight": 1.0}), (f"{L}_ft2", {"weight": 0.5}),
                                             (f"{L}_ft3", {"weight": 0.5}))),
    "multislerp_base": _cfg("multislerp", _models(f"{G}_base", (f"{G}_ft1", {"weight": 0.5}),
                                                  (f"{G}_ft2", {"weight": 0.5}))),
    "karcher": _cfg("karcher", _models(None, (f"{L}_ft1", None), (f"{L}_ft2", None), (f"{L}_ft3", None))),
    "nearswap": _cfg("nearswap", _models(f"{L}_base", (f"{L}_base", None), (f"{L}_ft1", None)), {"t": 0.03}),
    "arcee_fusion": _cfg("arcee_fusion", _models(f"{M}_base", (f"{M}_base", None), (f"{M}_ft1", None))),
}


def _run(name: str, entry: dict, paths: dict[str, Path], work: Path) -> dict:
    from importlib.metadata import version

    import mergekit
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    out = work / name
    config = MergeConfiguration.model_validate(substitute(entry["config"], paths))
    torch.manual_seed(0)
    run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, random_seed=0, quiet=True,
                                                     write_model_card=False))
    tensors: dict = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(file))
    layers = json.loads((out / "config.json").read_text())
    key = "n_layer" if "n_layer" in layers else "num_hidden_layers"
    del mergekit
    return {"name": name, **entry, "mergekit": version("mergekit"), "num_layers": layers[key],
            "tensors": {k: fingerprint(v) for k, v in sorted(tensors.items())}}


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; available: {', '.join(CONFIGS)}")
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp) / "models")
        for name in names or list(CONFIGS):
            try:
                golden = _run(name, CONFIGS[name], paths, Path(tmp))
            except Exception as error:
                print(f"{name}: mergekit failed: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            (GOLDEN / f"{name}.json").write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
            print(f"{name}: {len(golden['tensors'])} tensors, {golden['num_layers']} layers")


if __name__ == "__main__":
    main(sys.argv[1:])
