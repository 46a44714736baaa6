"""``soupkit doctor`` benchmark: its one streaming pass vs a uniform merge of the same files, and RSS flat in N.

Uses merge_bench's inputs (ViT-B-32-shaped safetensors files, random weights, truncated to ``--mb`` MB each). Each
measurement runs in a fresh subprocess that imports torch and soupkit first and then times only the library call
(wall and CPU seconds), so the interpreter's start-up (2-9 s on a busy shared machine) does not drown the pass:

- doctor: ``soupkit.doctor(files)`` (the Gram pass, no base, no evaluation)
- merge: ``soupkit.merge(files, "uniform", out)`` (the uniform soup: reads the same bytes, writes one file)
- read floor: every input read once from the page cache in 8 MB blocks

and the process's peak RSS above its RSS after the imports (``VmHWM`` reset through ``/proc/self/clear_refs``).

Target (issue 17): doctor <= 1.5x merge; doctor's extra RSS flat in N.

    python benchmarks/doctor_bench.py --n 2 4 8 --mb 150 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_bench import PYTHON, ROOT, make_inputs  # found through the path set above

WORKER = """
import json, resource, sys, time
from pathlib import Path
import torch, soupkit, soupkit.diagnosis, soupkit.merging
tool, out, files = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
def status(field):  # kB, from /proc/self/status
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field + ":")))
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset the peak (VmHWM) to the current RSS: the imports' own peak does not count
base_rss = status("VmRSS")
usage = resource.getrusage(resource.RUSAGE_SELF)
started = time.perf_counter()
if tool == "doctor":
    soupkit.doctor(files)
elif tool == "merge":
    soupkit.merge(files, "uniform", out, force=True)
else:
    for name in files:
        with open(name, "rb", buffering=0) as handle:
            while handle.read(8 << 20):
                pass
wall = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
print(json.dumps({"wall": wall, "cpu": cpu, "rss": (status("VmHWM") - base_rss) * 1024}))
"""


def measure(tool: str, files: list[str], out: Path) -> dict[str, float]:
    done = subprocess.run([PYTHON, "-c", WORKER, tool, str(out), *files], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{done.stderr[-2000:]}")
    out.unlink(missing_ok=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--mb", type=int, default=150, help="size of each input in MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "_work")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths, size = make_inputs(args.workdir, max(args.n), args.mb)
    out = args.workdir / "doctor_bench_out.safetensors"
    print(f"# {platform.node()} {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}, {size / 1e6:.0f} MB per "
          f"input, median of {args.repeats} (wall / CPU seconds; peak RSS above the imports)")
    print("| N | read floor | merge | doctor | doctor / merge (wall, CPU) | extra RSS merge | extra RSS doctor |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    tools = ["floor", "merge", "doctor"]
    for n in args.n:
        files = [str(p) for p in paths[:n]]
        measure("floor", files, out)  # warm the page cache
        runs: dict[str, list[dict[str, float]]] = {tool: [] for tool in tools}
        for round_ in range(args.repeats):  # tools take turns, order rotated: drift on a shared machine hits all
            for tool in tools[round_ % 3:] + tools[:round_ % 3]:
                runs[tool].append(measure(tool, files, out))
        med = {tool: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu")} for tool, rs in runs.items()}
        rss = {tool: max(r["rss"] for r in rs) / 2**20 for tool, rs in runs.items()}
        cells = [f"{med[t]['wall']:.2f} / {med[t]['cpu']:.2f} s" for t in tools]
        ratio = (f"{med['doctor']['wall'] / med['merge']['wall']:.2f}x, "
                 f"{med['doctor']['cpu'] / med['merge']['cpu']:.2f}x")
        print(f"| {n} | {' | '.join(cells)} | {ratio} | {rss['merge']:.0f} MiB | {rss['doctor']:.0f} MiB |",
              flush=True)


if __name__ == "__main__":
    main()
