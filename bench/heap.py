"""Benchmark 6: what keeping freed heap memory (engine.heap.keep_freed_heap) buys on CPU.

    .venv/bin/python bench/heap.py [--rounds 3] [--batches 30] [--steps 8]

The engine calls keep_freed_heap() for every CPU run (engine.trainer.setup_torch). It is a
process-wide glibc setting, so the two sides cannot share a process: each round starts one child
with glibc's defaults and one that keeps the heap (order alternating), and each child measures
(a) SimCLR two-view batches (engine.data.augment.simclr_views, uint8 CIFAR-sized batch 128) and
(b) resnet20 training steps (crop/flip/normalise + forward + backward + SGD, batch 128), both on
1 thread, with its minor page faults per batch. Reported: kept / default, median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import ROOT, Row, header, median, paired_ratio, print_table, spread


def child(kept: bool, batches: int, steps: int) -> dict[str, float]:
    """Runs in the child: times both workloads, returns per-batch seconds and page faults."""
    if kept:
        from engine.heap import keep_freed_heap

        assert keep_freed_heap()
    import torch
    from common import CIFAR_MEAN, CIFAR_STD, random_uint8

    from engine.data import augment as aug
    from engine.models import build_model

    torch.set_num_threads(1)
    x = random_uint8(128)
    gen = torch.Generator().manual_seed(0)
    model = build_model("resnet20", num_classes=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    y = torch.randint(0, 100, (128,), generator=gen)

    def views() -> None:
        aug.simclr_views(x, gen, mean=CIFAR_MEAN, std=CIFAR_STD)

    def step() -> None:
        batch = aug.normalize(aug.random_crop_flip(x, 4, generator=gen), CIFAR_MEAN, CIFAR_STD)
        loss = torch.nn.functional.cross_entropy(model(batch), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {}
    for name, fn, n in (("views", views, batches), ("step", step, steps)):
        for _ in range(3):
            fn()  # warm-up: first-touch of the heap, oneDNN primitives
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[f"{name}_s"] = median(times)
        out[f"{name}_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
    return out


def measure(kept: bool, batches: int, steps: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "kept" if kept else "default", "--batches", str(batches),
           "--steps", str(steps)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(rounds: int = 3, batches: int = 30, steps: int = 8) -> list[Row]:
    got: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for r in range(rounds):
        for kept in (False, True) if r % 2 == 0 else (True, False):
            got[kept].append(measure(kept, batches, steps))
    rows = []
    for name, what, images in (("views", "SimCLR two views, b128", 128), ("step", "resnet20 train step, b128", 128)):
        kept = [images / g[f"{name}_s"] for g in got[True]]
        default = [images / g[f"{name}_s"] for g in got[False]]
        faults = (median([g[f"{name}_faults"] for g in got[True]]), median([g[f"{name}_faults"] for g in got[False]]))
        rows.append(Row("6 heap (CPU)", f"{what}: kept heap vs glibc default", median(kept), median(default),
                        "img/s", "", f"page faults/batch {faults[0]:,.0f} vs {faults[1]:,.0f}; {rounds} rounds, "
                        f"{spread(kept, default)}", ratio=paired_ratio(kept, default)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child", choices=("default", "kept"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "kept", args.batches, args.steps)))
        return
    print(header("bench 6: kept heap"))
    print_table(run(args.rounds, args.batches, args.steps))


if __name__ == "__main__":
    main()
