"""Tiny transformers models and text data made by the tests: a BERT-like sentiment classifier and a GPT-2-like
causal LM, each with a word-level tokenizer trained offline (``tokenizers``) on the test's own corpus, saved
with ``config.json`` into a model folder; three fine-tunes of each from one initialisation."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

POSITIVE = ["good", "great", "fine", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "a", "movie", "film", "was", "is", "very", "plot", "and", "actors"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


@dataclass
class TextKit:
    """A model folder, its base (initial) checkpoint, three fine-tunes, and recipe data files."""

    folder: Path
    base: Path
    finetunes: list[Path]
    files: dict[str, Path]


def _tokenizer(words: list[str], bert: bool) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else ["<pad>", "<unk>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", model_max_length=64)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|endoftext|>", bos_token="<|endoftext|>", model_max_length=64)


def sentiment_rows(n: int, seed: int, names: bool = False) -> list[dict[str, Any]]:
    """Sentences of 3-12 words; label 1 when positive words outnumber negative ones (ties dropped)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        words = [rng.choice(POSITIVE + NEGATIVE + FILLER * 2) for _ in range(rng.randint(3, 12))]
        score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        if score:
            label = int(score > 0)
            rows.append({"text": " ".join(words), "label": ["neg", "pos"][label] if names else label})
    return rows


def counting_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Multiple choice: a run of counting words; the right choice continues it (1-2 words), 2-4 choices."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, size, tail = rng.randint(0, 6), rng.randint(1, 4), rng.randint(1, 2)
        prompt = " ".join(NUMBERS[start:start + size])
        right = " ".join(NUMBERS[start + size:start + size + tail])
        wrong = {" ".join(rng.sample(NUMBERS, tail)) for _ in range(6)} - {right}
        choices = [right, *sorted(wrong)[: rng.randint(1, 3)]]
        rng.shuffle(choices)
        rows.append({"question": prompt + " ", "choices": choices, "answer": choices.index(right)})
    return rows


def counting_text(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randint(0, 8)
        out.append({"text": " ".join(NUMBERS[start:start + rng.randint(2, 8)])})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _save(state: dict[str, torch.Tensor], path: Path, drop: tuple[str, ...] = ()) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in state.items() if k not in drop}, str(path))
    return path


def _finetune(model: Any, batches: Any, steps: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # tiny backward passes: threads only contend on a shared 2-core machine
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        optimiser.zero_grad()
        batches(model, seed * 1000 + step).backward()
        optimiser.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_classifier(root: Path) -> TextKit:
    """BERT-like, 2 layers of width 32; fine-tuned 4/8/12 steps with different seeds."""
    from transformers import BertConfig, BertForSequenceClassification

    root.mkdir(parents=True, exist_ok=True)
    folder = root / "bert"
    tok = _tokenizer(POSITIVE + NEGATIVE + FILLER, bert=True)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    base = _save(model.state_dict(), root / "bert_base.safetensors")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    train = sentiment_rows(256, seed=1)

    def loss(m: Any, seed: int) -> torch.Tensor:
        rng = random.Random(seed)
        batch = rng.sample(train, 16)
        enc = tok([r["text"] for r in batch], padding=True, return_tensors="pt")
        return m(**enc, labels=torch.tensor([r["label"] for r in batch])).loss

    finetunes = []
    for i, steps in enumerate((4, 8, 12)):
        model.load_state_dict(init)
        finetunes.append(_save(_finetune(model, loss, steps, seed=i + 1), root / f"bert_ft{i}.safetensors"))
    files = {"heldout": write_jsonl(root / "sent_heldout.jsonl", sentiment_rows(48, seed=2)),
             "test": write_jsonl(root / "sent_test.jsonl", sentiment_rows(40, seed=3, names=True))}
    return TextKit(folder, base, finetunes, files)


def make_causal_lm(root: Path) -> TextKit:
    """GPT-2-like (tied embeddings), 2 layers of width 32; fine-tuned on counting with different seeds."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root.mkdir(parents=True, exist_ok=True)
    folder = root / "gpt2"
    tok = _tokenizer(NUMBERS, bert=False)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    base = _save(model.state_dict(), root / "gpt2_base.safetensors", drop=("lm_head.weight",))
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(m: Any, seed: int) -> torch.Tensor:
        rng = random.Random(seed)
        starts = [rng.randint(0, 4) for _ in range(16)]
        ids = torch.tensor([[tok.eos_token_id, *tok.convert_tokens_to_ids(NUMBERS[s:s + 8])] for s in starts])
        return m(input_ids=ids, labels=ids).loss

    finetunes = []
    for i, steps in enumerate((4, 8, 12)):
        model.load_state_dict(init)
        state = _finetune(model, loss, steps, seed=i + 1)
        finetunes.append(_save(state, root / f"gpt2_ft{i}.safetensors", drop=("lm_head.weight",)))
    files = {"heldout": write_jsonl(root / "mc_heldout.jsonl", counting_rows(40, seed=2)),
             "test": write_jsonl(root / "mc_test.jsonl", counting_rows(30, seed=3)),
             "text": write_jsonl(root / "lm_text.jsonl", counting_text(24, seed=4))}
    return TextKit(folder, base, finetunes, files)


def classifier_recipe(kit: TextKit, **overrides: Any) -> dict[str, Any]:
    recipe = {
        "model": {"kind": "transformers", "path": str(kit.folder), "task": "sequence-classification"},
        "data": {"heldout": {"kind": "jsonl", "path": str(kit.files["heldout"]), "text_field": "text",
                             "label_field": "label"},
                 "test": {"clean": {"kind": "jsonl", "path": str(kit.files["test"]), "text_field": "text",
                                    "label_field": "label"}}},
        "batch_size": 8, "device": "cpu", "precision": "fp32",
    }
    recipe.update(overrides)
    return recipe


def lm_recipe(kit: TextKit, **overrides: Any) -> dict[str, Any]:
    choice = {"kind": "jsonl", "prompt_field": "question", "choices_field": "choices", "answer_field": "answer"}
    recipe = {
        "model": {"kind": "transformers", "path": str(kit.folder), "task": "causal-lm"},
        "data": {"heldout": {**choice, "path": str(kit.files["heldout"])},
                 "test": {"mc": {**choice, "path": str(kit.files["test"])},
                          "text": {"kind": "jsonl", "path": str(kit.files["text"]), "text_field": "text"}}},
        "batch_size": 8, "device": "cpu", "precision": "fp32",
    }
    recipe.update(overrides)
    return recipe
