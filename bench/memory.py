"""Benchmark 5: peak memory while training resnet20 on a CIFAR-100-sized in-memory dataset, on CPU.

    .venv/bin/python bench/memory.py [--steps 10] [--images 50000]

Each measurement is a fresh child process (so peaks do not mix) that trains resnet20 through the
engine's Trainer for --steps steps of batch 128 on random uint8 data. The data enters through
`build_data` itself (only the dataset loader is replaced, by random CIFAR-100-shaped splits:
50,000 train + 10,000 test), so the val hold-out is made the engine's way. Reported: the child's
peak RSS (resource.getrusage ru_maxrss); how much RSS Trainer() added (data, model, optimizer:
before any activation) and its high-water mark while loading, each minus the same figure of a
baseline child with 1,000 + 200 images and divided by the extra images' uint8 size = the number of
copies of the data. Targets: peak < 2 GB; one copy of the data held.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, Row, header, print_table

RECIPE = """
[run]
name = "memory"
[data]
dataset = "cifar100"
root = "{root}"
batch_size = 128
download = false
[model]
arch = "resnet20"
[train]
epochs = 1
threads = {threads}
max_steps_per_epoch = {steps}
evaluate = false
"""


def child(images: int, steps: int, threads: int) -> dict[str, float]:
    """Runs in the child: build data through build_data, train, report memory (bytes)."""
    import torch
    from common import random_uint8

    import engine.data as data_module
    from engine.data.splits import TensorSplit
    from engine.rundir import create_run_dir
    from engine.trainer import Trainer

    tests = max(images // 5, 1)

    def fake_load(*args: object, **kwargs: object) -> tuple:
        g = torch.Generator().manual_seed(0)
        train = TensorSplit(random_uint8(images, seed=1), torch.randint(0, 100, (images,), generator=g))
        test = TensorSplit(random_uint8(tests, seed=2), torch.randint(0, 100, (tests,), generator=g))
        return train, test, [f"c{i}" for i in range(100)], (0.5,) * 3, (0.25,) * 3

    data_module._load = fake_load  # only the file reading is replaced; subsets are build_data's
    with tempfile.TemporaryDirectory(prefix="kdtui-bench-") as tmp:
        run = create_run_dir(Path(tmp), "memory", RECIPE.format(root=tmp, threads=threads, steps=steps), {})
        before = _status("VmRSS")
        trainer = Trainer(run)  # data, model, optimizer; no activations yet
        loaded, loading_peak = _status("VmRSS") - before, _status("VmHWM") - before
        trainer._train_epoch(0)
        held = {s.data.untyped_storage().data_ptr(): s.data.untyped_storage().nbytes()
                for s in (trainer.data.train, trainer.data.val, trainer.data.test) if s is not None}
        trainer.metrics.close()
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "loaded": loaded,
            "loading_peak": loading_peak, "held": float(sum(held.values())), "images": images + tests}


def _status(field: str) -> float:
    """A /proc/self/status memory figure (VmRSS: now, VmHWM: peak so far) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return float(line.split()[1]) * 1024
    return float("nan")


def measure(images: int, steps: int, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", str(images), str(steps), str(threads)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(steps: int = 10, images: int = 50_000, threads: int = 1) -> list[Row]:
    big, small = measure(images, steps, threads), measure(1000, steps, threads)
    mb = 1024 * 1024
    data = (big["images"] - small["images"]) * 3 * 32 * 32  # what the extra images cost as uint8
    return [
        Row("5 memory (CPU)", "peak RSS, resnet20 training vs 2 GB", big["peak"] / mb, 2048.0, "MB", "<= 1",
            f"{big['images']:,} images = {big['images'] * 3072 / mb:.0f} MB of uint8; "
            f"baseline child (1,200 images) {small['peak'] / mb:.0f} MB"),
        Row("5 memory (CPU)", "data copies held after loading (RSS delta)", (big["loaded"] - small["loaded"]) / data,
            1.0, "copies", "<= 1.5", f"Trainer() grew RSS by {big['loaded'] / mb:.0f} vs {small['loaded'] / mb:.0f} "
            f"MB; the splits' tensors hold {big['held'] / mb:.0f} MB"),
        Row("5 memory (CPU)", "data copies at the loading peak (HWM delta)",
            (big["loading_peak"] - small["loading_peak"]) / data, 1.0, "copies", "",
            "transient: build_data's val hold-out copies train while the original is alive"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    print(header("bench 5: peak memory"))
    print_table(run(args.steps, args.images, args.threads))


if __name__ == "__main__":
    main()
