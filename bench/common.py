"""Shared pieces of the benchmarks: result rows, interleaved timing, random CIFAR-sized data, and an
engine Trainer on that data (the real Trainer/Method path, with only `build_data` replaced).

Benchmarks are printed tables, never timed tests. Every figure is compared with a baseline measured
in the same process and the same run, with repetitions interleaved (A B B A A B ...) and medians
taken, because the machines we share are noisy.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from engine.data import DataBundle
    from engine.trainer import Trainer

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


@dataclass
class Row:
    """One line of a benchmark table: ours vs the baseline of the same run."""

    bench: str
    measure: str
    ours: float | None
    base: float | None
    unit: str
    target: str = ""  # e.g. ">= 5" (on ratio); empty: informational
    note: str = ""
    ratio: float | None = None  # default ours / base

    def __post_init__(self) -> None:
        if self.ratio is None and self.ours is not None and self.base:
            self.ratio = self.ours / self.base

    @property
    def ok(self) -> bool | None:
        if not self.target or self.ratio is None:
            return None
        op, value = self.target.split()
        return self.ratio >= float(value) if op == ">=" else self.ratio <= float(value)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def print_table(rows: list[Row], title: str = "") -> None:
    """One plain-text table: benchmark, measure, ours, baseline, unit, ratio, target, ok, note."""
    head = ("bench", "measure", "ours", "baseline", "unit", "ratio", "target", "ok", "note")
    cells = [head] + [
        (r.bench, r.measure, fmt(r.ours), fmt(r.base), r.unit, fmt(r.ratio), r.target,
         {None: "", True: "yes", False: "NO"}[r.ok], r.note)
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    if title:
        print(title)
    for i, c in enumerate(cells):
        line = "  ".join(c[j].ljust(widths[j]) if j < 2 or j == 4 or j == 6 else c[j].rjust(widths[j])
                         for j in range(len(head) - 1))
        print(f"{line}  {c[-1]}".rstrip())
        if i == 0:
            print("-" * (sum(widths) + 2 * len(widths) + 4))
    sys.stdout.flush()


def machine() -> str:
    """CPU model, cores, torch version and (if any) the GPU, for bench/README.md."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} CPUs (load {load:.1f}), torch {torch.__version__}, {gpu}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def interleave(blocks: dict[str, Callable[[], float]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each block `warmup` times, then `reps` rounds alternating the order (A B, B A, ...).
    Each block returns its own measurement (e.g. samples/s); all of them are returned per name."""
    names = list(blocks)
    for _ in range(warmup):
        for name in names:
            blocks[name]()
    results: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            results[name].append(blocks[name]())
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(ours: list[float], base: list[float]) -> float:
    """Median over rounds of ours_i / base_i: each pair ran back to back, so slow drifts of the
    machine's load cancel better than in a ratio of two medians."""
    return statistics.median(a / b for a, b in zip(ours, base, strict=True))


def spread(ours: list[float], base: list[float]) -> str:
    """Quartiles of the per-round ratios, to show how far the machine's noise reaches."""
    ratios = sorted(a / b for a, b in zip(ours, base, strict=True))
    if len(ratios) < 4:
        return f"rounds {min(ratios):.3f}-{max(ratios):.3f}"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"IQR {q1:.3f}-{q3:.3f}"


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Seconds for fn(), synchronising the device (if given) before and after."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def device_sync(device: Any) -> Callable[[], None] | None:
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


# ---------------------------------------------------------------- data


def random_uint8(n: int, size: int = 32, seed: int = 0) -> Any:
    """n random uint8 images [n,3,size,size]: CIFAR-sized when n=50,000 (the values do not matter
    for speed; random data makes no one mistake a benchmark for a result)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def random_bundle(n_train: int, n_test: int = 1000, classes: int = 100, size: int = 32, seed: int = 0,
                  name: str = "random") -> DataBundle:
    """A DataBundle of random uint8 images and labels (TensorSplits: one copy in memory)."""
    import torch

    from engine.data import DataBundle
    from engine.data.splits import TensorSplit

    g = torch.Generator().manual_seed(seed + 1)
    train = TensorSplit(random_uint8(n_train, size, seed), torch.randint(0, classes, (n_train,), generator=g))
    test = TensorSplit(random_uint8(n_test, size, seed + 2), torch.randint(0, classes, (n_test,), generator=g))
    return DataBundle(name=name, num_classes=classes, class_names=[f"c{i}" for i in range(classes)],
                      image_size=size, mean=CIFAR_MEAN, std=CIFAR_STD, train=train, val=None, test=test)


@contextlib.contextmanager
def patched_build_data(bundle: DataBundle) -> Iterator[None]:
    """Make the trainer use `bundle` whatever the recipe's [data] says (everything else is real)."""
    import engine.trainer as trainer_module

    original = trainer_module.build_data
    trainer_module.build_data = lambda *args, **kwargs: bundle
    try:
        yield
    finally:
        trainer_module.build_data = original


def engine_trainer(recipe_toml: str, bundle: DataBundle, workdir: Path, name: str = "bench") -> Trainer:
    """A real Trainer on a fresh run directory under `workdir`, training on `bundle`."""
    from engine.rundir import create_run_dir
    from engine.trainer import Trainer

    run = create_run_dir(workdir, name, recipe_toml, {})
    with patched_build_data(bundle):
        return Trainer(run)


def engine_epoch(trainer: Trainer, epoch: int) -> None:
    """One (short) epoch of the real loop: batches, method step, optimizer, schedule, logging."""
    trainer.progress.batch_in_epoch = 0
    trainer._train_epoch(epoch)


def save_teacher(path: Path, arch: str, bundle: DataBundle) -> Path:
    """A kdtui checkpoint of a freshly initialised `arch` that the engine accepts as a teacher."""
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, bundle.num_classes)
    save_checkpoint({"model": model.state_dict(), "arch": arch, "num_classes": bundle.num_classes,
                     "dataset": bundle.name, "class_names": list(bundle.class_names)}, path)
    return path


def header(title: str) -> str:
    return f"{title}\nmachine: {machine()}\ncommit: {commit()}  date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
