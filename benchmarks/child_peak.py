"""Peak memory of soupkit commands, measured in a child process: the one home of this for the memory benchmarks
and the memory tests (``tests/io/test_lora_memory.py``, ``tests/hostile/test_bomb_memory.py``, ``test_data_bombs.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import json, sys
from soupkit.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
        codes.append(0)
    except SystemExit as exit_:
        codes.append(exit_.code)
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the (big) pytest parent
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
# bytes read and written through system calls: the work done, counted (a bomb must not be read through)
io = {k: int(v) for k, v in (line.split(": ") for line in open("/proc/self/io"))}
print(json.dumps({"codes": codes, "rss_kb": peak, "io_bytes": io["rchar"] + io["wchar"]}))
"""


def peak(argvs: list[list[str]], cwd: Path, *, env: dict[str, str] | None = None) -> dict:
    """Run ``soupkit ARGV`` for each argv in one child (this checkout's soupkit): its exit codes, peak RSS (KiB) and
    bytes of I/O. Raises with the child's stderr when it crashes."""
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])
