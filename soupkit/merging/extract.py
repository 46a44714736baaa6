"""LoRA extraction: the PEFT adapter that best approximates a fine-tune's update ``FT - BASE``, module by module
(``soupkit extract-lora``; mergekit's ``mergekit-extract-lora``).

Each adaptable module's update is factorised by truncated SVD (``io.lora.refactor_lora``: the best rank-R
approximation, Eckart-Young), and its relative error ``||dW - B A|| / ||dW||`` is reported. What is adapted
follows mergekit-extract-lora, read from the model's modules where the folder has a ``config.json`` (built on the
meta device: no memory, no weights):

- ``nn.Linear``, ``nn.Conv1d/2d`` and transformers' ``Conv1D`` (GPT-2's, ``fan_in_fan_out``; mergekit saves those
  at full rank instead) get LoRA factors;
- embeddings (``nn.Embedding``, the output embeddings) go to ``modules_to_save`` at full rank, as mergekit does,
  or get LoRA factors with ``embed_lora=True``, except where peft cannot adapt them: tied to the head (saved
  whole, the head's copy beside them, ``ensure_weight_tying``), or beside changed biases (peft's ``lora_bias`` has
  no embedding layer);
- every other module with weights (norms) goes to ``modules_to_save`` whole.

Without a ``config.json``: a 2-D ``*.weight`` is a linear layer, a name holding ``embed``/``wte``/``wpe`` an
embedding, ``lm_head`` the head, the rest (norms) is saved whole. Unlike mergekit, modules the fine-tune left
unchanged are not written (peft keeps the base's), and a changed bias of an adapted module is peft's
``lora_B.bias`` (``lora_bias: true``; mergekit writes that tensor without the flag). Every module's rank is
``min(rank, rows, cols)``; ``r`` is the most common one, the others in ``rank_pattern`` (alpha = r: scale 1, as
mergekit). Cost: one SVD per module, O(rows * cols * min(rows, cols)) in float64.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import IncompatibleCheckpointsError, ParameterError, SoupkitError
from soupkit.io import input_files, open_checkpoint
from soupkit.io.foreign_code import NO_REMOTE_CODE, forbid_remote_code_prompts, refuse_foreign_code
from soupkit.io.hf_folder import hf_folder_of
from soupkit.io.lora import LoraModule, _adapter_config, _factor_tensors, _write_adapter, refactor_lora
from soupkit.io.small_files import read_json_file
from soupkit.merging.engine import check_compatible, resolve_device

__all__ = ["ExtractedLora", "extract_lora"]

_EMBEDDING_NAME = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:\.|$)|word_embeddings")
_PEFT_PREFIX = "base_model.model."
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
               ("ForConditionalGeneration", "SEQ_2_SEQ_LM"))


@dataclass
class ExtractedLora:
    """What ``extract_lora`` wrote: the adapter folder, each adapted module's rank and relative error
    ``||dW - B A|| / ||dW||`` (by weight name), the overall error (energy-weighted), the weights saved whole
    (``modules_to_save``) and those left out because the fine-tune did not change them."""

    folder: Path
    ranks: dict[str, int]
    errors: dict[str, float]
    shapes: dict[str, tuple[int, ...]]
    relative_error: float
    saved_whole: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def _module_kinds(folder: Path | None) -> dict[str, str] | None:
    """Module name -> "linear", "conv1d" (transformers' Conv1D), "conv", "embedding", "head" (the output
    embeddings, a linear layer) or "other", from the model
    that ``folder``'s config.json describes (on the meta device); None without one."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    import transformers
    from torch import nn

    refuse_foreign_code(folder, "extract-lora")  # the folder's config names no code of its own
    forbid_remote_code_prompts()
    config = transformers.AutoConfig.from_pretrained(folder, **NO_REMOTE_CODE)
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        return None
    with torch.device("meta"):
        model = model_class(config)
    head = model.get_output_embeddings()
    from transformers.pytorch_utils import Conv1D

    kinds = {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        elif module is head:
            kinds[name] = "head"
        elif isinstance(module, nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            kinds[name] = "conv"
        else:
            kinds[name] = "other"
    return kinds


def _guess_kind(key: str, shape: tuple[int, ...]) -> str:
    if re.search(r"(?:^|\.)lm_head\.", key):
        return "head"
    if _EMBEDDING_NAME.search(key):
        return "embedding"
    return "linear" if key.endswith(".weight") and len(shape) == 2 else "other"


def _bias_changed(tuned: Any, original: Any, infos: dict[str, Any], kinds: dict[str, str] | None) -> bool:
    """Whether any adaptable layer's bias changed (then peft's lora_bias is on, which it has no embedding
    layer for: the embeddings are saved whole)."""
    for key, info in infos.items():
        module, _, leaf = key.rpartition(".")
        weight = infos.get(f"{module}.weight")
        if leaf != "bias" or weight is None or len(weight.shape) < 2 or not info.is_float:
            continue
        kind = kinds.get(module, "other") if kinds is not None else _guess_kind(f"{module}.weight", weight.shape)
        if kind in ("linear", "conv1d", "conv") and not torch.equal(tuned.get(key), original.get(key)):
            return True
    return False


def _task_type(folder: Path | None) -> str | None:

    try:
        names = (read_json_file(folder, "config.json") or {}).get("architectures") or [] if folder else []
    except (OSError, ValueError, SoupkitError):
        return None
    return next((task for suffix, task in _TASK_TYPES for n in names if str(n).endswith(suffix)), None)


def extract_lora(finetuned: str | Path, base: str | Path, output: str | Path, rank: int, *,
                 embed_lora: bool = False, device: str = "cpu", force: bool = False) -> ExtractedLora:
    """Write the rank-``rank`` LoRA adapter (a peft folder) closest to ``finetuned - base`` at ``output``.

    ``finetuned`` and ``base``: checkpoints or Hugging Face folders of the same architecture. ``embed_lora``:
    factorise the embeddings too (default: save them whole, as mergekit). ``device``: where the SVDs run
    (``cuda`` for large models). Everything is checked before any tensor is read; the folder appears whole or
    not at all."""

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ParameterError(f"--rank must be a positive integer, got {rank!r}")
    try:
        run_on = resolve_device(device)
    except RuntimeError:  # torch's own parse error lists every device type it knows
        raise ParameterError(f"--device: {device!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    tuned, original = open_checkpoint(finetuned), open_checkpoint(base)
    try:
        keys = check_compatible([tuned], allow_missing=False, base=original)
        tied = tuned.tied_keys()  # alias -> canonical (a tied lm_head)
        folder = hf_folder_of(Path(finetuned)) if isinstance(finetuned, (str, Path)) else None
        plan = _extraction_plan(tuned, original, keys, tied, folder, embed_lora)
        protect = [p for r in (tuned, original) for p in input_files(r)]
        done = _Extraction(rank, run_on)
        for key, (module, kind) in plan.items():
            done.add(key, module, kind, tuned.get(key), original.get(key))
        done.finish(tuned, tied)
        if not done.ranks and not done.saved_whole:
            raise IncompatibleCheckpointsError(f"{tuned.name}: no tensor differs from {original.name}; there is no "
                                               f"update to extract")
        config = done.adapter_config(str(base), folder, plan, tied)
        meta = {"soupkit.extract": f"rank {rank}", "soupkit.finetuned": str(finetuned), "soupkit.base": str(base)}
        written = _write_adapter(output, done.tensors, config, meta, template=folder, protect=protect, force=force)
        return ExtractedLora(written, done.ranks, done.errors, done.shapes, done.overall(), done.saved_whole,
                             done.unchanged)
    finally:
        tuned.close()
        original.close()


def _extraction_plan(tuned: Any, original: Any, keys: list[str], tied: dict[str, str], folder: Path | None,
                     embed_lora: bool) -> dict[str, tuple[str, str]]:
    """Tensor key -> (module name, kind): how each floating tensor is extracted (``other``: saved whole)."""
    kinds = _module_kinds(folder)
    infos = tuned.infos()
    factorise_embeddings = embed_lora and not tied and not _bias_changed(tuned, original, infos, kinds)

    def kind_of(module: str) -> str:
        weight = f"{module}.weight"
        if weight not in infos or len(infos[weight].shape) < 2:
            return "other"
        kind = kinds.get(module, "other") if kinds is not None else _guess_kind(weight, infos[weight].shape)
        if kind in ("embedding", "head"):  # saved whole, as mergekit does, unless asked to factorise them
            return "other" if not factorise_embeddings else "linear" if kind == "head" else kind
        return kind

    plan: dict[str, tuple[str, str]] = {}
    for key in keys:
        if key in tied or not infos[key].is_float:
            continue
        module, _, leaf = key.rpartition(".")
        kind = kind_of(module)
        if leaf != "weight":
            kind = "bias" if leaf == "bias" and kind in ("linear", "conv1d", "conv") else "other"
        plan[key] = (module, kind)
    return plan


class _Extraction:
    """The adapter being built: factors per module, tensors saved whole, unchanged ones, errors."""

    def __init__(self, rank: int, device: Any):
        self.rank, self.device = rank, device
        self.tensors: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}
        self.errors: dict[str, float] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.modules: list[Any] = []
        self.saved_whole: list[str] = []
        self.unchanged: list[str] = []
        self.pending: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}  # changed biases of adaptable modules
        self.num = self.den = 0.0

    def add(self, key: str, module: str, kind: str, new: torch.Tensor, old: torch.Tensor) -> None:

        delta = new.to(self.device, torch.float64) - old.to(self.device, torch.float64)
        if not bool(delta.any()):
            self.unchanged.append(key)
            return
        if kind == "other":
            self.tensors[_PEFT_PREFIX + key] = new
            self.saved_whole.append(key)
            return
        if kind == "bias":
            self.pending[module] = (key, delta.to("cpu", new.dtype), new)
            return
        transposed = kind in ("conv1d", "embedding")  # peft computes (B @ A).T for these
        left, right, self.errors[key] = refactor_lora(delta, self.rank)
        energy = float(delta.square().sum())
        self.num, self.den = self.num + self.errors[key] ** 2 * energy, self.den + energy
        self.ranks[key] = right.shape[0]
        self.shapes[key] = tuple(new.shape)
        layout = LoraModule(key=key, module=module, a_key="", b_key="", kind="conv" if kind == "conv" else (
            "embedding" if kind == "embedding" else "linear"), transposed=transposed, rank=self.ranks[key],
            alpha=float(self.ranks[key]), scale=1.0, shape=tuple(delta.shape), dtype=new.dtype)
        self.modules.append(layout)
        if transposed:  # peft computes (B @ A).T for these: B @ A = dW.T = right.T @ left.T
            left, right = right.T, left.T
        self.tensors.update(_factor_tensors(layout, left.cpu(), right.cpu(), new.dtype, _PEFT_PREFIX))

    def finish(self, tuned: Any, tied: dict[str, str]) -> None:
        """Bias updates (on lora_B, or the module saved whole) and tied heads saved with their embeddings."""
        for module, (key, delta, new) in self.pending.items():
            weight = f"{module}.weight"
            if weight in self.ranks:  # peft's lora_bias: the bias update rides on lora_B
                self.tensors[f"{_PEFT_PREFIX}{module}.lora_B.bias"] = delta
                continue
            self.tensors[_PEFT_PREFIX + key] = new  # a bias-only change: the module is saved whole
            self.saved_whole.append(key)
            if weight in self.unchanged:
                self.unchanged.remove(weight)
                self.tensors[_PEFT_PREFIX + weight] = tuned.get(weight)
                self.saved_whole.append(weight)
        for alias, canonical in sorted(tied.items()):  # a tied head is saved with its embeddings, and tied again
            if canonical in self.saved_whole:
                self.tensors[_PEFT_PREFIX + alias] = self.tensors[_PEFT_PREFIX + canonical]
                self.saved_whole.append(alias)

    def adapter_config(self, base: str, folder: Path | None, plan: dict[str, tuple[str, str]],
                       tied: dict[str, str]) -> dict[str, Any]:

        biases = any(k.endswith(".lora_B.bias") for k in self.tensors)
        template = {"peft_type": "LORA", "task_type": _task_type(folder), "base_model_name_or_path": base,
                    "bias": "none", "lora_dropout": 0.0, "inference_mode": True, "init_lora_weights": True,
                    "fan_in_fan_out": any(k == "conv1d" for _, k in plan.values()), "lora_bias": biases,
                    # a tied lm_head must follow the adapted embeddings (else it keeps the base's)
                    "ensure_weight_tying": bool(tied),
                    # full module names: peft matches them as suffixes, and a bare "norm" would take every norm
                    "modules_to_save": sorted({k.rpartition(".")[0] for k in self.saved_whole}) or None}
        if self.ranks:
            return _adapter_config(template, self.ranks, self.modules)
        return {**template, "r": 1, "lora_alpha": 1, "target_modules": []}

    def overall(self) -> float:
        """The relative error of the whole update (energy-weighted over the factorised modules)."""
        return math.sqrt(self.num / self.den) if self.den else 0.0
