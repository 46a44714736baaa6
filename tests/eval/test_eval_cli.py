"""``soupkit eval`` and ``soupkit zeroshot`` through the real entry point: table, JSON, CSV, cache, one-line
errors with exit code 2."""

from __future__ import annotations

import csv
import json

import yaml

from tests.eval.helpers import digits_recipe


def test_eval_table_json_csv_and_cache(cli, trained, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(digits_recipe()))
    paths = [str(p) for p in trained.paths[1:]]
    out = cli("eval", *paths, "--eval", recipe, "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv")
    assert out.code == 0, out.err
    assert "heldout" in out.out and "mean shift" in out.out and "ckpt1" in out.out and "/*.safetensors" in out.out
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["datasets"] == ["heldout", "clean", "noise"] and report["shifts"] == ["noise"]
    first = report["checkpoints"][0]
    assert first["checkpoint"] == paths[0] and not first["datasets"]["heldout"]["cached"]
    assert first["mean_shift"] == first["datasets"]["noise"]["accuracy"]
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [r["checkpoint"] for r in rows] == paths
    assert float(rows[1]["clean"]) == round(report["checkpoints"][1]["datasets"]["clean"]["accuracy"], 6)
    again = cli("eval", paths[0], "--eval", recipe, "--json", tmp_path / "t.json", "--datasets", "heldout")
    assert again.code == 0 and "1 of 1 scores from the score cache" in again.out
    assert json.loads((tmp_path / "t.json").read_text())["checkpoints"][0]["datasets"]["heldout"]["cached"]
    fresh = cli("eval", paths[0], "--eval", recipe, "--json", tmp_path / "t.json", "--no-cache", "-q")
    assert fresh.code == 0 and fresh.out == ""
    assert not json.loads((tmp_path / "t.json").read_text())["checkpoints"][0]["datasets"]["heldout"]["cached"]


def test_eval_errors_are_one_line(cli, trained, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**digits_recipe(), "batchsize": 3}))
    cases = [
        (("eval", trained.paths[0], "--eval", recipe), f"{recipe}: batchsize: unknown key 'batchsize'. Did you "
                                                        "mean 'batch_size'?"),
        (("eval", tmp_path / "gone.safetensors", "--eval", "digits"), "gone.safetensors: no such file"),
        (("eval", trained.paths[0], "--eval", "digit"), "recipe 'digit' not found"),
        (("eval", trained.paths[0], "--eval", "digits", "--datasets", "clean,nois"),
         "unknown dataset (recipe"),
        (("eval", trained.paths[0], "--eval", "digits", "--device", "tpu"),
         "--device: unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
        (("eval", trained.paths[0], "--eval", "digits", "--json", tmp_path / "no" / "x.json"),
         "--json: folder"),
        (("zeroshot", "--model", "ViT-B-3", "-o", tmp_path / "z.safetensors"),
         "--model.name: unknown open_clip model 'ViT-B-3'. Did you mean 'ViT-B-32'?"),
    ]
    for args, expected in cases:
        result = cli(*args)
        assert result.code == 2, (args, result.err)
        assert expected in result.err, (expected, result.err)
        assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    # the digits recipe's model is wider than the test checkpoints': a strict, one-line key/shape error
    mismatch = cli("eval", trained.paths[0], "--eval", "digits")
    assert mismatch.code == 2 and "does not fit the recipe's model" in mismatch.err and "shape mismatch" in mismatch.err


def test_zeroshot_command(cli, tmp_path):
    from tests.eval.helpers import TINY_CLIP

    config = tmp_path / "soupkit-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    out = tmp_path / "zs.safetensors"
    result = cli("zeroshot", "--model", "soupkit-tiny-clip", "--config", config, "--classes",
                 tmp_path / "classes.txt", "--templates", "simple", "-o", out, "--device", "cpu")
    assert result.code == 0, result.err
    from soupkit.io import open_checkpoint

    with open_checkpoint(out) as reader:
        assert reader.info("head.weight").shape == (2, 16) and "visual.conv1.weight" in reader
    again = cli("zeroshot", "--model", "soupkit-tiny-clip", "--config", config, "--classes",
                tmp_path / "classes.txt", "-o", out)
    assert again.code == 2 and "exists" in again.err
