"""Per-key cost benchmark: a 2-input uniform merge of many small tensors (MoE / LLM checkpoints hold 10k-100k).

Writes two safetensors files of N tiny fp32 tensors (16 elements each, so tensor data is negligible and what is
measured is soupkit's per-key work: header parsing, key checks, planning, the engine loop, the writer), then times
``soupkit.merge([a, b], "uniform", out)`` in-process and reports keys/s. ``--profile`` prints the top functions by
cumulative time for the largest N (to find which layer a per-key cost lives in).

    python benchmarks/keys_bench.py --n 1000 10000 100000 [--repeats 3] [--profile] [--unpooled-small-reads]

``--unpooled-small-reads`` is a what-if for the engine, not a soupkit option: it patches the merge engine's
``BufferPool.acquire`` (in this process only) to allocate reads under 64 KiB instead of pooling them, which
removes the pool's linear scan of its free list on every acquire and release (measured: the quadratic term).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_inputs(folder: Path, count: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    paths = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        values = torch.randn(count, 16, generator=g)
        # MoE-like names: layers x experts x projections
        state = {f"model.layers.{i // 384}.mlp.experts.{(i // 3) % 128}.w{i % 3}.weight": values[i].clone()
                 for i in range(count)}
        paths.append(folder / f"in{seed}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def run(count: int, repeats: int, profile: bool) -> dict[str, float]:
    import soupkit

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = make_inputs(folder, count)
        times = []
        for repeat in range(repeats):
            out = folder / f"soup{repeat}.safetensors"
            start = time.perf_counter()
            soupkit.merge(inputs, "uniform", out)
            times.append(time.perf_counter() - start)
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            soupkit.merge(inputs, "uniform", folder / "profiled.safetensors")
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
            print(text.getvalue())
    median = statistics.median(times)
    return {"n": count, "seconds": median, "keys_per_s": count / median}


def unpool_small_reads() -> None:
    import torch

    from soupkit.merging import engine

    pooled = engine.BufferPool.acquire

    def acquire(self: engine.BufferPool, nbytes: int) -> torch.Tensor:
        if nbytes < (64 << 10):
            return torch.empty(max(nbytes, 1), dtype=torch.uint8)[:nbytes]
        return pooled(self, nbytes)

    engine.BufferPool.acquire = acquire  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile one more merge of the largest N")
    parser.add_argument("--unpooled-small-reads", action="store_true",
                        help="what-if: patch the engine's BufferPool to allocate reads under 64 KiB")
    args = parser.parse_args()
    if args.unpooled_small_reads:
        unpool_small_reads()
    print("| tensors per input | merge wall (median) | keys/s |")
    print("|---:|---:|---:|")
    for count in args.n:
        result = run(count, args.repeats, args.profile and count == max(args.n))
        print(f"| {count:,} | {result['seconds']:.2f} s | {result['keys_per_s']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
