"""Peak memory of every data and cache reader, on ordinary and hostile inputs (issue 26, class 5).

The rule: peak memory above start-up stays within a small constant times the input (the file read), and within
1.5 GB from any file of at most 10 KB. Each measurement runs in a fresh child process: it imports soupkit and
torch, records VmRSS (the start-up), runs one reader on one file, and reports VmHWM (the peak) minus it. The
table gives the file size, that peak, their ratio and whether the reader accepted or refused the file.

    python benchmarks/reader_memory.py [--scale 1.0] [--keep DIR]

``--scale`` multiplies the sizes of the large inputs (1.0: a 100 MB JSONL line, 20 MB files of rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
import torch  # start-up: what every soupkit process pays anyway
from pathlib import Path
from soupkit.errors import SoupkitError
def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
reader, path = sys.argv[1], Path(sys.argv[2])
if reader in ("jsonl", "csv"):
    from soupkit.eval.data import text as readers
    fields = {"text_field": "text", "label_field": "label"}
    call = lambda: readers.jsonl(path, **fields) if reader == "jsonl" else readers.csv_file(path, **fields)
elif reader == "cache":
    from soupkit.eval.cache import ScoreCache
    call = lambda: ScoreCache(path.parent.parent).get("ck", "key")
elif reader == "tokenizer":
    from soupkit.eval.tokenizer_check import check_tokenizer_files
    call = lambda: check_tokenizer_files(path.parent, "model.path")
start = status("VmRSS")
try:
    result = call()
    outcome = "refused (a miss)" if result is None and reader == "cache" else "read"
except SoupkitError as error:
    outcome = "refused: " + str(error).split(": ", 1)[-1][:60]
print(json.dumps({"peak_kb": status("VmHWM") - start, "outcome": outcome}))
"""


def measure(reader: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, reader, str(path)], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cache_entry(folder: Path, n: int, claim: int | None = None) -> Path:
    """A valid score-cache entry for ``n`` examples (or a re-signed one claiming ``claim`` over n's mask)."""
    import torch

    from soupkit.eval.cache import ScoreCache, _checksum

    cache = ScoreCache(folder)
    cache.put("ck", "key", correct=n // 2, n=n, loss=0.5, mask=torch.arange(n) % 2 == 0, seconds=1.0,
              dataset="heldout")
    path = next(folder.rglob("*.json"))
    if claim is not None:
        entry = json.loads(path.read_text())
        entry["n"] = claim
        entry["checksum"] = _checksum(entry)
        path.write_text(json.dumps(entry))
    return path


def inputs(folder: Path, scale: float) -> list[tuple[str, str, Path]]:
    """(reader, description, file) for every measurement."""
    big = int(100e6 * scale)
    rows_n = int(200_000 * scale)
    made = []

    def write(name: str, data: bytes | str) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    row = json.dumps({"text": "the film was very good and the plot " * 2, "label": 1}) + "\n"
    made.append(("jsonl", "ordinary rows (~100 B each)", write("rows.jsonl", row * rows_n)))
    mb = f"{big / 1e6:.0f} MB"
    made.append(("jsonl", f"one {mb} line (a text)", write("line.jsonl", '{"text": "' + "a" * big + '"}\n')))
    made.append(("jsonl", f"one {mb} line of [0,0,...]", write("list.jsonl", '{"text": [' + "0," * (big // 2)
                                                                   + '0], "label": 1}\n')))
    made.append(("jsonl", "1 MB lines of {} objects", write("objects.jsonl", ('{"x": [' + "{}," * 300_000
                                                                              + '{}], "text": "a", "label": 1}\n')
                                                             * max(1, int(20 * scale)))))
    made.append(("jsonl", "tiny rows {\"text\":\"\",\"label\":0}", write("tiny.jsonl", '{"text":"","label":0}\n'
                                                                         * rows_n * 4)))
    made.append(("jsonl", "10 KB: a line nested 5,000 deep", write("deep.jsonl", "[" * 5000 + "]" * 5000 + "\n")))
    made.append(("jsonl", "10 KB: a 5,000-digit label", write("digits.jsonl", '{"text": "a", "label": '
                                                                + "9" * 5000 + "}\n")))
    made.append(("csv", "ordinary rows", write("rows.csv", "text,label\n" + "the film was very good,1\n" * rows_n)))
    made.append(("csv", f"one {mb} quoted cell", write("cell.csv", 'text,label\n"' + ("a" * 1000 + "\n")
                                                         * (big // 1001) + '",1\n')))
    made.append(("csv", "one line of 1M empty cells", write("cells.csv", "text,label\n" + "," * 1_000_000 + "\n")))
    examples = int(10e6 * scale)
    made.append(("cache", f"valid entry, {examples:,} examples", _cache_entry(folder / "cache_big", examples)))
    made.append(("cache", "<10 KB entry claiming n = 10^9", _cache_entry(folder / "cache_claim", 64, 10**9)))
    tokenizer = folder / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    words = int(500_000 * scale)
    vocab = {f"w{i}": i for i in range(words)}
    tokenizer.write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
                                     "pre_tokenizer": {"type": "Whitespace"}}))
    made.append(("tokenizer", f"tokenizer.json, {words:,}-word vocabulary", tokenizer))
    bomb = folder / "tokbomb" / "tokenizer.json"
    bomb.parent.mkdir()
    bomb.write_text(json.dumps({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "([\\w.]+)+!"}}}))
    made.append(("tokenizer", "<10 KB: a backtracking Split regex", bomb))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--keep", type=Path, default=None, help="write the inputs here and keep them")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="soupkit-reader-memory-"))
    print(f"{'reader':<10} {'input':<40} {'file MB':>9} {'peak MB':>9} {'ratio':>7}  outcome")
    worst = 0.0
    for reader, what, path in inputs(folder, args.scale):
        size = path.stat().st_size
        got = measure(reader, path)
        peak = got["peak_kb"] / 1024
        ratio = peak / max(size / 2**20, 1e-9)
        small_ok = size > 10_240 or peak < 1536
        worst = max(worst, ratio if size > 1 << 20 else 0.0)
        print(f"{reader:<10} {what:<40} {size / 2**20:9.2f} {peak:9.1f} {ratio:7.2f}  {got['outcome']}"
              + ("" if small_ok else "  <-- over 1.5 GB from a small file"))
    print(f"worst peak/size over inputs > 1 MB: {worst:.2f}")
    if args.keep is None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
