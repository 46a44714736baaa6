"""Evaluator benchmark: images/s scoring *different* checkpoints, against two baselines on the same model + data.

Setup: N digits test images (default 512) written as PNG files in an ImageFolder tree (64x64 RGB, 10 classes);
a timm model (default ``test_resnet``, timm's own eval transform: resize 168, crop 160, normalise) and K
different random checkpoints (safetensors). Then, in one process:

- evaluator: ``Evaluator.from_recipe`` once; ``ev(path)`` for each checkpoint (cache off). The first call also
  decodes the images; evaluations 2..K reuse the prepared uint8 tensors. Reported: median of evaluations 2..K.
- pure forward: the same model on the same pre-made, already-normalised float tensors, same batch size, under
  ``torch.inference_mode`` -- the ceiling. Target: evaluator >= 0.9x of it.
- DataLoader per evaluation: what the model-soups reference code does for each candidate (``load_state_dict`` from
  ``torch.load``-style state, a fresh ``DataLoader(ImageFolder(transform))`` pass decoding every image again).

The three are interleaved round by round (evaluator, forward, DataLoader on checkpoint i) so that load from other
processes on a shared machine drifts over all of them alike; medians are reported.

    python benchmarks/eval_bench.py [--images 512] [--checkpoints 6] [--model test_resnet] [--batch-size 128]
                                    [--workers 2] [--threads N] [--write FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int) -> None:
    from PIL import Image

    from soupkit.eval.data.digits import load_digits_split

    x, y = load_digits_split("test", size=64, channels=3)
    x = torch.cat([x] * (n // len(x) + 1))[:n]
    y = torch.cat([y] * (n // len(y) + 1))[:n]
    for i, (image, label) in enumerate(zip(x, y)):
        target = folder / f"class{int(label)}"
        target.mkdir(parents=True, exist_ok=True)
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(target / f"{i:05d}.png")


def make_checkpoints(model_name: str, folder: Path, k: int) -> list[Path]:
    import timm
    from safetensors.torch import save_file

    paths = []
    for i in range(k):
        torch.manual_seed(i)
        model = timm.create_model(model_name, pretrained=False, num_classes=10)
        paths.append(folder / f"ckpt{i}.safetensors")
        save_file(model.state_dict(), str(paths[-1]))
    return paths


def forward_once(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size]).argmax(1)
    return time.perf_counter() - started


class DataLoaderLoop:
    """The reference: per evaluation, load the weights and run a fresh DataLoader over the image files."""

    def __init__(self, model_name: str, folder: Path, batch_size: int, workers: int):
        import timm
        from timm.data import create_transform, resolve_data_config

        self.model = timm.create_model(model_name, pretrained=False, num_classes=10).eval()
        self.transform = create_transform(**resolve_data_config({}, model=self.model))
        self.folder, self.batch_size, self.workers = folder, batch_size, workers

    def __call__(self, path: Path) -> float:
        from safetensors.torch import load_file
        from torchvision.datasets import ImageFolder

        started = time.perf_counter()
        self.model.load_state_dict(load_file(str(path)))
        loader = torch.utils.data.DataLoader(ImageFolder(str(self.folder), transform=self.transform),
                                             batch_size=self.batch_size, num_workers=self.workers, shuffle=False)
        correct = 0
        with torch.no_grad():
            for inputs, labels in loader:
                correct += int((self.model(inputs).argmax(1) == labels).sum())
        return time.perf_counter() - started


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores (shared), torch {torch.__version__}, {torch.get_num_threads()} "
            f"intra-op threads, Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's].")
    parser.add_argument("--write", type=Path, default=None, help="Write a Markdown summary here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_images(folder, args.images)
        paths = make_checkpoints(args.model, Path(tmp), args.checkpoints)
        recipe = {"model": {"kind": "timm", "name": args.model, "num_classes": 10},
                  "data": {"heldout": {"kind": "imagefolder", "path": str(folder)}},
                  "batch_size": args.batch_size, "device": "cpu", "precision": "fp32", "num_workers": args.workers}
        from soupkit.eval import Evaluator

        ev = Evaluator.from_recipe(recipe, use_cache=False)
        reference = DataLoaderLoop(args.model, folder, args.batch_size, args.workers)
        ev_times, fwd_times, dl_times = [], [], []
        images = None
        for path in paths:  # interleaved rounds
            started = time.perf_counter()
            ev(path)
            ev_times.append(time.perf_counter() - started)
            if images is None:  # the same inputs the evaluator used, already normalised
                images = torch.cat([x for x, _ in ev.batches("heldout")])
                continue
            fwd_times.append(forward_once(ev.model, images, args.batch_size))
            dl_times.append(reference(path))

    n = args.images
    ev_med, fwd_med, dl_med = (statistics.median(t) for t in (ev_times[1:], fwd_times, dl_times))
    rows = [
        ("evaluator, 1st evaluation (decodes once)", ev_times[0], n / ev_times[0]),
        ("evaluator, 2nd+ evaluations (median)", ev_med, n / ev_med),
        ("pure forward on pre-made tensors (median)", fwd_med, n / fwd_med),
        ("DataLoader per evaluation (median)", dl_med, n / dl_med),
    ]
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT) if Path(sys.argv[0]).is_absolute()
                                        else sys.argv[0]), *sys.argv[1:]])
    lines = [
        "# Evaluator benchmark",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- workload: timm `{args.model}` (random init, 10 classes), {n} PNG images (64x64 RGB digits) through "
        f"timm's eval transform (resize 168, crop 160), batch {args.batch_size}, fp32, {args.checkpoints} "
        f"different checkpoints, cache off, DataLoader workers {args.workers}",
        "",
        "| path | seconds per evaluation | images/s |",
        "|---|---:|---:|",
        *(f"| {name} | {sec:.3f} | {ips:,.0f} |" for name, sec, ips in rows),
        "",
        f"- evaluator (2nd+) / pure forward: **{fwd_med / ev_med:.2f}x** (target >= 0.9x)",
        f"- speed-up over a DataLoader loop per evaluation: **{dl_med / ev_med:.2f}x**",
        f"- every evaluation time includes loading the checkpoint's weights; raw per-evaluation seconds: evaluator "
        f"{', '.join(f'{t:.2f}' for t in ev_times)}; forward {', '.join(f'{t:.2f}' for t in fwd_times)}; "
        f"DataLoader {', '.join(f'{t:.2f}' for t in dl_times)}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
