"""The score cache under hostile conditions (issues 22 and 26, classes 5, 8 and 9): entries truncated, edited or
claiming sizes they do not hold are misses (rescored, rewritten, said once) and never allocate what they claim;
keys follow content (a checkpoint or data file rewritten in place keeping size and mtime, an adapter on other
base weights); a read-only cache never fails an evaluation; two processes share one cache."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from soupkit.eval import Evaluator
from soupkit.eval import cache as cache_module
from soupkit.eval.cache import ScoreCache, _checksum
from tests.eval.helpers import digits_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_said_once():
    cache_module._said.clear()
    yield
    cache_module._said.clear()


def _entry_path(folder: Path) -> Path:
    entries = list(folder.rglob("*.json"))
    assert len(entries) == 1, entries
    return entries[0]


def _rescored_once(ev: Evaluator, path: Path, folder: Path, edit) -> list[str]:
    """Score, edit the entry with ``edit(text) -> text``, score again: the second run must score afresh, rewrite
    a valid entry, and warn once; returns the warnings."""
    first = ev(path, ["heldout"])["heldout"]
    entry = _entry_path(folder)
    entry.write_text(edit(entry.read_text()))
    passes = ev.forward_passes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = ev(path, ["heldout"])["heldout"]
    assert not again.cached and ev.forward_passes > passes
    assert again.correct == first.correct and torch.equal(again.correct_mask, first.correct_mask)
    assert ev(path, ["heldout"])["heldout"].cached  # rewritten whole
    return [str(w.message) for w in caught if "score cache" in str(w.message)]


def _resign(text: str, **changes) -> str:
    """An entry edited and its checksum recomputed (the checksum is not a secret: size checks must hold too)."""
    entry = json.loads(text)
    entry.update(changes)
    entry["checksum"] = _checksum(entry)
    return json.dumps(entry)


@pytest.mark.parametrize(("what", "edit", "said"), [
    ("truncated", lambda t: t[: len(t) // 2], "not a JSON entry"),
    ("count edited", lambda t: t.replace('"correct": ', '"correct": 1'), "checksum mismatch"),
    ("mask bit flipped, checksum kept", lambda t: _flip_mask(t), "checksum mismatch"),
    ("n = 10^9 claimed, re-signed", lambda t: _resign(t, n=10**9), "mask does not hold"),
    ("correct > n, re-signed", lambda t: _resign(t, correct=10**6), "correct is not a count"),
    ("loss NaN, re-signed", lambda t: _resign(t, loss=float("nan")), "loss is not a finite number"),
    ("metric switched, re-signed", lambda t: _resign(t, metric="log_likelihood", values="", tokens=1),
     "values does not hold"),
    ("nested 100k deep", lambda t: "[" * 100_000 + "]" * 100_000, "not a JSON entry"),
    ("5,000-digit count", lambda t: t.replace('"n": ', '"n": ' + "9" * 5000 + ", \"x\": "), "not a JSON entry"),
    ("an array", lambda t: "[1, 2]", "not a JSON object"),
    ("leading garbage", lambda t: "\u00ff" + t, "not a JSON entry"),
])
def test_bad_entries_are_rescored_rewritten_and_said_once(trained, tmp_path, what, edit, said):
    ev = Evaluator.from_recipe(digits_recipe(), cache_dir=tmp_path)
    messages = _rescored_once(ev, trained.paths[2], tmp_path, edit)
    assert len(messages) == 1 and said in messages[0], messages


def _flip_mask(text: str) -> str:
    entry = json.loads(text)
    raw = bytearray(base64.b64decode(entry["mask"]))
    raw[0] ^= 0x01
    entry["mask"] = base64.b64encode(bytes(raw)).decode()
    return json.dumps(entry)


def test_a_problem_is_said_once_per_process_not_per_entry(trained, tmp_path):
    ev = Evaluator.from_recipe(digits_recipe(), cache_dir=tmp_path)
    ev(trained.paths[2])  # three datasets, three entries
    for entry in tmp_path.rglob("*.json"):
        entry.write_text("{")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ev(trained.paths[2])
    assert not any(result[name].cached for name in ev.dataset_names)
    assert len([w for w in caught if "score cache" in str(w.message)]) == 1


def test_an_entry_claiming_a_billion_examples_allocates_nothing(tmp_path):
    """The peak memory of reading a re-signed entry that claims n = 10^9 over a few bytes of mask, in a child."""
    cache = ScoreCache(tmp_path)
    cache.put("ck", "key", correct=1, n=3, loss=0.5, mask=torch.tensor([True, False, False]), seconds=0.1,
              dataset="heldout")
    entry = _entry_path(tmp_path)
    entry.write_text(_resign(entry.read_text(), n=10**9))
    code = f"""
import warnings
from soupkit.eval.cache import ScoreCache
warnings.simplefilter("ignore")
before = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
assert ScoreCache({str(tmp_path)!r}).get("ck", "key") is None
after = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(after - before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 50_000  # KiB: nothing of the claimed 10^9 (1 GB as bools)


def test_links_and_fifos_in_the_cache_are_misses_never_followed(tmp_path):
    cache = ScoreCache(tmp_path)
    secret = tmp_path.parent / "secret.json"
    secret.write_text("{}")
    cache.put("ck", "key", correct=1, n=1, loss=0.1, mask=torch.tensor([True]), seconds=0.0, dataset="d")
    entry = _entry_path(tmp_path)
    entry.unlink()
    entry.symlink_to(secret)
    assert cache.get("ck", "key") is None
    cache.put("ck", "key", correct=1, n=1, loss=0.1, mask=torch.tensor([True]), seconds=0.0, dataset="d")
    assert secret.read_text() == "{}" and not entry.is_symlink() and cache.get("ck", "key") is not None
    entry.unlink()
    os.mkfifo(entry)
    assert cache.get("ck", "key") is None  # never blocks on the FIFO


# --- keys follow content --------------------------------------------------------------------------------------------


def test_a_checkpoint_rewritten_in_place_with_the_same_size_and_mtime_is_rescored(trained, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(trained.paths[0].read_bytes())
    old = path.stat()
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns - 10_000_000_000))  # settled: its hash may be memoised
    ev = Evaluator.from_recipe(digits_recipe(), cache_dir=tmp_path / "cache")
    first = ev(path, ["heldout"])["heldout"]
    assert ev(path, ["heldout"])["heldout"].cached
    stamp = path.stat()
    with open(path, "r+b") as handle:  # in place: same inode, same size; then the mtime is set back
        handle.write(trained.paths[2].read_bytes())
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size and path.stat().st_mtime_ns == stamp.st_mtime_ns
    again = ev(path, ["heldout"])["heldout"]
    assert not again.cached and again.correct != first.correct
    fresh = Evaluator.from_recipe(digits_recipe(), use_cache=False)(trained.paths[2], ["heldout"])["heldout"]
    assert again.correct == fresh.correct


def test_a_data_file_rewritten_in_place_changes_the_key(tmp_path):
    from soupkit.eval.recipe import load_recipe

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "good", "label": 1}\n')
    recipe = load_recipe({"model": {"kind": "python", "factory": "soupkit.demo_train:DigitsCNN",
                                    "kwargs": {"width": 8}, "num_classes": 10},
                          "data": {"heldout": {"kind": "jsonl", "path": str(data), "text_field": "text",
                                               "label_field": "label"}}})
    key = recipe.dataset_key("heldout", precision="fp32", device_type="cpu")
    stamp = data.stat()
    data.write_text('{"text": "good", "label": 0}\n')  # same size
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert recipe.dataset_key("heldout", precision="fp32", device_type="cpu") != key


def test_an_adapter_key_covers_the_base_it_is_applied_to(tmp_path):
    from soupkit.eval.cache import source_fingerprint

    adapter = tmp_path / "adapter.safetensors"
    save_file({"w": torch.ones(2)}, str(adapter))
    base_a, base_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(2)}, str(base_a))
    save_file({"w": torch.full((2,), 2.0)}, str(base_b))
    alone = source_fingerprint(adapter)
    on_a, on_b = source_fingerprint(adapter, base_a), source_fingerprint(adapter, base_b)
    assert len({alone, on_a, on_b}) == 3
    assert source_fingerprint(adapter, base_a) == on_a


# --- sharing and read-only folders ----------------------------------------------------------------------------------


def test_a_read_only_cache_folder_still_evaluates_and_says_so_once(trained, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        ev = Evaluator.from_recipe(digits_recipe(), cache_dir=folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ev(trained.paths[1])
            ev(trained.paths[2])
        assert all(result[name].n > 0 for name in ev.dataset_names)
        said = [str(w.message) for w in caught if "cache" in str(w.message)]
        assert len(said) == 1 and "not stored" in said[0], said
    finally:
        folder.chmod(0o755)


def test_read_only_cache_folder_through_the_library_cache(tmp_path, monkeypatch):
    """Root ignores permissions, so the unwritable cache is also simulated where the write fails."""
    from soupkit.errors import OutputError

    def refuse(path, text):
        raise OutputError(f"{path}: cannot write: Read-only file system")

    monkeypatch.setattr(cache_module, "atomic_write_text", refuse)
    cache = ScoreCache(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for number in range(3):
            cache.put(f"ck{number}", "key", correct=0, n=1, loss=0.1, mask=torch.tensor([False]), seconds=0.0,
                      dataset="d")
    assert len(caught) == 1 and "Read-only file system" in str(caught[0].message)


_WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from soupkit.eval import Evaluator
from tests.eval.helpers import digits_recipe
ev = Evaluator.from_recipe(digits_recipe(), cache_dir=sys.argv[1])
results = [ev(path)["heldout"].correct for path in sys.argv[2:]]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_two_processes_share_one_cache_at_once(trained, tmp_path):
    folder = tmp_path / "cache"
    paths = [str(p) for p in trained.paths]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(folder), *order], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
               for order in (paths, paths[::-1])]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err for _, err in outputs]
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert first == second[::-1]
    assert "Traceback" not in "".join(err for _, err in outputs)
    ev = Evaluator.from_recipe(digits_recipe(), cache_dir=folder)  # every entry both wrote is whole and valid
    for path, correct in zip(paths, first):
        result = ev(path)
        assert all(result[name].cached for name in ev.dataset_names) and result["heldout"].correct == correct
    assert not [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".json")]


def test_a_python_factory_key_covers_its_source_file(tmp_path, monkeypatch):
    from soupkit.eval.recipe import load_recipe

    module = tmp_path / "my_factory_mod.py"
    module.write_text("def build():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe({"model": {"kind": "python", "factory": "my_factory_mod:build"},
                          "data": {"heldout": {"kind": "digits", "split": "heldout"}}})
    key = recipe.dataset_key("heldout", precision="fp32", device_type="cpu")
    module.write_text("def build():\n    return 2\n")
    assert recipe.dataset_key("heldout", precision="fp32", device_type="cpu") != key
