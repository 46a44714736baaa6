"""``kind: transformers``: a Hugging Face transformers model built from a local folder's ``config.json`` (never
the hub), with the folder's tokenizer, for text recipes.

```yaml
model: {kind: transformers, path: base_folder, task: sequence-classification}   # or causal-lm
```

The architecture comes from the config (``AutoModelForSequenceClassification`` / ``AutoModelForCausalLM``
``.from_config``, random weights; transformers is imported only when one is built); every checkpoint the
evaluator scores is loaded into it, strictly. The module the evaluator runs is a
``soupkit.eval.text.TextTaskModel``: it takes one packed integer tensor per batch and returns what the
evaluator, learned soups and Fisher information need —

- ``sequence-classification``: class logits (B, num_labels);
- ``causal-lm`` multiple choice: (B, choices) summed log-likelihoods of each choice's tokens given the prompt
  (lm-eval-harness ``acc``); absent choices of an example with fewer choices score -1e9;
- ``causal-lm`` plain text: token logits (B, vocab, T-1) against the shifted tokens, so that
  ``cross_entropy(logits, targets)`` with ``-100`` padding is the mean per-token negative log-likelihood.

Its parameters and state-dict keys are exactly the wrapped transformers model's, so checkpoints written by
``save_pretrained``, ``torch.save(model.state_dict())`` or soupkit load as they are. A weight tied to another
(``lm_head.weight`` to the input embeddings when ``tie_word_embeddings``) is left out of the state dict, as
``save_pretrained`` does; a checkpoint that carries it anyway is accepted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from soupkit.errors import RecipeError
from soupkit.eval.models import BuildContext, BuiltModel
from soupkit.eval.registry import model_adapter
from soupkit.eval.tokenizer_check import check_tokenizer_files
from soupkit.io.foreign_code import NO_REMOTE_CODE, forbid_remote_code_prompts, refuse_foreign_code
from soupkit.io.small_files import MAX_COPY_BYTES, check_small_file, read_small_file

#: files of a model folder whose bytes define the architecture and the tokenisation (part of the score-cache key)
_DEFINING_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


@dataclass
class TextInfo:
    """What text preparation needs from the model: its task, tokenizer, default max length and pad id."""

    task: str
    tokenizer: Any
    config: Any
    max_length: int
    pad_id: int
    num_labels: int | None = None
    label2id: dict[str, int] | None = None


def folder_fingerprint(path: Path) -> str:
    """blake2b over the folder's config and tokenizer files: a changed vocabulary or config rescores. Every
    small file transformers may read is checked first (``soupkit.io.small_files``: a regular file inside the
    folder), so a ``tokenizer.json`` linked out of the folder is refused before transformers could follow it."""

    for name in sorted(os.listdir(path)):
        if not name.startswith(".") and not name.endswith(_WEIGHT_SUFFIXES) and not (path / name).is_dir():
            check_small_file(path, name, limit=MAX_COPY_BYTES if name in _DEFINING_FILES else 2**63)
    digest = hashlib.blake2b(digest_size=16)
    for name in _DEFINING_FILES:
        data = read_small_file(path, name, limit=MAX_COPY_BYTES)
        if data is not None:
            digest.update(name.encode() + b"\0" + data)
    return digest.hexdigest()


#: weight files that make a model folder the base LoRA adapters are applied to
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
#: weights are read by soupkit's own checkpoint readers, under their own policy (SECURITY.md)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".h5", ".msgpack", ".gguf")


@model_adapter("transformers")
def transformers_model(path: Path, task: Literal["sequence-classification", "causal-lm"], *,
                       context: BuildContext) -> BuiltModel:
    """A transformers model from a local folder's ``config.json`` and tokenizer files (never the hub); weights
    come from the checkpoints scored."""
    where = context.where
    if not (path / "config.json").exists() and not (path / "config.json").is_symlink():
        raise RecipeError(f"{where}.path: {path} has no config.json (a transformers model folder: config.json "
                          "and tokenizer files, e.g. written by save_pretrained)")
    refuse_foreign_code(path, f"{where}.path")
    check_tokenizer_files(path, f"{where}.path")  # sizes and regexes, before the tokenizers library parses them
    fingerprint = folder_fingerprint(path)  # before transformers opens any of the folder's files
    import transformers

    forbid_remote_code_prompts()
    config = _load_local(transformers.AutoConfig, path, f"{where}.path", "config")
    tokenizer = _load_local(transformers.AutoTokenizer, path, f"{where}.path", "tokenizer")
    auto = (transformers.AutoModelForSequenceClassification if task == "sequence-classification"
            else transformers.AutoModelForCausalLM)
    pad_id = _pad_id(tokenizer, config, task, where)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # random weights from a config are expected, not news
    try:
        model = auto.from_config(config, trust_remote_code=False)
    except ValueError as error:
        first = str(error).strip().splitlines()[0]
        raise RecipeError(f"{where}.task: {config.model_type} has no {task} head in transformers ({first})"
                          ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    info = TextInfo(task, tokenizer, config, _max_length(tokenizer, config), pad_id)
    if task == "sequence-classification":
        info.num_labels = int(config.num_labels)
        info.label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}

    # cycle: soupkit.eval.text -> eval.data (its kinds) -> eval.models (every kind, this module) -> eval.text
    from soupkit.eval.text import TextTaskModel

    module = TextTaskModel(model, task)
    weights = next((path for name in _WEIGHT_FILES if (path / name).is_file()), None)
    return BuiltModel(module, text=info, fingerprint=fingerprint, base_weights=weights)


def _load_local(auto: Any, path: Path, where: str, what: str) -> Any:
    try:
        return auto.from_pretrained(str(path), **NO_REMOTE_CODE)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"{where}: cannot load the {what} from {path} ({first})") from None


def _pad_id(tokenizer: Any, config: Any, task: str, where: str) -> int:
    """The id padding positions hold. Sequence classifiers that pool the last non-pad token (GPT-2, Llama) find
    it by ``config.pad_token_id``, so for them that id comes first (and is set when missing)."""
    candidates = [tokenizer.pad_token_id, getattr(config, "pad_token_id", None), tokenizer.eos_token_id]
    if task == "sequence-classification":
        candidates.insert(0, getattr(config, "pad_token_id", None))
    pad = next((c for c in candidates if c is not None), None)
    if pad is None:
        if task == "sequence-classification":
            raise RecipeError(f"{where}.path: the tokenizer has no pad token and config.json no pad_token_id; "
                              "set one (e.g. pad_token_id = eos_token_id) so batches can be padded")
        pad = 0  # causal LM: padded positions are masked out and never scored
    if task == "sequence-classification" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = int(pad)
    return int(pad)


def _max_length(tokenizer: Any, config: Any) -> int:
    """The tokenizer's ``model_max_length`` unless unset (a huge sentinel), capped by the position table."""
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < 1_000_000 else []
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    return min(limits) if limits else 512
