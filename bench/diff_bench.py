"""Benchmark `kdtui diff` (issue 7): first diff vs two bare inference passes, and the cached open.

    .venv/bin/python bench/diff_bench.py [--archs resnet8 resnet20] [--images 10000] [--device cpu]

Two real runs (the engine's Trainer, a few steps each) on the embedded data set with
`embedded_per_class = images / 10` and no validation hold-out, so the train split holds
`--images` images; the diff compares their best checkpoints on that split.

Measured in this one process, after a warm-up forward of each model:
- bare: build the data, load both models, then one plain pass of each over the split
  (normalise + forward, nothing kept): the least any comparison has to do;
- first diff: `run_diff` with empty caches (hash, load, build the data, one pass feeding both
  models, top-5/loss, write the caches, compare); target <= 1.1x bare;
- cached: `run_diff` again (both caches hit), `kdtui diff --json` as a fresh process, and the
  TUI's diff screen from push to a filled table; target < 0.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = """
[run]
name = "{arch}"
[data]
dataset = "embedded"
embedded_per_class = {per_class}
val_fraction = 0.0
batch_size = 128
eval_batch_size = 512
[model]
arch = "{arch}"
[optim]
lr = 0.05
[train]
epochs = 1
max_steps_per_epoch = {steps}
seed = 0
threads = {threads}
device = "{device}"
[checkpoint]
every = 1
"""


def train_run(arch: str, root: Path, args: argparse.Namespace) -> Path:
    from engine.trainer import EXIT_FINISHED, train
    from tui.launcher import create_runs, prepare

    recipe = root / f"{arch}.toml"
    recipe.write_text(RECIPE.format(arch=arch, per_class=args.images // 10, steps=args.steps,
                                    threads=args.threads, device=args.device))
    run = create_runs(prepare(recipe, None, root), root)[0]
    assert train(run.path) == EXIT_FINISHED, run.read_info().get("error")
    return run.checkpoints / "best.pt"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare(paths: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """Data build + model loads + one plain inference pass per model."""
    import torch

    from engine.data import augment as aug
    from engine.evaluate import checkpoint_data, load_classifier

    times = {}
    start = time.perf_counter()
    loaded = [load_classifier(p, args.device) for p in paths]
    times["load"] = time.perf_counter() - start
    start = time.perf_counter()
    data = checkpoint_data(loaded[0][1])
    split = data.train
    times["data"] = time.perf_counter() - start
    with torch.no_grad():
        for key, (model, _) in zip(("pass_a", "pass_b"), loaded, strict=True):
            sync(args.device)
            start = time.perf_counter()
            for images, _, _ in split.batches(args.batch, shuffle=False, drop_last=False, device=args.device):
                model(aug.normalize(images, data.mean, data.std))
            sync(args.device)
            times[key] = time.perf_counter() - start
    times["total"] = sum(times.values())
    return times


def first_diff(paths: list[Path], args: argparse.Namespace) -> float:
    import engine.predictions as predictions
    from engine.diff import run_diff

    for path in paths:
        shutil.rmtree(predictions.cache_dir(path), ignore_errors=True)
    predictions._BUNDLES.clear()  # no data kept from an earlier round
    start = time.perf_counter()
    run_diff(paths[0], paths[1], "train", args.device, args.batch)
    sync(args.device)
    return time.perf_counter() - start


def screen_open(paths: list[Path]) -> tuple[float, float]:
    """(wall, CPU) seconds from pushing the diff screen to its table being filled (caches warm).

    CPU time (all threads of this process) is what the open costs without other processes competing."""
    from textual.app import App
    from textual.widgets import DataTable

    from tui.screens.diff import DiffScreen

    async def measure() -> tuple[float, float]:
        app: App[None] = App()
        async with app.run_test(size=(120, 40)) as pilot:
            start, cpu = time.perf_counter(), time.process_time()
            await app.push_screen(DiffScreen(a=paths[0], b=paths[1], split="train", image_renderer="halfcell"))
            while app.screen.query_one(DataTable).row_count == 0:
                await pilot.pause(0.005)
            return time.perf_counter() - start, time.process_time() - cpu

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs=2, default=["resnet8", "resnet20"])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=20, help="training steps per model (predictions not random)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    from engine.diff import run_diff

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="kdtui-diff-bench-"))
    try:
        print(f"training {' and '.join(args.archs)} ({args.steps} steps each) on {args.images} embedded images")
        paths = [train_run(arch, root, args) for arch in args.archs]
        bares, diffs = [], []
        bare(paths, args)  # warm-up: first forward, allocator, kernels
        for _ in range(args.repeat):  # interleaved so drift in machine load hits both
            diffs.append(first_diff(paths, args))
            bares.append(bare(paths, args))
        hits, hits_cpu = [], []
        for _ in range(5):
            start, cpu = time.perf_counter(), time.process_time()
            diff = run_diff(paths[0], paths[1], "train", args.device, view=True)
            hits.append(time.perf_counter() - start)
            hits_cpu.append(time.process_time() - cpu)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tui", "diff", str(paths[0]), str(paths[1]), "--split", "train",
                               "--json"], cwd=ROOT, capture_output=True, text=True)
        cli = time.perf_counter() - start if done.returncode == 0 else float("nan")
        if done.returncode:
            print(f"kdtui diff failed: {done.stderr.strip().splitlines()[-1:]}")
        screen = min(screen_open(paths) for _ in range(3))
        load = os.getloadavg()[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(b[k] for b in bares) for k in bares[0]}
    first = statistics.median(diffs)
    print(f"\ndevice {args.device}, torch threads {torch.get_num_threads()}, {diff.n} images, batch {args.batch}, "
          f"median of {args.repeat}; {len(diff.disagreements())} disagreements; load average {load:.1f} "
          f"on {os.cpu_count()} cores")
    rows = [
        ("bare: load both checkpoints", med["load"]),
        ("bare: build the data", med["data"]),
        (f"bare: pass {args.archs[0]}", med["pass_a"]),
        (f"bare: pass {args.archs[1]}", med["pass_b"]),
        ("bare: total", med["total"]),
        ("first diff (empty caches)", first),
        ("cached diff, in process (median of 5)", statistics.median(hits)),
        ("  CPU time of that", statistics.median(hits_cpu)),
        ("cached `kdtui diff --json`, new process", cli),
        ("cached diff screen, push to table (best of 3)", screen[0]),
        ("  CPU time of that", screen[1]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds:8.3f} s")
    passes = med["pass_a"] + med["pass_b"]
    print(f"  {'ratio first diff / bare total (target <= 1.1)':<{width}}  {first / med['total']:8.3f}")
    print(f"  {'ratio (first diff - data) / (load + passes)':<{width}}  "
          f"{(first - med['data']) / (med['load'] + passes):8.3f}")


if __name__ == "__main__":
    main()
