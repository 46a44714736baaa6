"""Text evaluator benchmark: examples/s scoring *different* checkpoints of a transformers classifier, against a
plain batched forward loop and an unbucketed loop on the same model and data.

Setup: a BERT-like sequence classifier built from a config (default 4 layers, width 256, random init), a
word-level tokenizer trained offline on a synthetic corpus, N JSONL examples (default 512) whose lengths are
skewed like real text (log-normal, 8 to 256 tokens), K different random checkpoints (safetensors). In one
process, interleaved round by round (so load from other processes drifts over all paths alike):

- evaluator: ``Evaluator.from_recipe`` once; ``ev(path)`` per checkpoint (cache off). The first call also
  tokenises; later calls reuse the packed tokens. Reported: median of evaluations 2..K, each including the
  loading of the checkpoint's weights.
- plain batched forward: the same transformers model on the evaluator's own (length-bucketed) batches, made
  beforehand, ``model(input_ids=..., attention_mask=...).logits.argmax(-1)`` under ``torch.inference_mode`` --
  the ceiling. Target: evaluator >= 0.9x of it.
- unbucketed loop: the same model, same batch size, examples in a random order, each batch padded to its
  longest example (what a DataLoader + ``tokenizer(padding=True)`` loop does), pre-tokenised.

    python benchmarks/text_eval_bench.py [--examples 512] [--checkpoints 5] [--layers 4] [--width 256]
                                         [--batch-size 32] [--threads N] [--write FILE]
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


def make_model_folder(folder: Path, layers: int, width: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

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


def make_data(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(n):
            length = max(8, min(256, int(rng.lognormvariate(3.8, 0.7))))
            handle.write(json.dumps({"text": " ".join(rng.choices(VOCAB, k=length)), "label": rng.randrange(4)})
                         + "\n")


def make_checkpoints(folder: Path, model: torch.nn.Module, k: int) -> list[Path]:
    from safetensors.torch import save_file

    paths = []
    for i in range(k):
        torch.manual_seed(i)
        state = {key: (torch.randn_like(v) * 0.02 if v.is_floating_point() else v)
                 for key, v in model.state_dict().items()}
        paths.append(folder / f"ckpt{i}.safetensors")
        save_file({key: v.contiguous() for key, v in state.items()}, str(paths[-1]))
    return paths


def forward_loop(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    return time.perf_counter() - started


def unbucketed(data: object, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random order, each batch padded to its longest example (the evaluator's tokens, re-batched)."""
    order = torch.randperm(data.n, generator=torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = int(data.lengths[rows].max())  # type: ignore[attr-defined]
        x = data.packed[rows][..., :width].long()  # type: ignore[attr-defined]
        out.append((x[:, 0], x[:, 1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        make_model_folder(folder / "model", args.layers, args.width)
        make_data(folder / "data.jsonl", args.examples)
        recipe = {"model": {"kind": "transformers", "path": str(folder / "model"), "task": "sequence-classification"},
                  "data": {"heldout": {"kind": "jsonl", "path": str(folder / "data.jsonl"), "text_field": "text",
                                       "label_field": "label"}},
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
                bucketed = [(x[:, 0], x[:, 1]) for x, _ in ev.batches("heldout")]
                data = ev._prepared("heldout")
                random_batches = unbucketed(data, args.batch_size)
                tokens = int(data.lengths.sum())
                padded = {"bucketed": sum(i.numel() for i, _ in bucketed),
                          "unbucketed": sum(i.numel() for i, _ in random_batches)}
                continue
            fwd_times.append(forward_loop(model, bucketed))
            unb_times.append(forward_loop(model, random_batches))

    n = args.examples
    ev_med, fwd_med, unb_med = (statistics.median(t) for t in (ev_times[1:], fwd_times, unb_times))
    rows = [("evaluator, 1st evaluation (tokenises once)", ev_times[0]),
            ("evaluator, 2nd+ evaluations (median)", ev_med),
            ("plain batched forward on the evaluator's batches (median)", fwd_med),
            ("unbucketed loop: random order, same batch size (median)", unb_med)]
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT) if Path(sys.argv[0]).is_absolute()
                                        else sys.argv[0]), *sys.argv[1:]])
    lines = [
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- workload: BERT-like classifier ({args.layers} layers, width {args.width}, random init), {n} JSONL "
        f"examples, {tokens:,} tokens (8-256 per example, log-normal), batch {args.batch_size}, fp32, "
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
