"""Greedy-soup benchmark: soupkit's ``greedy_soup`` vs a faithful re-implementation of the model-soups procedure.

On the ``digits`` recipe, fine-tunes N ingredients (default 16) from one start, saves them as ``torch.save`` files,
then times in one run, on the same files and the same held-out data:

- reference: the paper's pipeline as in mlfoundations/model-soups ``main.py``: ``torch.load`` every ingredient and
  evaluate it with a full DataLoader pass over the held-out set; sort; then for each next ingredient
  ``torch.load`` it, form the candidate as the running mean ``soup * k/(k+1) + new * 1/(k+1)`` over every key,
  ``load_state_dict`` and run a full DataLoader pass;
- soupkit, cold: ``greedy_soup(paths, evaluator)`` with an empty evaluation cache (it scores every ingredient);
- soupkit, warm: the same call again (individual scores come from the evaluator's cache).

Asserts the selections are identical; prints times, the speed-up, and the forward passes / held-out examples
saved by the exact early stop, and the greedy step alone (reference loop vs soupkit warm). Target (issue): >= 5x
on CPU; runtime < 3 min.

    python benchmarks/greedy_bench.py [--n 16] [--recipe recipes/digits.yaml] [--workdir DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def reference_greedy(paths: list[Path], model: torch.nn.Module, loader, device: torch.device):
    """The model-soups procedure (individual evaluation + greedy loop), written the way main.py does it."""

    def test_model_on_dataset(model: torch.nn.Module) -> tuple[float, int]:
        model.eval()
        correct = n = passes = 0
        with torch.no_grad():
            for inputs, labels in loader:
                inputs, labels = inputs.to(device), labels.to(device)
                logits = model(inputs)
                passes += 1
                correct += int((logits.argmax(dim=1) == labels).sum())
                n += len(labels)
        return correct / n, passes

    forward = 0
    accuracies = {}
    for path in paths:  # step 2 of the paper's pipeline: evaluate the individual models
        model.load_state_dict(torch.load(path, map_location=device))
        accuracies[path], passes = test_model_on_dataset(model)
        forward += passes
    loop_started = time.perf_counter()  # step 3, the greedy loop (main.py runs it from the saved scores)
    ranked = sorted(paths, key=lambda p: -accuracies[p])  # best first; stable for ties
    ingredients = [ranked[0]]
    soup = torch.load(ranked[0], map_location=device)
    best = accuracies[ranked[0]]
    for path in ranked[1:]:
        new = torch.load(path, map_location=device)
        k = len(ingredients)
        potential = {key: soup[key].clone() * (k / (k + 1.0)) + new[key].clone() * (1.0 / (k + 1)) for key in new}
        model.load_state_dict(potential)
        accuracy, passes = test_model_on_dataset(model)
        forward += passes
        if accuracy > best:
            ingredients.append(path)
            best = accuracy
            soup = potential
    return [paths.index(p) for p in ingredients], best, forward, time.perf_counter() - loop_started


#: the bundled digits recipe's held-out fraction (the one source of truth the demo uses too)
HOLDOUT = float(__import__("soupkit.demo", fromlist=["HOLDOUT"]).HOLDOUT)


class PerSampleDigits(torch.utils.data.Dataset):
    """The held-out digits decoded per item in ``__getitem__`` (scale to [0, 1], bilinear resize to 16 x 16), the
    way main.py's datasets apply ``preprocess`` to every image on every pass."""

    def __init__(self, size: int = 16):
        from sklearn.datasets import load_digits

        from soupkit.eval.data.digits import _partition

        bunch = load_digits()
        index = _partition(len(bunch.target), 0, HOLDOUT)["heldout"]
        self.images = torch.from_numpy(bunch.images).float()[index]
        self.labels = torch.from_numpy(bunch.target).long()[index]
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = (self.images[i] / 16.0)[None, None]
        image = torch.nn.functional.interpolate(image, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False).clamp_(0, 1)
        return image[0], self.labels[i]


def make_ingredients(ev, folder: Path, count: int, seed: int) -> list[Path]:
    """A short common pre-training on the digits train split (disjoint from held-out and test), then ``count``
    fine-tunes with different seeds, learning rates, step counts and label noise (so that some ingredients help
    the soup and some do not). Saved with ``torch.save``: the reference reads them as main.py does."""
    from soupkit.eval.data.digits import load_digits_split

    xs, ys = load_digits_split("train", size=16, seed=0)  # the recipe's image size and split seed

    def run(model: torch.nn.Module, generator: torch.Generator, lr: float, steps: int, noise: float) -> None:
        optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        for _ in range(steps):
            index = torch.randint(0, len(ys), (64,), generator=generator)
            labels = ys[index].clone()
            flip = torch.rand(len(labels), generator=generator) < noise
            labels[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=generator)
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[index]), labels).backward()
            optimiser.step()

    base = copy.deepcopy(ev.model).cpu().to(memory_format=torch.contiguous_format).train()
    run(base, torch.Generator().manual_seed(seed), 0.05, 150, 0.0)
    paths = []
    for i in range(count):
        model = copy.deepcopy(base)
        lr = [0.01, 0.03, 0.1, 0.3][i % 4]
        noise = [0.0, 0.0, 0.2, 0.5][(i // 4) % 4]
        run(model, torch.Generator().manual_seed(seed + 1 + i), lr, 30 + 10 * (i % 3), noise)
        paths.append(folder / f"ingredient{i:02d}.pt")
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, paths[-1])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="number of ingredients (>= 12)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "digits.yaml"))
    parser.add_argument("--batch-size", type=int, default=32,
                        help="held-out batch size for both sides (the recipe's 512 holds all 270 held-out digits "
                             "in one batch, which leaves early stop nothing to skip)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each side (median reported)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the benchmark machine is shared; one thread keeps the comparison steady

    from torch.utils.data import DataLoader, TensorDataset

    from soupkit.eval import Evaluator
    from soupkit.soups import greedy_soup

    started = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="greedy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import yaml

    recipe = {**yaml.safe_load(Path(args.recipe).read_text()), "batch_size": args.batch_size}
    recipe.pop("name", None)
    recipe.pop("description", None)
    torch.manual_seed(args.seed)  # the recipe's model starts from a random init: make the ingredients reproducible
    ev0 = Evaluator.from_recipe(recipe, device=args.device, cache_dir=work / "cache-setup")
    paths = make_ingredients(ev0, work, args.n, args.seed)
    device = torch.device(ev0.device)
    heldout = list(ev0.batches(ev0.heldout_name))
    batch_size = len(heldout[0][1])
    dataset = TensorDataset(torch.cat([x for x, _ in heldout]).cpu(), torch.cat([y for _, y in heldout]).cpu())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    per_sample = PerSampleDigits()
    loader_per_sample = DataLoader(per_sample, batch_size=batch_size, shuffle=False, num_workers=0)
    decoded = torch.cat([x for x, _ in loader_per_sample])
    assert torch.allclose(decoded, dataset.tensors[0], atol=1e-6), "per-sample decoding differs from the recipe's"
    n_heldout = len(dataset)
    print(f"{args.n} ingredients in {work}; held-out {n_heldout} examples, batch {batch_size}; "
          f"setup {time.perf_counter() - started:.1f} s", flush=True)

    reference_times, loop_times, per_sample_times, cold_times, warm_times = [], [], [], [], []
    for repeat in range(args.repeats):
        # as main.py builds it: default (contiguous) memory format, whatever the evaluator chose for itself
        model = copy.deepcopy(ev0.model).to(device, memory_format=torch.contiguous_format)
        t0 = time.perf_counter()
        ref_selected, ref_best, ref_passes, loop_seconds = reference_greedy(paths, model, loader, device)
        reference_times.append(time.perf_counter() - t0)
        loop_times.append(loop_seconds)
        t0 = time.perf_counter()
        ps_selected, _, _, _ = reference_greedy(paths, model, loader_per_sample, device)
        per_sample_times.append(time.perf_counter() - t0)

        ev = Evaluator.from_recipe(recipe, device=args.device, cache_dir=work / f"cache-{repeat}")
        passes0 = ev.forward_passes
        t0 = time.perf_counter()
        cold = greedy_soup(paths, ev)
        cold_times.append(time.perf_counter() - t0)
        cold_passes = ev.forward_passes - passes0
        t0 = time.perf_counter()
        warm = greedy_soup(paths, ev)
        warm_times.append(time.perf_counter() - t0)

        assert cold.ingredients == ref_selected == warm.ingredients == ps_selected, (cold.ingredients, ref_selected)
        assert abs(cold.score - ref_best) < 1e-12, (cold.score, ref_best)
    ref_t, loop_t, ps_t, cold_t, warm_t = (statistics.median(t) for t in (reference_times, loop_times,
                                                                          per_sample_times, cold_times, warm_times))
    stats = cold.stats
    print(f"selected (identical in both): {cold.ingredients} -> held-out {cold.score:.4f}")
    print(f"reference (torch.load + running mean + full DataLoader passes): {ref_t:.3f} s, "
          f"{ref_passes} forward passes")
    print(f"reference with per-item decoding in the Dataset (as main.py's datasets do): {ps_t:.3f} s")
    print(f"soupkit cold cache: {cold_t:.3f} s ({ref_t / cold_t:.1f}x; {ps_t / cold_t:.1f}x vs per-item decoding), "
          f"{cold_passes} forward passes")
    print(f"soupkit warm cache: {warm_t:.3f} s ({ref_t / warm_t:.1f}x; {ps_t / warm_t:.1f}x vs per-item decoding), "
          f"{warm.stats.get('forward_passes')} forward passes (greedy loop only)")
    print(f"greedy step alone (individual scores already known, as main.py's greedy step reads them from "
          f"individual_model_results.jsonl): reference {loop_t:.3f} s, soupkit warm {warm_t:.3f} s "
          f"({loop_t / warm_t:.1f}x)")
    print(f"early stop: {stats['early_stops']} of {stats['candidates_evaluated']} candidates stopped early; "
          f"{stats['examples_evaluated']:,} of {stats['examples_full']:,} held-out examples evaluated "
          f"({100 * stats['examples_saved'] / max(stats['examples_full'], 1):.0f}% saved)")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}, python {platform.python_version()}; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
