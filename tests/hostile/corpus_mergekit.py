"""Bad mergekit configs (issue 21; issue 26 class 10) and bad extract-lora calls: every number finite and in its
range, every layer range inside its model, every unsupported field named. Registered into ``corpus.CASES``
(imported at the end of ``corpus.py``), so each gets exit 2, one line naming the file and the field, no output,
inputs unchanged.

``.nan`` once merged silently as density 1 (``min(1, nan)`` is 1); a NaN or infinity anywhere -- a model's
parameter, a global one, a gradient's endpoint, a filter's value, a slice's -- is now refused where it is written,
whether or not a tensor uses it.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.hostile.corpus import Expect, Workspace
from tests.hostile.corpus import case as register

#: every case this module adds
MERGEKIT: list[str] = []


def case(name: str) -> Callable[[Callable[[Workspace], Expect]], Callable[[Workspace], Expect]]:
    MERGEKIT.append(name)
    return register(name)


def _config(w: Workspace, body: str, *needles: str) -> Expect:
    """A mergekit config over three small checkpoints (base, a, b); the error must name the config, then
    ``needles`` (the field and the problem)."""
    for seed, name in enumerate(("base", "a", "b")):
        w.good(f"{name}.safetensors", seed)
    config = w.root / "mergekit.yaml"
    config.write_text(body)
    return Expect(["merge", "--config", str(config), "-o", w.out], (str(config), *needles), w.canary)


TIES = ("merge_method: ties\nbase_model: base.safetensors\nmodels:\n"
        "  - model: a.safetensors\n    parameters: {{weight: {w}, density: {d}}}\n"
        "  - model: b.safetensors\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        "parameters: {{lambda: {lam}}}\n")


@case("mergekit density .nan (once merged as density 1)")
def _density_nan(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=1.0, d=".nan", lam=1.0), "models[0].parameters.density",
                   "must be a finite number, got nan")


@case("mergekit weight .inf")
def _weight_inf(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=".inf", d=0.5, lam=1.0), "models[0].parameters.weight",
                   "must be a finite number, got inf")


@case("mergekit global lambda -.inf")
def _lambda_inf(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=1.0, d=0.5, lam="-.inf"), "parameters.lambda",
                   "must be a finite number, got -inf")


@case("mergekit density gradient with a NaN endpoint")
def _gradient_nan(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=1.0, d="[0.2, .nan, 0.9]", lam=1.0), "models[0].parameters.density[1]",
                   "must be a finite number, got nan")


@case("mergekit filter value NaN")
def _filter_nan(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=1.0, d="[{filter: mlp, value: .nan}, {value: 0.5}]", lam=1.0),
                   "models[0].parameters.density[0].value", "must be a finite number, got nan")


@case("mergekit NaN spelt as text")
def _text_nan(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=1.0, d="'nan'", lam=1.0), "models[0].parameters.density",
                   "must be a finite number, got 'nan'")


@case("mergekit density 0")
def _density_zero(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=1.0, d=0, lam=1.0), "models[0].parameters.density", "must be > 0")


@case("mergekit negative density")
def _density_negative(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=1.0, d=-0.5, lam=1.0), "models[0].parameters.density", "must be > 0")


@case("mergekit weight that is not a number")
def _weight_text(w: Workspace) -> Expect:
    return _config(w, TIES.format(w="heavy", d=0.5, lam=1.0), "models[0].parameters.weight",
                   "must be a number, got 'heavy'")


@case("mergekit slerp t NaN in a slice")
def _slice_t_nan(w: Workspace) -> Expect:
    return _config(w, "merge_method: slerp\nbase_model: a.safetensors\nslices:\n  - sources:\n"
                      "      - {model: a.safetensors, layer_range: [0, 1]}\n"
                      "      - {model: b.safetensors, layer_range: [0, 1]}\n    parameters: {t: .nan}\n",
                   "slices[0].parameters.t", "must be a finite number, got nan")


@case("mergekit passthrough scale inf per source")
def _scale_inf(w: Workspace) -> Expect:
    return _config(w, "merge_method: passthrough\nmodels:\n  - model: a.safetensors\n    parameters: {scale: .inf}\n",
                   "models[0].parameters.scale", "must be a finite number, got inf")


@case("mergekit layer_range reversed")
def _range_reversed(w: Workspace) -> Expect:
    return _config(w, "merge_method: passthrough\nslices:\n  - sources:\n"
                      "      - {model: a.safetensors, layer_range: [1, 0]}\n",
                   "slices[0].sources[0].layer_range", "needs 0 <= start < stop")


@case("mergekit layer_range of fractions")
def _range_fraction(w: Workspace) -> Expect:
    return _config(w, "merge_method: passthrough\nslices:\n  - sources:\n"
                      "      - {model: a.safetensors, layer_range: [0, 0.5]}\n",
                   "slices[0].sources[0].layer_range", "two whole numbers")


@case("mergekit karcher max_iter not whole")
def _max_iter(w: Workspace) -> Expect:
    return _config(w, "merge_method: karcher\nmodels:\n  - model: a.safetensors\n  - model: b.safetensors\n"
                      "parameters: {max_iter: 2.5}\n", "parameters.max_iter", "must be a whole number, got 2.5")


@case("mergekit unsupported slice field residual_weight")
def _residual(w: Workspace) -> Expect:
    return _config(w, "merge_method: passthrough\nslices:\n  - sources:\n"
                      "      - {model: a.safetensors, layer_range: [0, 1]}\n    residual_weight: 0.5\n",
                   "slices[0].residual_weight", "not supported")


@case("mergekit unsupported field modules")
def _modules(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=1.0, d=0.5, lam=1.0) + "modules: {text: {models: []}}\n", "modules",
                   "multi-module merges are not supported")


@case("mergekit unsupported top-level field")
def _unknown(w: Workspace) -> Expect:
    return _config(w, TIES.format(w=1.0, d=0.5, lam=1.0) + "tokenizr_source: base\n", "tokenizr_source",
                   "unknown mergekit field")


# ------------------------------------------------------------------------------------------ extract-lora


def _extract(w: Workspace, tuned: dict | None, *args: str, out: str | None = None) -> tuple[list[str], str]:
    base = w.good("base.safetensors", 0)
    ft = w.good("ft.safetensors", 1, state=tuned)
    return ["extract-lora", str(ft), str(base), *args, "-o", out or str(w.root / "adapter")], str(ft)


@case("extract-lora rank 0")
def _extract_rank(w: Workspace) -> Expect:
    argv, _ = _extract(w, None, "--rank", "0")
    return Expect(argv, ("--rank must be a positive integer, got 0",), w.canary)


@case("extract-lora of models with different shapes")
def _extract_shapes(w: Workspace) -> Expect:
    from tests.hostile.corpus import small_state

    state = small_state(1)
    state["layer.weight"] = state["layer.weight"][:2]
    argv, _ = _extract(w, state, "--rank", "2")
    return Expect(argv, ("shape mismatch at 'layer.weight'",), w.canary)


@case("extract-lora of a fine-tune equal to its base")
def _extract_same(w: Workspace) -> Expect:
    from tests.hostile.corpus import small_state

    argv, ft = _extract(w, small_state(0), "--rank", "2")
    return Expect(argv, (ft, "no tensor differs"), w.canary)


@case("extract-lora into an existing file")
def _extract_file(w: Workspace) -> Expect:
    taken = w.write("taken", b"not a folder")
    argv, _ = _extract(w, None, "--rank", "2", out=str(taken))
    return Expect(argv, (str(taken), "this path is a file"), w.canary)
