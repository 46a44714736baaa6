"""Bad-input corpus, data and tokenizer surfaces (issues 22 and 26: text recipes and data, tokenizer files):
hostile JSONL / CSV rows, recipe options and tokenizer files fed to ``soupkit eval``. Registered into
``corpus.CASES`` (imported at the end of ``corpus.py``), so ``test_corpus.py`` gives every case the same
treatment: exit 2, one line naming the file and line (or the recipe field), no traceback, nothing left under the
output's name (``--json``), inputs byte-identical, no canary. ``DATA_BOMBS`` lists the cases whose peak memory
and time ``test_data_bombs.py`` also bounds in a child process.

Each case copies a tiny model folder (a 2-layer BERT classifier or GPT-2 causal LM with a word-level tokenizer,
random weights from a config, built once per process) and its own weights, then writes its data and recipe.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.hostile.corpus import Expect, Workspace
from tests.hostile.corpus import case as register

#: every case this module adds
DATA_CASES: list[str] = []
#: cases that would need unbounded memory or time if the reader trusted them (bounded by test_data_bombs.py)
DATA_BOMBS: list[str] = []

_TEMPLATES: dict[str, Path] = {}


def case(name: str, bomb: bool = False) -> Callable[[Callable[[Workspace], Expect]], Callable[[Workspace], Expect]]:
    DATA_CASES.append(name)
    if bomb:
        DATA_BOMBS.append(name)
    return register(name)


def template(kind: str) -> Path:
    """A model folder (config, tokenizer, model.safetensors) of ``kind`` "bert" or "gpt2", built once."""
    if kind not in _TEMPLATES:
        import torch

        from tests.eval.text_models import FILLER, NEGATIVE, NUMBERS, POSITIVE, _tokenizer

        root = Path(tempfile.mkdtemp(prefix=f"soupkit-corpus-{kind}-"))
        atexit.register(shutil.rmtree, root, True)
        torch.manual_seed(0)
        if kind == "bert":
            from transformers import BertConfig, BertForSequenceClassification

            tok = _tokenizer(POSITIVE + NEGATIVE + FILLER, bert=True)
            config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64, num_labels=2,
                                id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
            model = BertForSequenceClassification(config)
        else:
            from transformers import GPT2Config, GPT2LMHeadModel

            tok = _tokenizer(NUMBERS, bert=False)
            config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
            model = GPT2LMHeadModel(config)
        model.save_pretrained(root)
        tok.save_pretrained(root)
        _TEMPLATES[kind] = root
    return _TEMPLATES[kind]


def _model(w: Workspace, kind: str) -> tuple[Path, Path]:
    """(model folder, checkpoint) copied into the case's folder."""
    folder = w.root / kind
    if not folder.exists():
        shutil.copytree(template(kind), folder)
    return folder, folder / "model.safetensors"


def eval_with(w: Workspace, data: dict[str, Any], *needles: str, kind: str = "bert",
              model: dict[str, Any] | None = None) -> Expect:
    """``soupkit eval CKPT -e recipe.yaml --json scores.json --no-cache`` with ``data`` as the held-out set."""
    folder, checkpoint = _model(w, kind)
    task = "sequence-classification" if kind == "bert" else "causal-lm"
    recipe = {"model": {"kind": "transformers", "path": str(folder), "task": task, **(model or {})},
              "data": {"heldout": data}, "batch_size": 4, "device": "cpu", "precision": "fp32"}
    path = w.root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return Expect(["eval", str(checkpoint), "-e", str(path), "--json", str(w.root / "scores.json"), "--no-cache",
                   "-q"], needles, w.canary)


def jsonl(w: Workspace, body: bytes | str, name: str = "data.jsonl") -> Path:
    return w.write(name, body.encode() if isinstance(body, str) else body)


def rows(*items: Any) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


GOOD = {"text": "good film", "label": 1}
CLASSIFY = {"kind": "jsonl", "text_field": "text", "label_field": "label"}
CHOICE = {"kind": "jsonl", "prompt_field": "q", "choices_field": "c", "answer_field": "a"}
GOOD_CHOICE = {"q": "one two ", "c": ["three", "four"], "a": 0}


def classify(w: Workspace, body: bytes | str, *needles: str, **options: Any) -> Expect:
    path = jsonl(w, body)
    return eval_with(w, {**CLASSIFY, "path": str(path), **options}, str(path), *needles)


def bad_option(w: Workspace, kind: str, **options: Any) -> Expect:
    """A recipe option with a bad value: the error names the recipe file and the field."""
    path = jsonl(w, rows(GOOD)) if kind == "jsonl" else w.write("data.csv", b"text,label\ngood,1\n")
    field = next(iter(options))
    return eval_with(w, {**CLASSIFY, "kind": kind, "path": str(path), **options}, str(w.root / "recipe.yaml"),
                     f"data.heldout.{field}")


def choice(w: Workspace, body: bytes | str, *needles: str, **options: Any) -> Expect:
    path = jsonl(w, body)
    return eval_with(w, {**CHOICE, "path": str(path), **options}, str(path), *needles, kind="gpt2")


def table(w: Workspace, body: bytes | str, *needles: str, **options: Any) -> Expect:
    path = w.write("data.csv", body.encode() if isinstance(body, str) else body)
    spec = {"kind": "csv", "path": str(path), "text_field": "text", "label_field": "label", **options}
    return eval_with(w, spec, str(path), *needles)


# --- JSONL: the file itself ----------------------------------------------------------------------------------------


@case("jsonl line over the line limit (17 MiB)", bomb=True)
def _long_line(w: Workspace) -> Expect:
    body = rows(GOOD) + '{"text": "' + "a " * (17 << 19) + '", "label": 1}\n'
    return classify(w, body, "data.jsonl:2", "line longer than 16 MiB")


@case("jsonl line nested 100k deep (arrays)", bomb=True)
def _deep_arrays(w: Workspace) -> Expect:
    return classify(w, rows(GOOD) + "[" * 100_000 + "]" * 100_000 + "\n", "data.jsonl:2", "nested too deeply")


@case("jsonl line nested 100k deep (objects, unclosed)", bomb=True)
def _deep_objects(w: Workspace) -> Expect:
    return classify(w, rows(GOOD) + '{"a": ' * 100_000 + "\n", "data.jsonl:2")


@case("jsonl 5,000-digit integer label", bomb=True)
def _long_label(w: Workspace) -> Expect:
    return classify(w, rows(GOOD) + '{"text": "bad", "label": ' + "7" * 5000 + "}\n", "data.jsonl:2",
                    "'label'", "5000 digits")


@case("jsonl 5,000-digit integer in an unread field is ignored, a bad row after it is not")
def _long_unread(w: Workspace) -> Expect:
    body = rows(GOOD) + '{"text": "bad", "label": 0, "id": ' + "9" * 5000 + "}\n" + rows({"text": 3, "label": 0})
    return classify(w, body, "data.jsonl:3", "'text' must be text")


@case("jsonl bad UTF-8")
def _bad_utf8(w: Workspace) -> Expect:
    return classify(w, rows(GOOD).encode() + b'{"text": "caf\xe9", "label": 0}\n', "data.jsonl:2", "not UTF-8")


@case("jsonl text holding a lone surrogate (JSON escape \\ud800)")
def _surrogate(w: Workspace) -> Expect:
    return classify(w, rows(GOOD) + '{"text": "caf\\ud800", "label": 0}\n', "data.jsonl:2", "lone surrogate")


@case("jsonl choice holding a lone surrogate")
def _surrogate_choice(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE) + '{"q": "one ", "c": ["two", "\\udfff"], "a": 0}\n', "data.jsonl:2",
                  "lone surrogate")


@case("jsonl raw NUL byte")
def _nul(w: Workspace) -> Expect:
    return classify(w, rows(GOOD).encode() + b'{"text": "a\x00b", "label": 0}\n', "data.jsonl:2", "NUL byte")


@case("jsonl not JSON")
def _not_json(w: Workspace) -> Expect:
    return classify(w, rows(GOOD) + "{text: good}\n", "data.jsonl:2", "not valid JSON")


@case("jsonl row is an array")
def _array_row(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, ["good film", 1]), "data.jsonl:2", "expected a JSON object")


@case("jsonl row is a bare number")
def _number_row(w: Workspace) -> Expect:
    return classify(w, rows(GOOD) + "12\n", "data.jsonl:2", "expected a JSON object")


@case("jsonl row missing the text field")
def _missing_text(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"sentence": "bad", "label": 0}), "data.jsonl:2", "no field 'text'")


@case("jsonl row missing the label field")
def _missing_label(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"text": "bad"}), "data.jsonl:2", "no field 'label'")


@case("jsonl empty file (no examples)")
def _empty(w: Workspace) -> Expect:
    return classify(w, "", "no examples")


@case("jsonl only blank lines")
def _blank(w: Workspace) -> Expect:
    return classify(w, "\n  \n\t\n", "no examples")


@case("jsonl data path is a FIFO")
def _fifo(w: Workspace) -> Expect:
    path = w.root / "pipe.jsonl"
    os.mkfifo(path)
    return eval_with(w, {**CLASSIFY, "path": str(path)}, str(path), "not a file")


@case("jsonl data path links to /dev/zero")
def _zero(w: Workspace) -> Expect:
    path = w.root / "zero.jsonl"
    path.symlink_to("/dev/zero")
    return eval_with(w, {**CLASSIFY, "path": str(path)}, str(path), "not a file")


@case("jsonl data path is a folder")
def _folder(w: Workspace) -> Expect:
    path = w.root / "rows.jsonl"
    path.mkdir()
    return eval_with(w, {**CLASSIFY, "path": str(path)}, str(path), "not a file")


# --- JSONL: classification values ----------------------------------------------------------------------------------


@case("label out of range (5 of 2 classes)")
def _label_high(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"text": "bad", "label": 5}), "data.jsonl:2", "outside the model's 2 classes")


@case("label negative")
def _label_negative(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"text": "bad", "label": -1}), "data.jsonl:2", "outside the model's 2 classes")


@case("label a float")
def _label_float(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"text": "bad", "label": 1.5}), "data.jsonl:2", "'label'")


@case("label a boolean")
def _label_bool(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"text": "bad", "label": True}), "data.jsonl:2", "'label'")


@case("label an unknown name")
def _label_name(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"text": "bad", "label": "meh"}), "data.jsonl:2", "label 'meh'", "label2id")


@case("label a nested object")
def _label_object(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"text": "bad", "label": {"id": 1}}), "data.jsonl:2", "'label'")


@case("text a number")
def _text_number(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"text": 42, "label": 0}), "data.jsonl:2", "'text' must be text")


@case("text null")
def _text_null(w: Workspace) -> Expect:
    return classify(w, rows(GOOD, {"text": None, "label": 0}), "data.jsonl:2", "'text' must be text")


@case("text a list of a million items", bomb=True)
def _text_list(w: Workspace) -> Expect:
    return classify(w, rows(GOOD) + '{"text": [' + "0," * 1_000_000 + '0], "label": 0}\n', "data.jsonl:2",
                    "'text' must be text")


@case("max_length 0")
def _max_length_zero(w: Workspace) -> Expect:
    return bad_option(w, "jsonl", max_length=0)


@case("max_length negative")
def _max_length_negative(w: Workspace) -> Expect:
    return bad_option(w, "jsonl", max_length=-5)


@case("max_length a string")
def _max_length_text(w: Workspace) -> Expect:
    return bad_option(w, "jsonl", max_length="long")


# --- JSONL: multiple choice ----------------------------------------------------------------------------------------


@case("choices empty")
def _choices_empty(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "c": []}), "data.jsonl:2", "non-empty list")


@case("choices not a list")
def _choices_number(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "c": 3}), "data.jsonl:2", "'c' must be a list")


@case("choices hold a non-string")
def _choices_mixed(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "c": ["three", 4]}), "data.jsonl:2", "'c' must be a list")


@case("a choice that is empty text")
def _choice_blank(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "c": ["three", ""]}), "data.jsonl:2", "choice 1")


@case("too many choices (2,000)", bomb=True)
def _choices_many(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "c": ["three"] * 2000}), "data.jsonl:2", "2000 choices")


@case("answer out of range")
def _answer_high(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "a": 2}), "data.jsonl:2", "answer 2", "0..1")


@case("answer negative")
def _answer_negative(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "a": -1}), "data.jsonl:2", "answer -1")


@case("answer 5,000-digit integer", bomb=True)
def _answer_long(w: Workspace) -> Expect:
    body = rows(GOOD_CHOICE) + '{"q": "one ", "c": ["two", "three"], "a": ' + "1" * 5000 + "}\n"
    return choice(w, body, "data.jsonl:2", "'a'", "5000 digits")


@case("answer 5,000-digit integer written as text", bomb=True)
def _answer_long_text(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "a": "1" * 5000}), "data.jsonl:2", "neither a choice index")


@case("answer a superscript digit ('²'.isdigit() is true)")
def _answer_superscript(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "a": "²"}), "data.jsonl:2", "neither a choice index")


@case("answer not one of the choices")
def _answer_text(w: Workspace) -> Expect:
    return choice(w, rows(GOOD_CHOICE, {**GOOD_CHOICE, "a": "seven"}), "data.jsonl:2", "answer 'seven'")


@case("plain text that is empty")
def _text_empty(w: Workspace) -> Expect:
    path = jsonl(w, rows({"t": "one two"}, {"t": ""}))
    return eval_with(w, {"kind": "jsonl", "path": str(path), "text_field": "t"}, str(path), "data.jsonl:2",
                     "no token to score", kind="gpt2")


# --- CSV -----------------------------------------------------------------------------------------------------------


@case("csv NUL byte in a cell")
def _csv_nul(w: Workspace) -> Expect:
    return table(w, b"text,label\ngood film,1\nbad\x00film,0\n", "data.csv:3", "NUL byte")


@case("csv bad UTF-8")
def _csv_utf8(w: Workspace) -> Expect:
    return table(w, b"text,label\ngood film,1\n\xff\xfe,0\n", "data.csv:3", "not UTF-8")


@case("csv row with too many cells")
def _csv_cells(w: Workspace) -> Expect:
    return table(w, "text,label\ngood film,1\nbad,0,extra\n", "data.csv:3", "3 cells but the header has 2")


@case("csv header lacks the label column")
def _csv_header(w: Workspace) -> Expect:
    return table(w, "text,score\ngood film,1\n", "data.csv:1", "no field 'label'")


@case("csv empty file")
def _csv_empty(w: Workspace) -> Expect:
    return table(w, "", "empty CSV file")


@case("csv label a superscript digit")
def _csv_superscript(w: Workspace) -> Expect:
    return table(w, "text,label\ngood film,1\nbad,\u00b9\n", "data.csv:3", "is neither a class id")


@case("csv label with 5,000 digits", bomb=True)
def _csv_long_label(w: Workspace) -> Expect:
    return table(w, "text,label\ngood film,1\nbad," + "1" * 5000 + "\n", "data.csv:3", "is neither a class id")


@case("csv choices cell not a JSON list")
def _csv_choices(w: Workspace) -> Expect:
    path = w.write("mc.csv", b"q,c,a\none ,\"[\"\"two\"\", \"\"three\"\"]\",0\none ,two or three,0\n")
    spec = {"kind": "csv", "path": str(path), "prompt_field": "q", "choices_field": "c", "answer_field": "a"}
    return eval_with(w, spec, str(path), "mc.csv:3", "non-empty list", kind="gpt2")


@case("csv cell over the line limit in a quoted multi-line cell", bomb=True)
def _csv_huge_cell(w: Workspace) -> Expect:
    body = 'text,label\ngood film,1\n"' + ("word " * 200 + "\n") * 18_000 + '",0\n'
    return table(w, body, "data.csv")


@case("csv delimiter of two characters")
def _csv_delimiter(w: Workspace) -> Expect:
    return bad_option(w, "csv", delimiter=";;")


@case("csv delimiter a quote")
def _csv_quote(w: Workspace) -> Expect:
    return bad_option(w, "csv", delimiter='"')


# --- tokenizer files -----------------------------------------------------------------------------------------------


def tokenizer_case(w: Workspace, *needles: str) -> Expect:
    """Good data, a bad tokenizer file: the error names the tokenizer file."""
    return eval_with(w, {**CLASSIFY, "path": str(jsonl(w, rows(GOOD)))}, *needles)


def _edit_tokenizer(w: Workspace, kind: str, change: Callable[[dict[str, Any]], None]) -> Path:
    folder, _ = _model(w, kind)
    path = folder / "tokenizer.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return path


def _with_split(pattern: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
        document["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, document["pre_tokenizer"]]}

    return change


for _number, _pattern in enumerate([r"([\w.]+)+!", r"(a+)+$", r"(\s*x?)*y", r"(a|aa)*b", r"(?:\p{L}+\s?)*!"]):
    def _backtracking(w: Workspace, pattern: str = _pattern) -> Expect:
        path = _edit_tokenizer(w, "bert", _with_split(pattern))
        return tokenizer_case(w, str(path), "pre_tokenizer", "regex")

    case(f"tokenizer.json Split regex that backtracks #{_number} {_pattern}")(_backtracking)


@case("tokenizer.json normalizer Replace regex that backtracks")
def _normalizer(w: Workspace) -> Expect:
    def change(document: dict[str, Any]) -> None:
        document["normalizer"] = {"type": "Replace", "pattern": {"Regex": "(x+x+)+y"}, "content": " "}

    path = _edit_tokenizer(w, "bert", change)
    return tokenizer_case(w, str(path), "normalizer", "regex")


@case("tokenizer.json larger than its bound (sparse, 129 MiB)", bomb=True)
def _huge_tokenizer(w: Workspace) -> Expect:
    folder, _ = _model(w, "bert")
    path = folder / "tokenizer.json"
    with open(path, "r+b") as handle:
        handle.truncate(129 << 20)
    return tokenizer_case(w, str(path), "larger than")


@case("tokenizer.json not JSON")
def _tokenizer_text(w: Workspace) -> Expect:
    folder, _ = _model(w, "bert")
    path = folder / "tokenizer.json"
    path.write_text("{ this is not json")
    return tokenizer_case(w, str(path), "not a valid tokenizer file")


@case("tokenizer.json nested 100k deep", bomb=True)
def _tokenizer_deep(w: Workspace) -> Expect:
    folder, _ = _model(w, "bert")
    path = folder / "tokenizer.json"
    path.write_text('{"normalizer": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return tokenizer_case(w, str(path), "nested too deeply")


@case("tokenizer_config.json larger than its bound (sparse, 40 MiB)", bomb=True)
def _huge_tokenizer_config(w: Workspace) -> Expect:
    folder, _ = _model(w, "bert")
    path = folder / "tokenizer_config.json"
    with open(path, "r+b") as handle:
        handle.truncate(40 << 20)
    return tokenizer_case(w, str(path), "bytes")  # the foreign-code check's bound (8 MiB) meets it first


# --- doctor ----------------------------------------------------------------------------------------------------------


def _weights(w: Workspace, name: str, scale: float = 1.0, poison: float | None = None, seed: int = 0) -> Path:
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {"layer.weight": torch.randn(8, 8, generator=g) * scale, "layer.bias": torch.randn(8, generator=g)}
    if poison is not None:
        state["layer.weight"][3, 4] = poison
    return w.good(name, state=state)


def doctor_with(w: Workspace, *paths: Path, needle: str, base: Path | None = None) -> Expect:
    argv = ["doctor", *map(str, paths), *(["--base", str(base)] if base else []), "--json",
            str(w.root / "report.json")]
    return Expect(argv, (needle,), w.canary)


@case("doctor one input")
def _doctor_one(w: Workspace) -> Expect:
    return doctor_with(w, _weights(w, "a.safetensors"), needle="at least two")


@case("doctor the same file twice")
def _doctor_twice(w: Workspace) -> Expect:
    a = _weights(w, "a.safetensors")
    return doctor_with(w, a, a, needle="given twice")


for _label_, _value in (("NaN", float("nan")), ("+Inf", float("inf")), ("-Inf", float("-inf"))):
    def _doctor_nonfinite(w: Workspace, value: float = _value) -> Expect:
        bad = _weights(w, "bad.safetensors", poison=value, seed=1)
        return doctor_with(w, _weights(w, "a.safetensors"), bad, needle=f"{bad}: holds NaN or Inf")

    case(f"doctor an input holding {_label_}")(_doctor_nonfinite)

    def _doctor_nonfinite_base(w: Workspace, value: float = _value) -> Expect:
        base = _weights(w, "base.safetensors", poison=value, seed=2)
        return doctor_with(w, _weights(w, "a.safetensors"), _weights(w, "b.safetensors", seed=1), base=base,
                           needle=f"{base}: the base holds NaN or Inf")

    case(f"doctor a base holding {_label_}")(_doctor_nonfinite_base)
