"""Peak memory of every LoRA adapter reader / writer path, against the rule of issue 26: peak RSS above start-up
stays within a small constant times the largest input tensor (and 1.5 GB from any file <= 10 KB).

Each path runs through the real CLI in its own child process on a lopsided adapter pair (factors r x k with
k >> d: the dense update d x k is ~d/r times the largest factor). The child reports its peak RSS (VmHWM); the
baseline is the same CLI on a tiny adapter pair (torch's and soupkit's import cancel out). Prints one row per
path: peak above baseline, as MiB and as a multiple of the largest input tensor.

    python benchmarks/adapter_memory.py [--rows 100] [--cols 400000] [--rank 2] [--all]

Defaults are the issue's example (a 100 x 400k update from ~1.6 MB adapters per pair member at rank 1-2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from benchmarks.child_peak import peak


def write_adapter(folder: Path, rows: int, cols: int, rank: int, seed: int, *, modules: int = 1) -> None:
    """A hand-written peft adapter of ``modules`` linear modules, each update ``rows x cols`` at ``rank``."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    tensors = {}
    for m in range(modules):
        stem = f"base_model.model.model.wide{m}"
        tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, cols, generator=g)
        tensors[f"{stem}.lora_B.weight"] = torch.randn(rows, rank, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [f"wide{m}" for m in
                                                                                  range(modules)]}))


def write_base(path: Path, rows: int, cols: int, *, modules: int = 1) -> None:
    save_file({f"model.wide{m}.weight": torch.zeros(rows, cols) for m in range(modules)}, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--cols", type=int, default=400_000)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--all", action="store_true", help="also TIES over full weights (--base): the method's "
                                                           "own dense work, ~1 min more")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, seed in (("a", 1), ("b", 2)):
            write_adapter(root / name, args.rows, args.cols, args.rank, seed)
            write_adapter(root / f"tiny-{name}", 4, 8, 1, seed)
        write_base(root / "base.safetensors", args.rows, args.cols)
        write_base(root / "tiny-base.safetensors", 4, 8)
        largest = 4 * args.rows * args.cols  # the base tensor, fp32 (the largest input of --base paths)
        factor = 4 * args.rank * args.cols  # the largest factor (the largest input of adapter-only paths)
        a, b = str(root / "a"), str(root / "b")
        paths = {
            "inspect (delta reader)": (["inspect", a], factor),
            "merge exact (rank cat)": (["merge", a, b, "-o", str(root / "cat")], factor),
            "merge --rank 4 (factored SVD)": (["merge", a, b, "--rank", "4", "-o", str(root / "r4")], factor),
            "ties --rank 4 (dense: refused)": (["merge", a, b, "-m", "ties", "--density", "0.5", "--rank", "4", "-o",
                                                str(root / "ties")], factor),
            "merge --base (merged reader, streamed)": (["merge", a, b, "--base", str(root / "base.safetensors"),
                                                       "-o", str(root / "full.safetensors")], largest),
            "ties --base (merged reader, streamed)": (["merge", a, b, "-m", "ties", "--density", "0.5", "--base",
                                                      str(root / "base.safetensors"), "-o",
                                                      str(root / "ties.safetensors")], largest),
        }
        if not args.all:
            del paths["ties --base (merged reader, streamed)"]
        tiny = [["merge", str(root / "tiny-a"), str(root / "tiny-b"), "-o", str(root / "tiny-soup")]]
        baseline = peak(tiny, root)["rss_kb"]
        print(f"rows={args.rows} cols={args.cols} rank={args.rank}: largest factor {factor / 2**20:.1f} MiB, "
              f"dense update {4 * args.rows * args.cols / 2**20:.1f} MiB, baseline RSS {baseline / 1024:.0f} MiB")
        print(f"{'path':42s} {'exit':>4s} {'peak above baseline':>20s} {'x largest input':>16s}")
        for name, (argv, biggest) in paths.items():
            result = peak([argv], root)
            above = max(result["rss_kb"] - baseline, 0) * 1024
            print(f"{name:42s} {result['codes'][0]:>4} {above / 2**20:>16.1f} MiB {above / biggest:>15.1f}x")


if __name__ == "__main__":
    main()
