"""Text evaluator benchmark: examples/s scoring *different* checkpoints of a transformers model, against a
plain batched forward loop and an unbucketed loop on the same model and data.

Setup (``--task classification``): a BERT-like sequence classifier built from a config (default 4 layers,
width 256, random init), a word-level tokenizer built offline, N JSONL examples (default 512) whose lengths are
skewed like real text (log-normal, 8 to 256 tokens). ``--task choice``: a GPT-2-like causal LM of the same size
on N multiple-choice questions (log-normal prompts, 4 choices of 1 to 5 words), scored as lm-eval-harness
``acc``. K different random checkpoints (safetensors). In one process, interleaved round by round (so load
from other processes drifts over all paths alike):

- evaluator: ``Evaluator.from_recipe`` once; ``ev(path)`` per checkpoint (cache off). The first call also
  tokenises; later calls reuse the packed tokens. Reported: median of evaluations 2..K, each including the
  loading of the checkpoint's weights.
- plain batched forward: the same transformers model on the evaluator's own (length-bucketed) batches, made
  beforehand, ``model(input_ids=..., attention_mask=...).logits.argmax(-1)`` under ``torch.inference_mode``
  (for choices: every choice of the batch in one pass, log-softmax, gather, sum) -- the ceiling. Target:
  evaluator >= 0.9x of it.
- unbucketed loop: the same model, same batch size, examples in a random order, each batch padded to its
  longest example (what a DataLoader + ``tokenizer(padding=True)`` loop does), pre-tokenised.

    python benchmarks/text_eval_bench.py [--task classification|choice] [--examples 512] [--checkpoints 5]
                                         [--layers 4] [--width 256] [--batch-size 32] [--threads N] [--write FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.eval_bench import machine  # noqa: E402

VOCAB = [f"w{i}" for i in range(2000)]


def make_model_folder(folder: Path, layers: int, width: int, task: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    if task == "choice":
        specials = ["<pad>", "<unk>", "<|endoftext|>"]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + VOCAB)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                       eos_token="<|endoftext|>", bos_token="<|endoftext|>", model_max_length=300)
        config = GPT2Config(vocab_size=len(fast), n_embd=width, n_layer=layers, n_head=max(1, width // 64),
                            n_positions=300, bos_token_id=2, eos_token_id=2, pad_token_id=0)
        GPT2LMHeadModel(config).save_pretrained(folder)
        fast.save_pretrained(folder)
        return
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                              ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=258)
    config = BertConfig(vocab_size=len(fast), hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=max(1, width // 64), intermediate_size=4 * width,
                        max_position_embeddings=258, num_labels=4)
    BertForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def make_data(path: Path, n: int, task: str) -> None:
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(n):
            length = max(8, min(256, int(rng.lognormvariate(3.8, 0.7))))
            words = " ".join(rng.choices(VOCAB, k=length))
            if task == "choice":
                choices = [" ".join(rng.choices(VOCAB, k=rng.randint(1, 5))) for _ in range(4)]
                row = {"question": words + " ", "choices": choices, "answer": rng.randrange(4)}
            else:
                row = {"text": words, "label": rng.randrange(4)}
            handle.write(json.dumps(row) + "\n")


def make_checkpoints(folder: Path, model: torch.nn.Module, k: int) -> list[Path]:
    from safetensors.torch import save_file

    paths = []
    for i in range(k):
        torch.manual_seed(i)
        state = {key: (torch.randn_like(v) * 0.02 if v.is_floating_point() else v)
                 for key, v in model.state_dict().items()}  # the evaluator's state dict: no tied lm_head copy
        paths.append(folder / f"ckpt{i}.safetensors")
        save_file({key: v.contiguous() for key, v in state.items()}, str(paths[-1]))
    return paths


def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a plain loop computes per batch: class argmax, or per question the choice with the highest summed
    log-likelihood of its tokens (every choice of the batch in one forward pass)."""
    if x.dim() == 3:
        return model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits.argmax(-1)
    rows = x.flatten(0, 1)
    logprobs = torch.log_softmax(model(input_ids=rows[:, 0], attention_mask=rows[:, 1]).logits[:, :-1].float(), -1)
    picked = logprobs.gather(-1, rows[:, 0, 1:].unsqueeze(-1)).squeeze(-1) * rows[:, 2, 1:]
    return picked.sum(-1).view(x.shape[:2]).argmax(-1)


def forward_loop(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            predict(model, x)
    return time.perf_counter() - started


def unbucketed(data: object, batch_size: int) -> list[torch.Tensor]:
    """Random order, each batch padded to its longest example (the evaluator's tokens, re-batched)."""
    order = torch.randperm(data.n, generator=torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out.append(data.inputs(rows, torch.device("cpu")))  # type: ignore[attr-defined]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("classification", "choice"), default="classification")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's].")
    parser.add_argument("--write", type=Path, default=None, help="Write a Markdown summary here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from soupkit.eval import Evaluator

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_model_folder(folder / "model", args.layers, args.width, args.task)
        make_data(folder / "data.jsonl", args.examples, args.task)
        fields = ({"prompt_field": "question", "choices_field": "choices", "answer_field": "answer"}
                  if args.task == "choice" else {"text_field": "text", "label_field": "label"})
        task = "causal-lm" if args.task == "choice" else "sequence-classification"
        recipe = {"model": {"kind": "transformers", "path": str(folder / "model"), "task": task},
                  "data": {"heldout": {"kind": "jsonl", "path": str(folder / "data.jsonl"), **fields}},
                  "batch_size": args.batch_size, "device": "cpu", "precision": "fp32"}
        ev = Evaluator.from_recipe(recipe, use_cache=False)
        paths = make_checkpoints(folder, ev.model, args.checkpoints)
        model = ev.model.hf_model
        ev_times, fwd_times, unb_times = [], [], []
        bucketed = random_batches = None
        for path in paths:
            started = time.perf_counter()
            ev(path)
            ev_times.append(time.perf_counter() - started)
            if bucketed is None:
                bucketed = [x for x, _ in ev.batches("heldout")]
                data = ev._prepared("heldout")
                random_batches = unbucketed(data, args.batch_size)
                tokens = sum(int(x[..., 1, :].sum()) for x in bucketed)  # attended tokens (every choice)
                padded = {"bucketed": sum(x[..., 0, :].numel() for x in bucketed),
                          "unbucketed": sum(x[..., 0, :].numel() for x in random_batches)}
                continue
            fwd_times.append(forward_loop(model, bucketed))
            unb_times.append(forward_loop(model, random_batches))

    n = args.examples
    ev_med, fwd_med, unb_med = (statistics.median(t) for t in (ev_times[1:], fwd_times, unb_times))
    rows = [("evaluator, 1st evaluation (tokenises once)", ev_times[0]),
            ("evaluator, 2nd+ evaluations (median)", ev_med),
            ("plain batched forward on the evaluator's batches (median)", fwd_med),
            ("unbucketed loop: random order, same batch size (median)", unb_med)]
    workload = "GPT-2-like causal LM on 4-choice questions" if args.task == "choice" else "BERT-like classifier"
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT) if Path(sys.argv[0]).is_absolute()
                                        else sys.argv[0]), *sys.argv[1:]])
    lines = [
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- workload: {workload} ({args.layers} layers, width {args.width}, random init), {n} JSONL "
        f"examples, {tokens:,} tokens (prompts 8-256, log-normal), batch {args.batch_size}, fp32, "
        f"{args.checkpoints} different checkpoints, cache off",
        "",
        "| path | seconds per evaluation | examples/s |",
        "|---|---:|---:|",
        *(f"| {name} | {sec:.3f} | {n / sec:,.0f} |" for name, sec in rows),
        "",
        f"- evaluator (2nd+) / plain batched forward: **{fwd_med / ev_med:.2f}x** (target >= 0.9x)",
        f"- speed-up over the unbucketed loop: **{unb_med / ev_med:.2f}x**; token slots computed: bucketed "
        f"{padded['bucketed']:,}, unbucketed {padded['unbucketed']:,} (real tokens {tokens:,})",
        f"- raw seconds: evaluator {', '.join(f'{t:.2f}' for t in ev_times)}; forward "
        f"{', '.join(f'{t:.2f}' for t in fwd_times)}; unbucketed {', '.join(f'{t:.2f}' for t in unb_times)}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
