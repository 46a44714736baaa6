"""soupkit never runs code shipped with a model, a tokenizer or a config (SECURITY.md, "Foreign code").

Every loader is attacked with a folder or name whose code would write a canary file when imported: transformers
configs and tokenizers (``auto_map``, unknown classes, a symlinked config), open_clip (hub names, a Hugging Face
text tower with ``auto_map``), timm (hub names, loading kwargs). The real executable runs with ``y`` on stdin,
as the prompt an attacker relies on would be answered; each case must exit 2 with one line naming the file and
key, leave no output and no canary. One case of each kind runs the real executable (``python -m soupkit``, the
cwd on ``sys.path``); the others run the same entry point in-process with the same stdin, cwd and path, which
saves an interpreter's torch import per case. An AST check proves every ``from_pretrained`` in the package passes the
one declaration of ``trust_remote_code=False``.
"""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import snapshot
from tests.eval.text_models import POSITIVE, _tokenizer, sentiment_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]

EVIL = """import pathlib
pathlib.Path({canary!r}).write_text("foreign code ran")
from transformers import BertConfig, PreTrainedTokenizerFast
class EvilConfig(BertConfig):
    model_type = "evil"
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture(scope="module")
def clean_kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT folder that loads, a checkpoint for it and one data file."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("clean")
    folder = root / "bert"
    tok = _tokenizer(POSITIVE, bert=True)
    config = BertConfig(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    checkpoint = root / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    data = write_jsonl(root / "rows.jsonl", sentiment_rows(8, seed=1))
    return {"folder": folder, "checkpoint": checkpoint, "data": data}


def _copy_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def _recipe(tmp_path: Path, model: dict, data: Path) -> Path:
    recipe = {"model": model,
              "data": {"heldout": {"kind": "jsonl", "path": str(data), "text_field": "text", "label_field": "label"}},
              "batch_size": 4, "device": "cpu", "precision": "fp32"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_soupkit(cli, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """``soupkit ARGS`` with ``y`` on stdin for any prompt, ``cwd`` current and first on ``sys.path`` (so code
    there is importable, as under ``python -m``), no cache: through the real executable when ``real``, else
    in-process."""
    def run(*args: object, cwd: Path, real: bool = False) -> Run:
        if real:
            env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}", "SOUPKIT_CACHE_DIR": str(cwd / ".cache")}
            done = subprocess.run([sys.executable, "-m", "soupkit", *map(str, args)], input="y\ny\ny\n",
                                  cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
            return Run(done.returncode, done.stdout, done.stderr)
        monkeypatch.chdir(cwd)
        monkeypatch.syspath_prepend(str(cwd))
        monkeypatch.setenv("SOUPKIT_CACHE_DIR", str(cwd / ".cache"))
        monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))
        result = cli(*args)
        return Run(result.code, result.out, result.err)

    return run


def _assert_refused(result: Run, canary: Path, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr, "a trust prompt was shown"
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not canary.exists(), "foreign code ran"


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


TRANSFORMERS_CASES = {
    "config auto_map": ("config.json", {"auto_map": {"AutoConfig": "evil_code.EvilConfig"}}, "'auto_map'"),
    "config auto_map, unknown model_type": (
        "config.json", {"model_type": "evil", "auto_map": {"AutoConfig": "evil_code.EvilConfig",
                                                           "AutoModelForSequenceClassification": "evil_code.X"}},
        "'auto_map'"),
    "tokenizer auto_map": ("tokenizer_config.json",
                           {"auto_map": {"AutoTokenizer": [None, "evil_code.EvilTokenizer"]}}, "'auto_map'"),
    "tokenizer custom class": ("tokenizer_config.json", {"tokenizer_class": "EvilTokenizer"}, "'tokenizer_class'"),
    "custom pipelines": ("config.json", {"custom_pipelines": {"x": {"impl": "evil_code.P"}}}, "'custom_pipelines'"),
    "generation config auto_map": ("generation_config.json", {"auto_map": {"x": "evil_code.G"}}, "'auto_map'"),
}


@pytest.mark.parametrize("case", sorted(TRANSFORMERS_CASES))
def test_transformers_folder_with_custom_code_is_refused_without_a_prompt(clean_kit, tmp_path, case, run_soupkit):
    name, changes, key = TRANSFORMERS_CASES[case]
    folder = _copy_folder(clean_kit["folder"], tmp_path / "model")
    canary = tmp_path / "CANARY"
    (folder / "evil_code.py").write_text(EVIL.format(canary=str(canary)))
    (tmp_path / "evil_code.py").write_text(EVIL.format(canary=str(canary)))  # importable from the cwd too
    if not (folder / name).exists():
        (folder / name).write_text("{}")
    _edit_json(folder / name, **changes)
    recipe = _recipe(tmp_path, {"kind": "transformers", "path": str(folder), "task": "sequence-classification"},
                     clean_kit["data"])
    before = snapshot(folder)
    result = run_soupkit("eval", clean_kit["checkpoint"], "--eval", recipe, cwd=tmp_path,
                         real=case == "config auto_map")
    _assert_refused(result, canary, name, key)
    assert snapshot(folder) == before


def test_symlinked_config_is_refused(clean_kit, tmp_path, run_soupkit):
    folder = _copy_folder(clean_kit["folder"], tmp_path / "model")
    outside = tmp_path / "secret.json"
    outside.write_text((folder / "config.json").read_text())
    outside.chmod(0o600)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(outside)
    recipe = _recipe(tmp_path, {"kind": "transformers", "path": str(folder), "task": "sequence-classification"},
                     clean_kit["data"])
    result = run_soupkit("eval", clean_kit["checkpoint"], "--eval", recipe, cwd=tmp_path)
    _assert_refused(result, tmp_path / "CANARY", "config.json", "symlink to a file outside the folder")


@pytest.mark.slow  # the real executable loads transformers and scores
def test_a_clean_folder_still_loads(clean_kit, tmp_path, run_soupkit):
    recipe = _recipe(tmp_path, {"kind": "transformers", "path": str(clean_kit["folder"]),
                                "task": "sequence-classification"}, clean_kit["data"])
    result = run_soupkit("eval", clean_kit["checkpoint"], "--eval", recipe, cwd=tmp_path, real=True)
    assert result.returncode == 0, result.stderr
    assert "heldout" in result.stdout


def test_no_prompt_even_for_a_load_soupkit_does_not_make(clean_kit, tmp_path, monkeypatch):
    """Layer 3: with the prompt time-out at 0, transformers itself refuses unset trust instead of asking."""
    from transformers import AutoConfig

    from soupkit.io.foreign_code import forbid_remote_code_prompts

    folder = _copy_folder(clean_kit["folder"], tmp_path / "model")
    canary = tmp_path / "CANARY"
    (folder / "evil_code.py").write_text(EVIL.format(canary=str(canary)))
    _edit_json(folder / "config.json", model_type="evil", auto_map={"AutoConfig": "evil_code.EvilConfig"})
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("transformers asked on stdin"))
    forbid_remote_code_prompts()
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(str(folder), local_files_only=True)
    assert not canary.exists()


def _clip_recipe(tmp_path: Path, name: str, config: Path | None = None) -> Path:
    model = {"kind": "open_clip", "name": name, "classes": ["a", "b"], "templates": ["a photo of a {}."]}
    if config is not None:
        model["config"] = str(config)
    recipe = {"model": model, "data": {"heldout": {"kind": "digits", "split": "heldout"}}, "batch_size": 4,
              "device": "cpu", "precision": "fp32"}
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("name", ["hf-hub:evil/model", "local-dir:/tmp/evil", "HF-HUB:evil/model"])
def test_open_clip_source_prefixes_are_refused(cli, tmp_path, name):
    checkpoint = tmp_path / "c.safetensors"
    checkpoint.write_bytes(b"")
    out = cli("eval", checkpoint, "--eval", _clip_recipe(tmp_path, name))
    assert out.code == 2 and len(out.err.strip().splitlines()) == 1, out.err
    assert "model.name" in out.err and "source" in out.err


def test_open_clip_hf_text_tower_with_custom_code_is_refused(cli, clean_kit, tmp_path):
    folder = _copy_folder(clean_kit["folder"], tmp_path / "tower")
    canary = tmp_path / "CANARY"
    (folder / "evil_code.py").write_text(EVIL.format(canary=str(canary)))
    _edit_json(folder / "config.json", auto_map={"AutoConfig": "evil_code.EvilConfig"})
    config = tmp_path / "evil-clip.json"
    config.write_text(json.dumps({
        "embed_dim": 8,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16},
        "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "linear",
                     "hf_pooler_type": "cls_pooler"}}))
    checkpoint = tmp_path / "c.safetensors"
    checkpoint.write_bytes(b"")
    out = cli("eval", checkpoint, "--eval", _clip_recipe(tmp_path, "evil-clip", config))
    assert out.code == 2 and len(out.err.strip().splitlines()) == 1, out.err
    assert "config.json" in out.err and "'auto_map'" in out.err
    assert not canary.exists()
    hub = tmp_path / "hub-clip.json"
    hub.write_text(config.read_text().replace(str(folder), "evil-org/evil-model"))
    out = cli("eval", checkpoint, "--eval", _clip_recipe(tmp_path, "hub-clip", hub))
    assert out.code == 2 and "hub" in out.err and "evil-org/evil-model" in out.err, out.err


@pytest.mark.parametrize("model", [{"name": "hf-hub:timm/resnet18.a1_in1k"}, {"name": "hf_hub:timm/x"},
                                   {"name": "local-dir:/tmp/evil"},
                                   {"name": "resnet18", "kwargs": {"pretrained": True}},
                                   {"name": "resnet18", "kwargs": {"checkpoint_path": "/tmp/evil.pth"}},
                                   {"name": "resnet18", "kwargs": {"pretrained_cfg_overlay": {"file": "/x"}}}])
def test_timm_sources_and_loading_kwargs_are_refused(cli, tmp_path, model):
    recipe = {"model": {"kind": "timm", "num_classes": 10, **model},
              "data": {"heldout": {"kind": "digits", "split": "heldout"}}, "batch_size": 4, "device": "cpu"}
    path = tmp_path / "timm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    checkpoint = tmp_path / "c.safetensors"
    checkpoint.write_bytes(b"")
    out = cli("eval", checkpoint, "--eval", path)
    assert out.code == 2 and len(out.err.strip().splitlines()) == 1, out.err
    assert "model." in out.err


def test_every_from_pretrained_in_the_package_passes_no_remote_code():
    """One declaration: each ``from_pretrained``/``from_config`` call in soupkit passes ``**NO_REMOTE_CODE`` or
    ``trust_remote_code=False``."""
    offenders = []
    for file in (ROOT / "soupkit").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")):
                continue
            names = {k.arg for k in node.keywords}
            splats = [k.value for k in node.keywords if k.arg is None]
            safe = any(isinstance(v, ast.Name) and v.id == "NO_REMOTE_CODE" for v in splats)
            explicit = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant)
                           and k.value.value is False for k in node.keywords)
            if not (safe or explicit) or ("trust_remote_code" in names and not explicit):
                offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
