"""Uniform-soup merge benchmark: soupkit vs the I/O floor and vs the peers a user would reach for.

Makes N checkpoints shaped like open_clip ViT-B-32 (605 MB fp32 each), then measures in one run, for a uniform
soup, wall time and peak RSS (``/usr/bin/time -v``, so memory-mapped pages count) of:

- floor: ``cat`` every input from page cache + write one checkpoint-sized file with fsync (``dd conv=fsync``)
- soupkit: ``soupkit merge`` (the CLI, as users run it)
- naive: ``safetensors.torch.load_file`` every input, average, ``save_file`` (load everything, then average)
- timm-style: load one checkpoint at a time into a float64 running sum (timm's avg_checkpoints.py approach)
- mergekit: ``mergekit-pytorch`` (mergekit's raw-PyTorch merge; ``linear`` with weight 1 per model = the uniform
  soup) when ``--mergekit PATH`` names its executable (it needs transformers etc.; install it in its own venv)
- interpreter: ``python -c "import torch, soupkit.cli, soupkit.merging"`` (start-up + exit cost, subtracted for
  the wall target)

Targets (issue "Foundation"): (wall - interpreter start-up) <= 1.3x floor; peak RSS flat in N and
<= 0.25x one checkpoint above the interpreter's baseline. Prints a table of medians and ratios.

    python benchmarks/merge_bench.py --n 2 4 8 --repeats 3 [--workdir benchmarks/_work] [--method ties --mb 350]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SOUPKIT = str(Path(PYTHON).with_name("soupkit"))

NAIVE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    paths, out = sys.argv[1:-1], sys.argv[-1]
    states = [load_file(p) for p in paths]
    soup = {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype)
            if states[0][k].is_floating_point() else states[0][k] for k in states[0]}
    save_file(soup, out)
""")

TIMM_STYLE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    paths, out = sys.argv[1:-1], sys.argv[-1]
    avg, dtypes = {}, {}
    for p in paths:
        state = load_file(p)
        for k, v in state.items():
            dtypes[k] = v.dtype
            avg[k] = avg[k] + v.double() if k in avg else v.double().clone()
        del state
    save_file({k: (v / len(paths)).to(dtypes[k]) for k, v in avg.items()}, out)
""")


def make_inputs(workdir: Path, count: int, megabytes: int | None = None) -> tuple[list[Path], int]:
    """``count`` ViT-B-32-shaped safetensors files (random weights, different seeds); reused across runs.
    ``megabytes``: keep ViT-B-32's tensors in order until the file reaches that size (e.g. 350 MB inputs)."""
    import open_clip
    import torch

    import soupkit

    shapes_file = workdir / "vit_b32_shapes.json"
    if not shapes_file.exists():
        model = open_clip.create_model("ViT-B-32")
        shapes_file.write_text(json.dumps({k: list(v.shape) for k, v in model.state_dict().items()}))
    shapes = json.loads(shapes_file.read_text())
    if megabytes is not None:
        kept, total = {}, 0
        for key, shape in shapes.items():
            if total >= megabytes * 1e6:
                break
            kept[key] = shape
            total += 4 * math.prod(shape)
        shapes = kept
    stem = "vit_b32" if megabytes is None else f"vit_b32_{megabytes}mb"
    paths = []
    for i in range(count):
        path = workdir / f"{stem}_{i}.safetensors"
        if not path.exists():
            g = torch.Generator().manual_seed(i)
            state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
            soupkit.save_checkpoint(state, path)
        paths.append(path)
    return paths, paths[0].stat().st_size


def timed(cmd: list[str] | str, shell: bool = False) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, from /usr/bin/time -v."""
    wrapped = ["/usr/bin/time", "-v", *(["bash", "-c", cmd] if shell else cmd)]
    started = time.perf_counter()
    proc = subprocess.run(wrapped, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"failed: {cmd}\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss_kb * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "_work")
    parser.add_argument("--method", default="uniform", help="soupkit method (ties needs a base: uses input 0)")
    parser.add_argument("--peers", default="naive,timm", help="comma list of peers to run (naive, timm, none)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--mergekit", help="path of a mergekit-pytorch executable: adds mergekit as a peer (uniform)")
    parser.add_argument("--mb", type=int, help="input size in MB (ViT-B-32's first tensors); default the whole 605 MB")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths, ckpt_bytes = make_inputs(args.workdir, max(args.n) + (1 if args.method != "uniform" else 0), args.mb)
    out = args.workdir / "out.safetensors"
    peers = [p for p in args.peers.split(",") if p and p != "none"]

    def interleaved(commands: dict[str, tuple[list[str] | str, bool]]) -> dict[str, tuple[float, int]]:
        """Median wall and max peak RSS per tool, the tools taking turns in every round (on a noisy machine a
        drift then hits every tool alike instead of whichever ran during it), in an order rotated each round (so
        no tool always runs right after the same neighbour, e.g. right after a big file was written and deleted)."""
        walls: dict[str, list[float]] = {tool: [] for tool in commands}
        rsss: dict[str, list[int]] = {tool: [] for tool in commands}
        tools = list(commands)
        for round_ in range(args.repeats):
            shift = round_ % len(tools)
            for tool in tools[shift:] + tools[:shift]:
                cmd, shell = commands[tool]
                out.unlink(missing_ok=True)
                wall, rss = timed(cmd, shell)
                walls[tool].append(wall)
                rsss[tool].append(rss)
        return {tool: (statistics.median(walls[tool]), max(rsss[tool])) for tool in commands}

    # the fixed cost of any `soupkit` invocation: interpreter, torch, the CLI and the engine imported, then exit
    startup = ([PYTHON, "-c", "import torch, soupkit.cli, soupkit.merging"], False)
    results = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "checkpoint_bytes": ckpt_bytes,
               "by_n": {}}
    for n in args.n:
        inputs = [str(p) for p in paths[:n]]
        if args.method != "uniform":
            base, inputs = str(paths[n]), inputs
        for p in inputs:  # warm the page cache: every measurement reads from memory
            subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
        floor_cmd = (f"cat {' '.join(inputs)} > /dev/null && dd if=/dev/zero of={out} bs=4M "
                     f"count={ckpt_bytes // (4 << 20) + 1} conv=fsync status=none")
        soup_cmd = [SOUPKIT, "merge", *inputs, "-o", str(out), "--force", "-q", "--method", args.method]
        if args.method in ("ties", "task_arithmetic", "dare_ties", "dare_linear"):
            soup_cmd += ["--base", base] + (["--density", "0.2"] if "ties" in args.method else [])
        commands: dict[str, tuple[list[str] | str, bool]] = {
            "interpreter": startup, "floor": (floor_cmd, True), "soupkit": (soup_cmd, False)}
        if "naive" in peers:
            commands["naive"] = ([PYTHON, "-c", NAIVE, *inputs, str(out)], False)
        if "timm" in peers:
            commands["timm-style"] = ([PYTHON, "-c", TIMM_STYLE, *inputs, str(out)], False)
        mk_out = args.workdir / "mergekit_out"
        if args.mergekit and args.method == "uniform":
            config = args.workdir / f"mergekit_{n}.yaml"
            config.write_text(json.dumps({"merge_method": "linear", "dtype": "float32",
                                          "models": [{"model": p, "parameters": {"weight": 1.0}} for p in inputs]}))
            commands["mergekit"] = (f"rm -rf {mk_out} && {args.mergekit} {config} {mk_out} --quiet > /dev/null 2>&1",
                                    True)
        results["by_n"][n] = interleaved(commands)
        shutil.rmtree(mk_out, ignore_errors=True)
        out.unlink(missing_ok=True)

    print(f"\ncheckpoint {ckpt_bytes / 1e6:.0f} MB; method {args.method}; medians of {args.repeats} interleaved "
          f"rounds; 'interpreter' = start-up + exit, subtracted from wall and RSS for the targets\n")
    header = f"{'N':>3} {'tool':<11} {'wall s':>7} {'peak RSS MB':>12} {'RSS-baseline MB':>16} {'vs floor':>9}"
    print(header + "\n" + "-" * len(header))
    for n, row in results["by_n"].items():
        floor_wall = row["floor"][0]
        interp_wall, interp_rss = row.pop("interpreter")
        print(f"{n:>3} {'interpreter':<11} {interp_wall:>7.2f} {interp_rss / 1e6:>12.0f}")
        for tool, (wall, rss) in row.items():
            above = rss - interp_rss if tool != "floor" else rss
            net = wall - interp_wall if tool != "floor" else wall
            print(f"{n:>3} {tool:<11} {wall:>7.2f} {rss / 1e6:>12.0f} {above / 1e6:>16.0f} {net / floor_wall:>8.2f}x")
        soup_wall, soup_rss = row["soupkit"]
        verdict = [f"(wall-startup)/floor = {(soup_wall - interp_wall) / floor_wall:.2f} (target <= 1.3)",
                   f"RSS above baseline = {(soup_rss - interp_rss) / ckpt_bytes:.2f}x checkpoint (target <= 0.25)"]
        verdict += [f"soupkit/{peer} wall = {soup_wall / row[peer][0]:.2f}, RSS = {soup_rss / row[peer][1]:.2f}"
                    for peer in row if peer not in ("floor", "soupkit")]
        print("    " + "; ".join(verdict))
        row["interpreter"] = (interp_wall, interp_rss)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if os.environ.get("SOUPKIT_BENCH_KEEP") != "1":
        shutil.rmtree(args.workdir / "unused", ignore_errors=True)


if __name__ == "__main__":
    main()
