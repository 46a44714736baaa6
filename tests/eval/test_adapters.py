"""Each adapter on small real models (random init, nothing downloaded): timm on an ImageFolder with timm's own
transform, open_clip's zero-shot head against a hand computation, ``zeroshot_checkpoint``, tensors and python
datasets."""

from __future__ import annotations

import json

import pytest
import torch

from soupkit.errors import RecipeError
from soupkit.eval import Evaluator, zeroshot_checkpoint
from tests.eval.helpers import TINY_CLIP, pil_dataset, write_image_folder


def timm_recipe(folder, **model):
    return {"model": {"kind": "timm", "name": "test_resnet", "num_classes": 3, **model},
            "data": {"heldout": {"kind": "imagefolder", "path": str(folder)}},
            "batch_size": 5, "device": "cpu", "precision": "fp32"}


def test_timm_on_imagefolder_matches_timm_transform_and_forward(tmp_path):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    folder = write_image_folder(tmp_path / "images")
    ev = Evaluator.from_recipe(timm_recipe(folder), use_cache=False)
    assert ev.model.training is False and sum(1 for _ in ev.model.parameters()) > 0
    stored = ev._prepared("heldout").images
    assert stored.dtype == torch.uint8 and stored.shape == (12, 3, 160, 160)  # raw pixels, normalised per batch
    # the evaluator's batches equal timm's own eval transform applied image by image
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    transform = create_transform(**resolve_data_config({}, model=model))
    reference = ImageFolder(str(folder), loader=lambda p: Image.open(p).convert("RGB"))
    expected = torch.stack([transform(img) for img, _ in reference])
    got = torch.cat([x for x, _ in ev.batches("heldout")])
    assert torch.allclose(got, expected, atol=1e-5)
    # scores: a second random model, loaded from a file, equals running it by hand
    torch.manual_seed(1)
    model.eval()
    with torch.no_grad():
        want = model(expected).argmax(1) == torch.tensor(reference.targets)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    result = ev(tmp_path / "m.safetensors")["heldout"]
    assert torch.equal(result.correct_mask, want) and ev.forward_passes == 3  # 12 images, batch 5


def test_timm_errors_name_the_field(tmp_path):
    folder = write_image_folder(tmp_path / "images", classes=2, per_class=1)
    with pytest.raises(RecipeError, match=r"model.name: unknown timm model 'test_resnt'. Did you mean 'test_resnet'"):
        Evaluator.from_recipe(timm_recipe(folder, name="test_resnt"))
    with pytest.raises(RecipeError, match=r"model.weights: .*absent.safetensors does not exist"):
        Evaluator.from_recipe(timm_recipe(folder, weights=str(tmp_path / "absent.safetensors")))
    with pytest.raises(RecipeError, match=r"<recipe>: data.heldout.path: .*nowhere does not exist"):
        Evaluator.from_recipe(timm_recipe(tmp_path / "nowhere"))  # checked before the model is built
    (tmp_path / "file.png").write_bytes(b"")
    ev = Evaluator.from_recipe(timm_recipe(tmp_path / "file.png"))
    with pytest.raises(RecipeError, match=r"data.heldout.path: .*file.png is not a folder"):
        ev.num_examples("heldout")


@pytest.fixture
def tiny_clip(tmp_path):
    """A tiny registered open_clip config (the built-in ones are too big for CPU tests)."""
    path = tmp_path / "soupkit-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    import open_clip

    open_clip.add_model_config(path)  # for the hand computations; the recipes register it via `config:`
    return path


def clip_recipe(config, data, **model):
    return {"model": {"kind": "open_clip", "name": "soupkit-tiny-clip", "config": str(config),
                      "classes": ["cat", "dog", "bird"], "templates": ["a photo of a {}.", "a drawing of a {}."],
                      **model},
            "data": {"heldout": data}, "batch_size": 8, "device": "cpu", "precision": "fp32"}


def test_open_clip_zero_shot_head_matches_a_hand_computation(tmp_path, tiny_clip):
    import open_clip

    folder = write_image_folder(tmp_path / "images")
    torch.manual_seed(0)
    clip, _, _ = open_clip.create_model_and_transforms("soupkit-tiny-clip", pretrained=None)
    from safetensors.torch import save_file

    save_file(clip.state_dict(), str(tmp_path / "clip.safetensors"))
    ev = Evaluator.from_recipe(clip_recipe(tiny_clip, {"kind": "imagefolder", "path": str(folder)},
                                           weights=str(tmp_path / "clip.safetensors"), zeroshot_head=True),
                               use_cache=False)
    # by hand: per class, encode each template, L2-normalise, average, normalise again, times exp(logit_scale)
    tokenizer = open_clip.get_tokenizer("soupkit-tiny-clip")
    rows = []
    with torch.no_grad():
        for name in ("cat", "dog", "bird"):
            emb = clip.encode_text(tokenizer([f"a photo of a {name}.", f"a drawing of a {name}."]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            rows.append(mean / mean.norm())
        expected_head = torch.stack(rows) * clip.logit_scale.exp()
    assert torch.allclose(ev.model.head.weight, expected_head, atol=1e-6)
    assert torch.equal(ev.model.head.bias, torch.zeros(3))
    assert set(ev.model.state_dict()) == {f"visual.{k}" for k in clip.visual.state_dict()} | {"head.weight",
                                                                                                "head.bias"}
    # logits = scale * cos(image, class): CLIP's own zero-shot prediction
    images, labels = next(ev.batches("heldout"))
    with torch.no_grad():
        features = clip.encode_image(images, normalize=True)
        want = (features @ expected_head.T).argmax(1) == labels
    result = ev(ev.model.state_dict())["heldout"]
    assert torch.equal(result.correct_mask[:8], want)
    assert ev._prepared("heldout").images.dtype == torch.uint8  # open_clip's preprocess split at ToTensor


def test_zeroshot_checkpoint_round_trips_through_the_evaluator(tmp_path, tiny_clip):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    clip, _, _ = open_clip.create_model_and_transforms("soupkit-tiny-clip", pretrained=None)
    save_file(clip.state_dict(), str(tmp_path / "clip.safetensors"))
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    save_file({"images": images, "labels": torch.arange(10) % 3}, str(tmp_path / "data.safetensors"))
    out = zeroshot_checkpoint("soupkit-tiny-clip", ["cat", "dog", "bird"], ["a photo of a {}.", "a {}."],
                              weights=tmp_path / "clip.safetensors", output=tmp_path / "zs.safetensors",
                              config=tiny_clip, device="cpu")
    data = {"kind": "tensors", "path": str(tmp_path / "data.safetensors")}
    built = Evaluator.from_recipe(clip_recipe(tiny_clip, data, templates=["a photo of a {}.", "a {}."],
                                              weights=str(tmp_path / "clip.safetensors"), zeroshot_head=True),
                                  use_cache=False)
    plain = Evaluator.from_recipe(clip_recipe(tiny_clip, data), use_cache=False)  # head left at zeros
    assert torch.count_nonzero(plain.model.head.weight) == 0
    from soupkit.io import load_checkpoint, open_checkpoint

    assert torch.equal(load_checkpoint(out)["head.weight"], built.model.head.weight)
    assert open_checkpoint(out).metadata["soupkit.zeroshot.templates"] == "2"
    a, b = plain(out)["heldout"], built(built.model.state_dict())["heldout"]
    assert torch.equal(a.correct_mask, b.correct_mask) and a.loss == pytest.approx(b.loss)
    with pytest.raises(RecipeError, match=r"--templates: every template needs a '\{\}'"):
        zeroshot_checkpoint("soupkit-tiny-clip", ["a"], ["no slot"], output=tmp_path / "x.safetensors",
                            config=tiny_clip)


def test_tensors_uint8_are_normalised_with_the_models_statistics(tmp_path):
    from safetensors.torch import save_file

    images = torch.randint(0, 256, (7, 3, 160, 160), dtype=torch.uint8)
    save_file({"images": images, "labels": torch.zeros(7, dtype=torch.int64)}, str(tmp_path / "t.safetensors"))
    recipe = timm_recipe(tmp_path)
    recipe["data"]["heldout"] = {"kind": "tensors", "path": "t.safetensors"}
    recipe_path = tmp_path / "r.yaml"
    import yaml

    recipe_path.write_text(yaml.safe_dump(recipe))
    ev = Evaluator.from_recipe(recipe_path, use_cache=False)
    got = torch.cat([x for x, _ in ev.batches("heldout")])
    assert torch.allclose(got, (images.float() / 255 - 0.5) / 0.5)  # test_resnet's mean/std are 0.5
    save_file({"images": images, "labels": torch.zeros(6)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(RecipeError, match=r"data.heldout.path: .*expected images \(N, C, H, W\) and labels \(N,\)"):
        Evaluator.from_recipe(recipe_path, use_cache=False).num_examples("heldout")


def test_python_dataset_and_python_model_with_default_transform(tmp_path):
    recipe = {"model": {"kind": "python", "factory": "torchvision.models:resnet18", "num_classes": 2,
                        "input_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
              "data": {"heldout": {"kind": "python", "factory": "tests.eval.helpers:pil_dataset",
                                   "kwargs": {"n": 5, "size": 40}}},
              "batch_size": 4, "device": "cpu"}
    ev = Evaluator.from_recipe(recipe, use_cache=False)
    assert ev.precision == "fp32" and ev.num_examples("heldout") == 5
    x, y = next(ev.batches("heldout"))
    from torchvision.transforms import functional as TF

    image = pil_dataset(5, 40)[0][0]
    ref = (TF.to_tensor(TF.center_crop(TF.resize(image, 32), [32, 32])) - 0.5) / 0.25
    assert torch.allclose(x[0], ref, atol=1e-6) and y.tolist() == [0, 1, 0, 1]
    with pytest.raises(RecipeError, match=r"model.factory: module 'torchvision.models' has no attribute 'resnet1'"):
        Evaluator.from_recipe({**recipe, "model": {**recipe["model"], "factory": "torchvision.models:resnet1"}})
    with pytest.raises(RecipeError, match=r"model.factory: expected 'package.module:function'"):
        Evaluator.from_recipe({**recipe, "model": {"kind": "python", "factory": "torchvision.models.resnet18"}})
