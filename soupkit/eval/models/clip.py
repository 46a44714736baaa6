"""``kind: open_clip``: a CLIP image encoder plus a zero-shot classification head, built the WiSE-FT way.

For every class, each prompt template is encoded and L2-normalised, the template embeddings are averaged and
normalised again (open_clip's ``build_zero_shot_classifier`` does exactly this), and the result is scaled by the
model's logit scale (``logit_scale.exp()``, 100 for OpenAI's weights). The classifier L2-normalises image
features before the linear head, so its logits equal CLIP's ``scale * cos(image, class)``.

State-dict layout of the classifier (what ``soupkit zeroshot`` writes and fine-tuned checkpoints must match):
``visual.*`` (open_clip's image tower, same names as in the CLIP checkpoint) + ``head.weight`` (classes x dim)
+ ``head.bias`` (zeros).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soupkit.errors import ParameterError, RecipeError
from soupkit.eval.models import BuildContext, BuiltModel
from soupkit.eval.registry import model_adapter, resolve_path
from soupkit.io.foreign_code import forbid_remote_code_prompts, refuse_foreign_code, refuse_source_prefix
from soupkit.merging.api import write_checkpoint
from soupkit.merging.writers import ZEROSHOT, plan_targets

TEMPLATE_SETS = ("openai", "simple")


def _classifier_type() -> Any:
    import torch
    from torch import nn

    class ZeroShotClassifier(nn.Module):
        """Image encoder -> L2-normalised features -> linear head."""

        def __init__(self, visual: nn.Module, weight: torch.Tensor):
            super().__init__()
            self.visual = visual
            self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
            with torch.no_grad():
                self.head.weight.copy_(weight)
                self.head.bias.zero_()

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            features = self.visual(images)
            if isinstance(features, tuple):  # towers configured to also return tokens
                features = features[0]
            features = features / features.norm(dim=-1, keepdim=True)
            return self.head(features)

    return ZeroShotClassifier


def read_classes(classes: str | Path | Sequence[str], folder: Path, where: str) -> list[str]:
    """``imagenet`` (open_clip's 1000 names), a list of names, or a text file with one name per line."""
    import open_clip

    if isinstance(classes, str) and classes == "imagenet":
        return list(open_clip.IMAGENET_CLASSNAMES)
    if isinstance(classes, (str, Path)):
        path = resolve_path(classes, folder, where)
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError:
            raise RecipeError(f"{where}: {path} is not a readable class-name file (or say 'imagenet')") from None
    else:
        names = [str(c) for c in classes]
    if not names:
        raise RecipeError(f"{where}: no class names")
    return names


def read_templates(templates: str | Path | Sequence[str], folder: Path, where: str) -> list[Any]:
    """``openai`` (the 80 ImageNet prompts), ``simple``, a list of ``"a photo of a {}."`` strings or a file."""
    import open_clip

    if templates == "openai":
        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    if templates == "simple":
        return list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    if isinstance(templates, (str, Path)):
        path = resolve_path(templates, folder, where)
        if not path.is_file():
            raise RecipeError(f"{where}: expected {' or '.join(TEMPLATE_SETS)}, a list of templates or a file of "
                              f"them, got {str(templates)!r}")
        found = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        found = [str(t) for t in templates]
    if not found or any("{}" not in t for t in found):
        raise RecipeError(f"{where}: every template needs a '{{}}' where the class name goes")
    return found


def create_clip(name: str, weights: Path | None, config: Path | None, where: str) -> tuple[Any, Any]:
    """(CLIP model, eval transform), randomly initialised or from a local weights file. ``config`` registers a
    model-config JSON (named by its file stem) first, for architectures open_clip does not ship."""
    import open_clip

    refuse_source_prefix(name, f"{where}.name", "open_clip")
    if config is not None:
        if not config.is_file():
            raise RecipeError(f"{where}.config: {config} does not exist")
        open_clip.add_model_config(config)
    if name not in open_clip.list_models():
        from soupkit.errors import unknown_choice

        raise RecipeError(f"{where}.name: {unknown_choice('open_clip model', name, open_clip.list_models())}")
    _refuse_hf_text_tower(open_clip.get_model_config(name) or {}, name, where)
    if weights is not None and not weights.exists():
        raise RecipeError(f"{where}.weights: {weights} does not exist")
    import logging

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs a warning for every randomly initialised model
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    finally:
        logging.getLogger().setLevel(quiet)
    if weights is not None:
        from soupkit.io import load_checkpoint

        state = load_checkpoint(weights)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise RecipeError(f"{where}.weights: {weights} is not a {name} CLIP checkpoint (missing "
                              f"{result.missing_keys[:3]})")
    return model.eval(), preprocess


def _refuse_hf_text_tower(model_config: dict[str, Any], name: str, where: str) -> None:
    """A text tower from Hugging Face (``text_cfg.hf_model_name`` / ``hf_tokenizer_name``) must be a local folder
    that ships no code: open_clip loads it with ``AutoConfig.from_pretrained`` and no ``trust_remote_code``."""
    text = model_config.get("text_cfg") or {}
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text.get(key)
        if not value:
            continue
        folder = Path(str(value))
        if not folder.is_dir():
            raise RecipeError(f"{where}.name: open_clip model {name!r} needs the Hugging Face model {value!r} "
                              f"(text_cfg.{key}); soupkit loads nothing from the hub: point it at a local folder")
        refuse_foreign_code(folder, f"{where}.name ({name} text_cfg.{key})")
        forbid_remote_code_prompts()


def zeroshot_weights(model: Any, name: str, classes: list[str], templates: list[Any], device: Any) -> Any:
    """The (classes x dim) head weight: open_clip's normalised template average, times the logit scale."""
    import open_clip
    import torch

    tokenizer = open_clip.get_tokenizer(name)
    model = model.to(device)
    with torch.inference_mode():
        per_class = open_clip.build_zero_shot_classifier(model, tokenizer, classes, templates, device=device)
        return (per_class.T * model.logit_scale.exp()).float().cpu()


def build_classifier(name: str, classes: list[str], templates: list[Any], weights: Path | None,
                     config: Path | None, zeroshot_head: bool, device: Any, where: str) -> tuple[Any, Any]:
    import torch

    model, preprocess = create_clip(name, weights, config, where)
    dim = model.visual.output_dim
    if zeroshot_head:
        head = zeroshot_weights(model, name, classes, templates, device)
    else:  # the checkpoints evaluated carry their own head; skip encoding len(classes) x len(templates) prompts
        head = torch.zeros(len(classes), dim)
    return _classifier_type()(model.visual, head).eval(), preprocess


@model_adapter("open_clip")
def open_clip_model(name: str, classes: list[str] | str = "imagenet", templates: list[str] | str = "openai",
                    weights: Path | None = None, config: Path | None = None, zeroshot_head: bool = False, *,
                    context: BuildContext) -> BuiltModel:
    """An open_clip image encoder + linear head over ``classes``. The head is computed from ``templates`` only
    with ``zeroshot_head: true`` (evaluated checkpoints, e.g. from ``soupkit zeroshot``, carry their own)."""
    class_names = read_classes(classes, context.folder, f"{context.where}.classes")
    prompts = read_templates(templates, context.folder, f"{context.where}.templates") if zeroshot_head else []
    module, preprocess = build_classifier(name, class_names, prompts, weights, config, zeroshot_head,
                                          context.device or "cpu", context.where)
    size = module.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    return BuiltModel(module, transform=preprocess, input_size=(3, *size))


#: what ``soupkit zeroshot`` honours: it writes a model it builds, so no input is read and nothing is merged
def zeroshot_checkpoint(model: str, classes: str | Path | Sequence[str] = "imagenet",
                        templates: str | Path | Sequence[str] = "openai", weights: str | Path | None = None,
                        output: str | Path = "zeroshot.safetensors", *, config: str | Path | None = None,
                        **options: Any) -> Path:
    """Write the zero-shot classifier (image encoder + head, see the module docstring) of an open_clip model as a
    checkpoint, the starting point of WiSE-FT and of fine-tuned ingredients. Returns the written path.
    ``options``: the output options (``device`` also encodes the prompts; default: cuda when available)."""
    from soupkit.options import resolve_device, split_options

    opts, rest = split_options(options)
    if rest:
        raise ParameterError(f"zeroshot has no option {next(iter(rest))!r}")
    # the output's form and options checked before the model is built (write_checkpoint checks them again)
    plan_targets([output], [], [Path(weights)] if weights else [], opts, command=ZEROSHOT)
    folder = Path.cwd()
    class_names = read_classes(classes, folder, "--classes")
    prompts = read_templates(templates, folder, "--templates")
    dev = resolve_device(opts.device if "device" in opts.changed() else "auto")
    module, _ = build_classifier(model, class_names, prompts, None if weights is None else Path(weights),
                                 None if config is None else Path(config), True, dev, "--model")
    metadata = {"soupkit.zeroshot.model": model, "soupkit.zeroshot.classes": str(len(class_names)),
                "soupkit.zeroshot.templates": str(len(prompts)),
                "soupkit.zeroshot.weights": Path(weights).name if weights else "random-init"}
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return write_checkpoint(state, output, record_as="zeroshot", metadata=metadata, command=ZEROSHOT,
                            options=opts.model_copy(update={"device": str(dev)}))
