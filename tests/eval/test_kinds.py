"""Every evaluator kind (model and data adapters), from the registries: the invariants each gets for free, that
kinds are found by dropping a file in their package or through an entry point, and that docs/kinds.md is the
generated table."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from soupkit.errors import RecipeError
from soupkit.eval.registry import Adapter, AdapterRegistry, data, kinds_markdown, models

REGISTRIES = {"model": models, "data": data}
KINDS = [(family, adapter.kind) for family, registry in REGISTRIES.items() for adapter in registry]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "kinds.md"


def _adapter(family: str, kind: str) -> Adapter:
    return REGISTRIES[family].get(kind)


def test_every_module_of_the_kind_packages_registers_a_kind() -> None:
    """Kinds are found as methods are: each file of soupkit/eval/models and soupkit/eval/data is imported, and
    each defines at least one kind (a helper module would belong elsewhere)."""
    for family, registry in REGISTRIES.items():
        package = importlib.import_module(f"soupkit.eval.{'models' if family == 'model' else 'data'}")
        modules = {f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)}
        owners = {registry.owner(name) for name in registry.names()}
        assert modules <= set(sys.modules), modules - set(sys.modules)
        assert modules <= owners, f"modules that register no {registry.what}: {sorted(modules - owners)}"


@pytest.mark.parametrize(("family", "kind"), KINDS)
def test_kind_is_described_and_its_signature_is_the_schema(family: str, kind: str) -> None:
    adapter = _adapter(family, kind)
    assert adapter.description, f"{kind}: the adapter's docstring is its description in docs/kinds.md"
    params = inspect.signature(adapter.fn).parameters
    assert "context" in params and params["context"].kind is inspect.Parameter.KEYWORD_ONLY, kind
    recipe_keys = [n for n, p in params.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert adapter.fields == recipe_keys


@pytest.mark.parametrize(("family", "kind"), KINDS)
def test_misspelt_and_missing_keys_are_one_line_errors_naming_the_field(family: str, kind: str,
                                                                        tmp_path: Path) -> None:
    registry, adapter = REGISTRIES[family], _adapter(family, kind)
    with pytest.raises(RecipeError) as caught:
        registry.validate(kind, {"colour": 1}, where="r.yaml: model", folder=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("r.yaml: model"), message
    required = [n for n, f in adapter.schema.model_fields.items() if f.is_required()]
    if required:  # the first problem pydantic reports is either the extra key or a missing one, both named
        assert "unknown key 'colour'" in message or "missing required key" in message, message
    else:
        assert "unknown key 'colour'" in message and "Allowed: kind" in message, message


@pytest.mark.parametrize(("family", "kind"), KINDS)
def test_path_keys_resolve_against_the_recipe_folder(family: str, kind: str, tmp_path: Path) -> None:
    adapter = _adapter(family, kind)
    fields = adapter.schema.model_fields
    values = {n: ("file.bin" if n in adapter.path_fields else _sample(f.annotation))
              for n, f in fields.items() if f.is_required() or n in adapter.path_fields}
    try:
        resolved = REGISTRIES[family].validate(kind, values, where="r", folder=tmp_path)
    except RecipeError as err:  # a required key whose sample value the kind refuses: nothing to check here
        pytest.skip(f"no sample value for {kind}: {err}")
    for name in adapter.path_fields:
        assert resolved[name] == tmp_path / "file.bin", (kind, name)


def _sample(annotation: object) -> object:
    text = str(annotation)
    if "Literal" in text:
        return text.split("[", 1)[1].split(",")[0].strip(" '\"]")
    return 1 if "int" in text and "str" not in text else "x"


def test_unknown_kind_lists_every_kind() -> None:
    with pytest.raises(RecipeError) as caught:
        models.get("timmm", "r.yaml: model.kind: ")
    message = str(caught.value)
    assert "'timm'" in message and all(name in message for name in models.names()), message


def test_a_kind_from_an_entry_point_registers_and_a_duplicate_is_refused(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin package's entry point names a module; importing it registers the kind (a fresh registry, so the
    real ones are untouched)."""
    import soupkit.registry as registry_module

    registry = AdapterRegistry("model kind", "soupkit.errors", "soupkit.test-models")
    (tmp_path / "soupkit_plugin_kind.py").write_text(
        "from soupkit.eval import registry\n"
        "@registry.PLUGIN_REGISTRY.register('toy')\n"
        "def toy(width: int = 3, *, context):\n"
        "    'A toy model kind from a plugin.'\n"
        "    return width\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(importlib.import_module("soupkit.eval.registry"), "PLUGIN_REGISTRY", registry,
                        raising=False)
    point = SimpleNamespace(name="toy", value="soupkit_plugin_kind",
                            load=lambda: importlib.import_module("soupkit_plugin_kind"))
    monkeypatch.setattr(registry_module, "load_plugins",
                        lambda group, what: [p.name for p in [point] if p.load()])
    assert registry.names() == ["toy"]
    assert registry.validate("toy", {}, where="r", folder=tmp_path) == {"width": 3}
    with pytest.raises(ValueError, match="already registered"):
        registry.register("toy")(lambda *, context: None)


def test_docs_kinds_md_is_the_generated_table() -> None:
    assert DOCS.read_text() == kinds_markdown(), (
        "docs/kinds.md is stale: run `python -m soupkit.eval.registry > docs/kinds.md`")
    for _, kind in KINDS:
        assert f"| `{kind}` |" in DOCS.read_text()
