"""Text for the evaluator: the module it runs for a transformers model, and tokenising a dataset once into
packed integer tensors batched by length.

The counterpart of images' decode-once: every example of a dataset is tokenised once, when the evaluator
first uses the dataset, into one int32 tensor kept on the device (or pinned memory) for every later evaluation.
Batches are bucketed by length: examples are sorted longest first (a stable sort, so the order is
deterministic) and each batch is cut to its own longest example, so padding stays small. An explicit example
order (greedy soup's hardest-first) is honoured in windows of ``ORDER_WINDOW`` batches, each sorted by length.

Tokens are stored end to end (``Ragged``: int32 on the device or pinned, never padded at rest, so memory follows
the tokens and not N x the longest example); each batch is padded to its own longest. Batch layouts (int64),
one row per field:

- sequence classification and plain text: (N, F, L): input ids, attention mask, token type ids (when the
  tokenizer gives them);
- multiple choice: (N, C, 3, L): per choice the prompt + choice ids, attention mask and a continuation mask
  (1 on the choice's tokens, which are the ones scored). Examples with fewer than C choices get empty ones.

Tokenisation follows lm-eval-harness for causal LMs: no special tokens; a choice is what the tokenizer makes
of prompt + choice beyond the prompt's tokens (trailing spaces of the prompt move to the choice); an empty prompt
and every plain text are preceded by the BOS token (EOS when there is none) so that each scored token has a
context. Over-long inputs are cut: multiple choice keeps the end (the choice), plain text the start.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from soupkit.errors import RecipeError, SoupkitError
from soupkit.eval.cache import say_once, state_fingerprint
from soupkit.eval.data.text import parse_index, shown
from soupkit.eval.recipe import DatasetSpec
from soupkit.io import save_checkpoint

#: with an explicit example order, batches are length-sorted within windows of this many batches: small enough
#: to keep the order's front (hardest examples first for early stopping), large enough to cut most padding
ORDER_WINDOW = 4
#: the score of an absent choice (an example with fewer choices than the batch's widest): finite, because a
#: learned soup's temperature gradient multiplies it by its zero gradient, and -inf * 0 is NaN
ABSENT = -1e9
#: choices of one multiple-choice example: every example is padded to the widest one, so one example with 10^6
#: choices would make the packed tensor (N, 10^6, 3, L); benchmarks ask 2-10, lm-eval-harness tasks at most ~100
MAX_CHOICES = 1024
#: texts are cut to this many characters per kept token before tokenising (BPE tokens average ~4 characters):
#: a prompt's start beyond it cannot reach its last ``max_length`` tokens, a text's end its first ones; so a
#: 16 MB line is never tokenised whole (and a prompt never copied once per choice whole)
PROMPT_CHARS_PER_TOKEN = 64


class TextTaskModel(nn.Module):
    """A transformers model behind one packed-tensor input (see ``soupkit.eval.models.transformers_models``).

    It shares the wrapped model's tables of submodules, parameters and buffers instead of registering it, so
    its names are the wrapped model's names (no ``model.`` prefix) and ``torch.func.functional_call`` on it swaps
    the wrapped model's weights. Tied aliases (``lm_head.weight``) are left out of its state dict."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        object.__setattr__(self, "hf_model", model)  # not a submodule: that would prefix every key
        self.task = task
        self.aliases = tied_aliases(model)
        self._register_state_dict_hook(_drop_aliases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, labels); (B, C) choice log-likelihoods for a 4-D multiple-choice batch (``ABSENT``
        for missing choices); token logits
        (B, vocab, T-1) for a causal LM on plain text."""
        if x.dim() == 4:
            return self._choice_scores(x)
        logits = self.hf_model(**_inputs(x)).logits
        if self.task == "sequence-classification":
            return logits
        return logits[:, :-1].transpose(1, 2)  # class dim second, as cross_entropy wants

    def _choice_scores(self, x: torch.Tensor) -> torch.Tensor:
        batch, choices = x.shape[:2]
        flat = x.reshape(batch * choices, *x.shape[2:])
        present = flat[:, 1, 0] > 0  # attention on the first token: the choice exists
        rows = flat if bool(present.all()) else flat[present]
        logits = self.hf_model(**_inputs(rows[:, :2])).logits[:, :-1].float()
        picked = logits.gather(-1, rows[:, 0, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        summed = (picked * rows[:, 2, 1:].to(picked.dtype)).sum(-1)
        if rows is flat:
            return summed.view(batch, choices)
        scores = torch.full((batch * choices,), ABSENT, dtype=summed.dtype, device=summed.device)
        return scores.masked_scatter(present, summed).view(batch, choices)


def _inputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"input_ids": x[:, 0], "attention_mask": x[:, 1]}
    if x.shape[1] > 2:
        out["token_type_ids"] = x[:, 2]
    return out


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """State-dict keys sharing storage with an earlier key (tied weights): alias -> the key kept."""
    first: dict[tuple[int, int], str] = {}
    aliases = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        slot = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if slot in first:
            aliases[key] = first[slot]
        else:
            first[slot] = key
    return aliases


def _drop_aliases(module: TextTaskModel, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for key in module.aliases:
        state.pop(prefix + key, None)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: summed negative log-likelihood of the target tokens (-100 = not scored) and their count."""
    nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (B, T), 0 where ignored
    return nll.sum(1), (targets != -100).sum(1)


# ------------------------------------------------------------------------------------------------ prepared


@dataclass
class Ragged:
    """Token rows of every example stored end to end, never padded at rest: ``tokens[starts[i, c] + t, f]`` is
    token ``t`` of row ``f`` of example ``i`` (choice ``c``) for ``t < widths[i, c]`` (absent choices have width
    0); the last row of ``tokens`` holds each row's pad value. Memory follows the tokens, not N x the longest
    example: one 100k-token outlier among short examples costs its own tokens only (a padded (N, F, L) block
    would cost N x 100k). ``gather`` pads one batch (one gather: ~3 ms for 32 x 4 choices x 256 tokens on one
    CPU thread, 3x the old slice of a padded block and far below a forward pass over those tokens)."""

    tokens: torch.Tensor  # (T + 1, F) int32, on the device or pinned; row T is the padding
    starts: torch.Tensor  # (n, C) int64, beside tokens
    widths: torch.Tensor  # (n, C) int64, beside tokens
    pad: tuple[int, ...]  # per row f: the value of padding
    choice: bool  # batches are (B, C, F, L) when True, else (B, F, L)

    def gather(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """Examples ``rows`` padded to ``width`` tokens, int64, on the tokens' device."""
        rows = rows.to(self.tokens.device)
        position = torch.arange(width, device=self.tokens.device)
        index = self.starts[rows][..., None] + position  # (B, C, W)
        index.masked_fill_(position >= self.widths[rows][..., None], len(self.tokens) - 1)
        x = self.tokens[index].long().permute(0, 1, 3, 2)  # (B, C, F, W)
        return x if self.choice else x[:, 0]

    def to(self, device: torch.device) -> Ragged:
        from soupkit.eval.prepare import place

        tokens = place(self.tokens, device)
        return Ragged(tokens, self.starts.to(tokens.device), self.widths.to(tokens.device), self.pad, self.choice)


@dataclass
class TextData:
    """A tokenised dataset: this process's shard, stored once (see the module docstring)."""

    name: str
    packed: Ragged
    lengths: torch.Tensor  # (n,) int64 on the CPU: tokens of each example (longest choice for multiple choice)
    labels: torch.Tensor | None  # (n,) int64 on the device; None for plain text (targets come from the tokens)
    total: int
    start: int
    class_subset: torch.Tensor | None = None
    metric: str = "accuracy"

    @property
    def n(self) -> int:
        return len(self.lengths)

    def order_for(self, batch_size: int, order: torch.Tensor | None) -> torch.Tensor:
        """The order batches take: longest first, or ``order`` length-sorted within windows of batches."""
        if order is None:
            return torch.sort(self.lengths, descending=True, stable=True).indices
        window = ORDER_WINDOW * batch_size
        parts = []
        for begin in range(0, len(order), window):
            part = order[begin:begin + window]
            parts.append(part[torch.sort(self.lengths[part], descending=True, stable=True).indices])
        return torch.cat(parts) if parts else order

    def inputs(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The int64 batch of examples ``rows``, cut to its longest example, on ``device``."""
        width = int(self.lengths[rows].max())
        return self.packed.gather(rows, width).to(device, non_blocking=True)

    def batches(self, batch_size: int, order: torch.Tensor, device: torch.device
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(int64 batch cut to its longest example, labels or shifted target tokens) on ``device``."""
        for begin in range(0, self.n, batch_size):
            rows = order[begin:begin + batch_size]
            x = self.inputs(rows, device)
            if self.labels is not None:
                yield x, self.labels[rows.to(self.labels.device)]
            else:
                yield x, x[:, 0, 1:].masked_fill(x[:, 1, 1:] == 0, -100)


def prepare_text(spec: DatasetSpec, records: Any, info: Any, device: torch.device, rank: int, world: int,
                 token_cache: Path | None = None) -> TextData:
    """Tokenise this process's shard of ``records`` (``soupkit.eval.data.text.TextRecords``) for the model
    described by ``info`` (``TextInfo``); one-line errors name the recipe field, or the file and line.

    ``token_cache``: a file (named by the score cache's dataset key, which covers the data file, the text keys,
    the model folder's config and tokenizer files) holding this shard's tokens from an earlier run; written
    when absent, so the next process (``soupkit eval`` after ``soupkit merge --method greedy``) skips
    tokenising."""
    mode = _mode(spec, records.fields, info.task)
    cached = _read_tokens(token_cache) if token_cache is not None else None
    if cached is None:
        cached = _tokenise(spec, records, info, mode, rank, world)
        if token_cache is not None:
            _write_tokens(token_cache, cached)
    packed, lengths, labels, total, start = cached
    subset = None
    if spec.class_subset is not None:
        if mode != "classification":
            raise RecipeError(f"{spec.where}.class_subset: applies to classifiers, not to a causal LM")
        if len(labels) and int(labels.max()) >= len(spec.class_subset):
            raise RecipeError(f"{spec.where}.class_subset: lists {len(spec.class_subset)} classes but a label is "
                              f"{int(labels.max())}")
        subset = torch.tensor(spec.class_subset, device=device)
    return TextData(spec.name, packed.to(device), lengths,
                    None if labels is None else labels.to(device), total, start, subset,
                    "log_likelihood" if mode == "text" else "accuracy")


def _tokenise(spec: DatasetSpec, records: Any, info: Any, mode: str, rank: int, world: int) -> tuple[Any, ...]:
    """(packed, lengths, labels or None, total, start) of this process's shard."""
    from soupkit.eval.prepare import select

    index = select(len(records), spec)
    total = len(records) if index is None else len(index)
    if total == 0:
        raise RecipeError(f"{spec.where}: the dataset has no examples ({records.file})")
    start, stop = total * rank // world, total * (rank + 1) // world
    chosen = (torch.arange(len(records)) if index is None else index)[start:stop].tolist()
    max_length = records.max_length or info.max_length
    if mode == "classification":
        packed, lengths, labels = _classification(records, chosen, info, max_length, spec)
    elif mode == "choice":
        packed, lengths, labels = _multiple_choice(records, chosen, info, max_length)
    else:
        packed, lengths, labels = _plain_text(records, chosen, info, max_length)
    return packed, lengths, labels, total, start


def _tokens_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    import hashlib

    fields = "|".join(f"{k}={meta[k]}" for k in ("total", "start", "pad", "choice"))  # not the provenance
    return hashlib.blake2b(f"{state_fingerprint(tensors)}|{fields}".encode(), digest_size=16).hexdigest()


def _read_tokens(path: Path) -> tuple[Any, ...] | None:
    """A token-cache file's tensors, or None when absent, unreadable or failing a check (then the data is
    tokenised again, the file rewritten, and a bad file said once): like a score-cache entry it carries a
    checksum, and its layout must be one ``_tokenise`` writes (every segment inside the tokens: a re-signed
    file cannot make a batch index past them)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        tokens, starts, widths, lengths = tensors["tokens"], tensors["starts"], tensors["widths"], tensors["lengths"]
        labels = tensors.get("labels")
        total, start = int(meta["total"]), int(meta["start"])
        pad = tuple(int(v) for v in json_list(meta["pad"]))
        ok = (meta.get("checksum") == _tokens_checksum(tensors, meta)
              and tokens.dtype == torch.int32 and tokens.dim() == 2 and len(pad) == tokens.shape[1]
              and tokens[-1].tolist() == list(pad)
              and starts.dtype == widths.dtype == lengths.dtype == torch.int64 and starts.dim() == 2
              and starts.shape == widths.shape and lengths.shape == (len(starts),)
              and (labels is None or labels.shape == lengths.shape)
              and bool((starts >= 0).all() and (widths >= 0).all())
              and bool((starts + widths <= len(tokens) - 1).all())
              and torch.equal(widths.amax(1) if widths.numel() else lengths, lengths)
              and 0 <= start <= start + len(lengths) <= total)
        packed = Ragged(tokens, starts, widths, pad, meta["choice"] == "1")
    except (OSError, KeyError, ValueError, RuntimeError, TypeError):
        ok = False
    if not ok:

        say_once("corrupt tokens", f"token cache: {path}: ignored (truncated or edited); tokenising again")
        return None
    return packed, lengths, labels, total, start


def json_list(text: str) -> list[Any]:
    import json

    value = json.loads(text)
    if not isinstance(value, list):
        raise ValueError("not a list")
    return value


def _write_tokens(path: Path, tokens: tuple[Any, ...]) -> None:
    import json

    packed, lengths, labels, total, start = tokens
    state = {"tokens": packed.tokens, "starts": packed.starts, "widths": packed.widths, "lengths": lengths,
             **({"labels": labels} if labels is not None else {})}
    meta = {"total": str(total), "start": str(start), "pad": json.dumps(list(packed.pad)),
            "choice": "1" if packed.choice else "0"}
    meta["checksum"] = _tokens_checksum(state, meta)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(state, path, meta, force=True)
    except (OSError, SoupkitError) as error:  # a read-only or full cache disk must not fail an evaluation
        say_once("unwritable", f"score cache: cannot write {path}: {error}; scores are computed but not stored")


#: per scoring mode: the fields it needs and those it may also take
_FIELDS = {"classification": (("text_field", "label_field"), ("text_pair_field",)),
           "choice": (("prompt_field", "choices_field", "answer_field"), ()),
           "text": (("text_field",), ())}


def _mode(spec: DatasetSpec, fields: dict[str, str | None], task: str) -> str:
    return scoring_mode(spec.where, fields, task)


def scoring_mode(where: str, fields: dict[str, str | None], task: str) -> str:
    """classification | choice | text, from the model's task and the fields the dataset names (checked: the
    data readers call it before reading a row, so a recipe naming the wrong fields fails first)."""
    given = sorted(k for k, v in fields.items() if v is not None)
    if task == "sequence-classification":
        mode = "classification"
    elif any(fields.get(k) for k in _FIELDS["choice"][0]):
        mode = "choice"
    else:
        mode = "text"
    need, optional = _FIELDS[mode]
    allowed = {*need, *optional}
    missing = [k for k in need if fields.get(k) is None]
    if missing:
        usage = ("text_field and label_field (text_pair_field optional)" if task == "sequence-classification"
                 else "prompt_field, choices_field and answer_field (multiple choice) or text_field alone "
                      "(log-likelihood)")
        raise RecipeError(f"{where}.{missing[0]}: missing; a {task} model scores {usage}")
    extra = [k for k in given if k not in allowed]
    if extra:
        raise RecipeError(f"{where}.{extra[0]}: not used with a {task} model and {', '.join(need)}; "
                          "remove it")
    return mode


def _field(records: Any, i: int, key: str) -> Any:
    """Row ``i``'s value of field ``key`` (the data reader checked that it is there and of a plain type)."""
    return records.value(i, key)


def _text(records: Any, i: int, key: str) -> str:
    value = _field(records, i, key)
    if not isinstance(value, str):
        raise RecipeError(f"{records.at(i)}: field {records.fields[key]!r} must be text, got {shown(value)}")
    return value


def _class_id(records: Any, i: int, info: Any) -> int:
    """An integer label, or a label name through the config's ``label2id`` (CSV digits count as integers)."""
    value = _field(records, i, "label_field")
    name = records.fields["label_field"]
    if isinstance(value, str) and value in (info.label2id or {}):
        value = info.label2id[value]
    index = parse_index(value)
    if index is None:
        known = ", ".join(sorted(info.label2id or {})) or "none"
        raise RecipeError(f"{records.at(i)}: label {shown(value)} in {name!r} is neither a class id nor a label "
                          f"of the model config's label2id ({shown(known, 120)[1:-1]})")
    if not 0 <= index < info.num_labels:
        raise RecipeError(f"{records.at(i)}: label {index} in {name!r} is outside the model's {info.num_labels} "
                          "classes")
    return index


def _ragged(examples: list[list[list[list[int]]]], pad: list[int], choice: bool) -> tuple[Ragged, torch.Tensor]:
    """Examples (each a list of choices, each F token rows) stored end to end, and each example's length (its
    longest choice)."""
    choices = max((len(e) for e in examples), default=1)
    starts = torch.zeros(len(examples), choices, dtype=torch.int64)
    widths = torch.zeros(len(examples), choices, dtype=torch.int64)
    position = 0
    for i, example in enumerate(examples):
        for c, rows in enumerate(example):
            starts[i, c], widths[i, c] = position, len(rows[0])
            position += len(rows[0])
    tokens = torch.empty(position + 1, len(pad), dtype=torch.int32)
    for f in range(len(pad)):
        flat = [value for example in examples for rows in example for value in rows[f]]
        tokens[:position, f] = torch.tensor(flat, dtype=torch.int32)
    tokens[position] = torch.tensor(pad, dtype=torch.int32)
    lengths = widths.amax(1) if len(examples) else torch.zeros(0, dtype=torch.int64)
    return Ragged(tokens, starts, widths, tuple(pad), choice), lengths


def _pack(rows: list[list[list[int]]], pad: list[int]) -> tuple[Ragged, torch.Tensor]:
    """Examples of F token rows each, padded with ``pad[f]`` per row when batched, and their lengths."""
    return _ragged([[example] for example in rows], pad, choice=False)


def _classification(records: Any, chosen: list[int], info: Any, max_length: int, spec: DatasetSpec
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # only max_length tokens are kept (the first, or the last when the tokenizer truncates on the left): a
    # 16 MB text is never tokenised whole
    cut = max_length * PROMPT_CHARS_PER_TOKEN
    keep = slice(-cut, None) if getattr(info.tokenizer, "truncation_side", "right") == "left" else slice(cut)
    texts = [_text(records, i, "text_field")[keep] for i in chosen]
    pairs = ([_text(records, i, "text_pair_field")[keep] for i in chosen] if records.fields["text_pair_field"]
             else None)
    labels = torch.tensor([_class_id(records, i, info) for i in chosen], dtype=torch.int64)
    enc = info.tokenizer(texts, pairs, truncation=True, max_length=max_length) if texts else {"input_ids": []}
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in enc else [])
    rows = [[enc[k][j] for k in keys] for j in range(len(texts))]
    packed, lengths = _pack(rows, [info.pad_id, 0, 0][: len(keys)])
    return packed, lengths, labels


def _prefix(info: Any) -> list[int]:
    """The token before an empty prompt or a plain text: BOS, else EOS (as lm-eval-harness), else none."""
    tok = info.tokenizer
    first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return [] if first is None else [int(first)]


def _multiple_choice(records: Any, chosen: list[int], info: Any, max_length: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    encode = info.tokenizer
    examples, answers = [], []
    for i in chosen:
        prompt = _text(records, i, "prompt_field")
        choices = _choices(records, i)
        answers.append(_answer(records, i, choices))
        if len(prompt) > max_length * PROMPT_CHARS_PER_TOKEN:  # only its last max_length tokens are kept
            prompt = prompt[-max_length * PROMPT_CHARS_PER_TOKEN:]
        context = prompt.rstrip()  # trailing spaces belong to the choice (lm-eval-harness)
        whole = encode([prompt + c for c in choices], add_special_tokens=False)["input_ids"]
        context_ids = encode(context, add_special_tokens=False)["input_ids"] if context else []
        rows = []
        for ids in whole:
            head, tail = context_ids, ids[len(context_ids):]
            head = head or _prefix(info)
            if not tail or not head:
                raise RecipeError(f"{records.at(i)}: choice {len(rows)} gives no tokens to score (empty choice, "
                                  "or an empty prompt and a tokenizer with neither BOS nor EOS)")
            sequence = (head + tail)[-max_length:]
            scored = min(len(tail), len(sequence) - 1)
            rows.append([sequence, [1] * len(sequence), [0] * (len(sequence) - scored) + [1] * scored])
        examples.append(rows)
    return (*_pack_choices(examples, info.pad_id), torch.tensor(answers, dtype=torch.int64))


def _pack_choices(examples: list[list[list[list[int]]]], pad: int) -> tuple[Ragged, torch.Tensor]:
    return _ragged(examples, [pad, 0, 0], choice=True)


def _choices(records: Any, i: int) -> list[str]:
    import json

    value = _field(records, i, "choices_field")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # not JSON, a 5,000-digit number, nested too deeply
            pass
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(c, str) for c in value)):
        raise RecipeError(f"{records.at(i)}: field {records.fields['choices_field']!r} must be a non-empty list "
                          f"of strings (in CSV, a JSON list), got {shown(value)}")
    if len(value) > MAX_CHOICES:
        raise RecipeError(f"{records.at(i)}: field {records.fields['choices_field']!r} has {len(value)} choices "
                          f"(at most {MAX_CHOICES})")
    return list(value)


def _answer(records: Any, i: int, choices: list[str]) -> int:
    value = _field(records, i, "answer_field")
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    index = parse_index(value)
    if index is None or not 0 <= index < len(choices):
        raise RecipeError(f"{records.at(i)}: answer {shown(value)} in {records.fields['answer_field']!r} is "
                          f"neither a choice index (0..{len(choices) - 1}) nor one of the choices")
    return index


def _plain_text(records: Any, chosen: list[int], info: Any, max_length: int
                ) -> tuple[torch.Tensor, torch.Tensor, None]:
    cut = max_length * PROMPT_CHARS_PER_TOKEN  # the start is kept: its first max_length tokens
    texts = [_text(records, i, "text_field")[:cut] for i in chosen]
    encoded = info.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    prefix = _prefix(info)
    rows = []
    for i, ids in zip(chosen, encoded):
        sequence = (prefix + ids)[:max_length]
        if len(sequence) < 2:
            raise RecipeError(f"{records.at(i)}: the text gives no token to score (empty, or a single token "
                              "and a tokenizer with neither BOS nor EOS)")
        rows.append([sequence, [1] * len(sequence)])
    packed, lengths = _pack(rows, [info.pad_id, 0])
    return packed, lengths, None
