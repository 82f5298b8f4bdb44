"""Benchmark 2: batched uint8 augmentation vs a torchvision DataLoader with PIL transforms, on CPU.

    .venv/bin/python bench/data_path.py [--batches 20] [--reps 5] [--batch 128] [--threads 1 2]

Both sides produce normalised float batches ready for the model from the same random CIFAR-sized
uint8 data (50,000 images), measured as source images per second:

- plain: RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize (RepDistiller);
- hsakd: the same, then the 4 rotations stacked per image (HSAKD's training loop does this on
  the loaded batch with torch.rot90); ours: `augment.rotate4` on the augmented batch;
- simclr: two views of RandomResizedCrop(32) + flip + ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 +
  RandomGrayscale(0.2) + ToTensor + Normalize (the common SimCLR CIFAR pipeline); the reference
  yields the two view batches as a list, ours one [2B] batch ready for the model (the reference's
  `torch.cat` of the two, which SimCLR training loops then do, is not timed).

Reference: torchvision.transforms on PIL images in a DataLoader with num_workers = CPU count; each
block starts a fresh iterator, takes the batches prefetched during start-up untimed, then times
--batches batches and shuts the workers down (so they neither flatter the block nor run during
ours). Ours: TensorSplit.batches + engine.data.augment on CPU tensors in the main process, once
with 1 intra-op thread and once with as many as there are CPUs (--threads): on a quiet machine the
second is the like-for-like comparison with CPU-count workers; on a shared, loaded one, OpenMP
threads spin against the other processes and one thread is faster. Blocks alternate;
the ratio is the median of per-round ratios. Target: >= 5x.

The process keeps freed heap memory for reuse (`engine.heap.keep_freed_heap`), as the engine does
for every CPU run; the reference's workers are forked from it and inherit that. Without it, glibc
returns the batch buffers to the OS and page-faults them in again for every batch.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

from common import CIFAR_MEAN, CIFAR_STD, Row, header, interleave, median, paired_ratio, print_table, spread, timed

KINDS = ("plain", "hsakd", "simclr")


class PILDataset:
    """CIFAR the torchvision way: HWC uint8 numpy rows, one PIL image per __getitem__. `length`
    (default: the number of images) wraps around, so one epoch can be as long as a benchmark needs."""

    def __init__(self, data_hwc: Any, labels: Any, transform: Callable[[Any], Any], length: int | None = None) -> None:
        self.data, self.labels, self.transform = data_hwc, labels, transform
        self.length = length or len(data_hwc)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        i %= len(self.data)
        return self.transform(Image.fromarray(self.data[i])), int(self.labels[i])


class TwoViews:
    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> list[Any]:
        return [self.transform(image), self.transform(image)]


def reference_transform(kind: str) -> Callable[[Any], Any]:
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    if kind == "simclr":
        return TwoViews(T.Compose([
            T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2), *normalize]))
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])


def endless(make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    while True:
        yield from make()


def reference_block(kind: str, data_hwc: Any, labels: Any, batch: int, workers: int,
                    batches: int) -> Callable[[], float]:
    """One timed block of the reference: a fresh loader iterator; the batches its workers prefetch
    while starting (workers x prefetch_factor) are taken untimed, then `batches` are timed, then the
    workers are shut down, so they neither flatter this block nor run during the other side's."""
    import torch
    from torch.utils.data import DataLoader

    warm = 2 * workers
    dataset = PILDataset(data_hwc, labels, reference_transform(kind), length=(warm + batches) * batch)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        prefetch_factor=2 if workers else None)

    def consume(x: Any, y: Any) -> None:
        if kind == "hsakd":  # HSAKD's train loop: rotations of the loaded batch, joint labels
            x = torch.stack([torch.rot90(x, k, (2, 3)) for k in range(4)], 1).view(-1, 3, 32, 32)
            y = torch.stack([y * 4 + k for k in range(4)], 1).view(-1)

    def block() -> float:
        it = iter(loader)
        take(it, warm, consume)
        seconds = timed(functools.partial(take, it, batches, consume))
        del it  # joins the workers
        return batches * batch / seconds

    return block


def take(stream: Iterator[Any], n: int, consume: Callable[..., None] | None = None) -> None:
    """Draw n batches (passing each to `consume`), dropping each before the next, as a training loop
    does: keeping them all alive would time page faults on fresh memory instead of the augmentation."""
    for _ in range(n):
        batch = next(stream)
        if consume:
            consume(*batch)


def batched_stream(kind: str, split: Any, batch: int) -> Iterator[Any]:
    import torch

    from engine.data import augment as aug

    gen = torch.Generator().manual_seed(0)
    for x, y, _ in endless(lambda: split.batches(batch, shuffle=True, drop_last=True, generator=gen)):
        if kind == "simclr":
            yield aug.simclr_views(x, gen, mean=CIFAR_MEAN, std=CIFAR_STD), y
            continue
        x = aug.normalize(aug.random_crop_flip(x, 4, generator=gen), CIFAR_MEAN, CIFAR_STD)
        if kind == "hsakd":
            x, y = aug.rotate4(x), aug.joint_labels(y)
        yield x, y


def run(batches: int = 20, reps: int = 5, batch: int = 128, threads: tuple[int, ...] | None = None,
        images: int = 50_000, kinds: tuple[str, ...] = KINDS) -> list[Row]:
    """One row per (kind, thread count of ours); default thread counts: 1 and the CPU count."""
    import torch
    from common import random_uint8

    from engine.data.splits import TensorSplit
    from engine.heap import keep_freed_heap

    keep_freed_heap()  # as engine.trainer.setup_torch does for CPU runs
    workers = os.cpu_count() or 1
    threads = tuple(dict.fromkeys(threads or (1, workers)))
    x = random_uint8(images)
    y = torch.randint(0, 100, (images,), generator=torch.Generator().manual_seed(1))
    hwc = x.permute(0, 2, 3, 1).contiguous().numpy()  # what torchvision's CIFAR dataset holds
    split = TensorSplit(x, y)
    rows = []
    for kind in kinds:
        ref = reference_block(kind, hwc, y.numpy(), batch, workers, batches)
        ours = batched_stream(kind, split, batch)

        def block(n: int, stream: Iterator[Any] = ours) -> float:
            torch.set_num_threads(n)
            seconds = timed(functools.partial(take, stream, batches))
            torch.set_num_threads(1)  # the reference's main process: collation and HSAKD's rotations
            return batches * batch / seconds

        got = interleave({**{f"ours{n}": functools.partial(block, n) for n in threads}, "ref": ref}, reps)
        for n in threads:
            mine = got[f"ours{n}"]
            rows.append(Row("2 data path (CPU)", f"{kind}: batched ({n} thread{'s' * (n > 1)}) vs PIL DataLoader",
                            median(mine), median(got["ref"]), "img/s", ">= 5",
                            f"b{batch}, {workers} workers, {batches} batches x {reps} rounds, "
                            f"{spread(mine, got['ref'])}", ratio=paired_ratio(mine, got["ref"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="intra-op thread counts for ours (default: 1 and the CPU count)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args()
    print(header("bench 2: data path"))
    print_table(run(args.batches, args.reps, args.batch, tuple(args.threads or ()) or None, kinds=tuple(args.kinds)))


if __name__ == "__main__":
    main()
