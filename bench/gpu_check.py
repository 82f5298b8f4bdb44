"""The GPU check: one table, in under 8 minutes on one H100/H200, for the day a GPU is lent.

    bench/gpu_check.sh                     # CUDA: the real figures
    bench/gpu_check.sh --device cpu --smoke   # every code path on CPU at toy sizes (tests/test_gpu_check.py)

Rows, all on CIFAR-shaped random uint8 data made here (50,000 train images, 100 classes; no download):

1. the device's bf16 matmul rate (8192^3, measured in this run): the denominator of every TFLOP/s;
2. resnet20, wrn_16_2, resnet18 supervised at batch --batch: images/s of the engine's Trainer in
   fp32, fp32+channels_last, bf16, bf16+channels_last against a RepDistiller-style pipeline
   (torchvision PIL transforms per image in a DataLoader with CPU-count workers, pinned memory, a
   plain fp32 loop with cudnn.benchmark), blocks interleaved, medians; achieved TFLOP/s from the
   training FLOPs per image of FIELD-NOTES (resnet20 0.243 G, wrn_16_2 0.607 G, resnet18 3.33 G);
3. one epoch (50,000 images, batch 64 as the published recipes) of the HSAKD student
   (wrn_40_2_aux -> wrn_16_2_aux, 4 rotations: 4 x (0.607 + 1.97 / 3) G per image) and of the CRD
   student (wrn_40_2 -> wrn_16_2, `run.method = "crd"` with a `[teacher] checkpoint`:
   0.607 + 1.97 / 3 G, memory bank not counted), with the engine's defaults and with
   bf16 + channels_last + `deterministic = false`;
4. last, bf16 + channels_last + torch.compile per architecture against bf16 + channels_last in the
   same rounds (inductor's warm-up is untimed but takes a minute or so each): only while the time
   budget (--budget-s, 420 s) leaves room, so the rows above always come back.

Without CUDA (and without --device cpu) it prints one "skipped: no CUDA device" row. --smoke
shrinks everything (and compiles with dynamo's eager backend: inductor needs minutes on a CPU);
its figures mean nothing, only the table's shape does.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common import (
    Row,
    device_sync,
    engine_epoch,
    engine_trainer,
    header,
    interleave,
    median,
    print_table,
    random_bundle,
    save_teacher,
)
from gpu_throughput import CONFIGS, RECIPE, engine_block, matmul_tflops, reference_block

ARCHS = ("resnet20", "wrn_16_2", "resnet18")
GFLOP = {"resnet20": 0.243, "wrn_16_2": 0.607, "resnet18": 3.33, "wrn_40_2": 1.97}  # training, per image
STUDENTS = {  # method -> (student arch, teacher arch, GFLOP per source image: student train + teacher forward)
    "hsakd": ("wrn_16_2_aux", "wrn_40_2_aux", 4 * (GFLOP["wrn_16_2"] + GFLOP["wrn_40_2"] / 3)),
    "crd": ("wrn_16_2", "wrn_40_2", GFLOP["wrn_16_2"] + GFLOP["wrn_40_2"] / 3),
}
COMPILED = "bf16+cl+compile"
COMPILE_NEEDS_S = 120  # inductor's warm-up of one CIFAR net plus its timed blocks, with room to spare
FAST = 'precision = "bf16"\nchannels_last = true'
BENCH = "gpu check"


class Budget:
    """Seconds left of --budget-s; the optional rows ask before they start."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def reference_step(arch: str, classes: int, device: str) -> Callable[[Any, Any], None]:
    """RepDistiller's supervised loop: fp32, cudnn.benchmark, SGD; batches copied non-blocking."""
    import torch
    import torch.nn.functional as F

    from engine.models import build_model

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.use_deterministic_algorithms(False)
    model = build_model(arch, classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step(x: Any, y: Any) -> None:
        loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def throughput_rows(arch: str, configs: list[str], bundle: Any, batch: int, steps: int, reps: int, device: str,
                    work: Path, peak: float, baseline: str = "reference") -> list[Row]:
    """Engine configurations against a baseline measured in the same interleaved rounds: the
    RepDistiller-style reference, or another engine configuration (compile vs bf16+cl)."""
    if baseline == "reference":
        blocks = {"reference": reference_block("supervised", bundle, batch, steps, device,
                                               reference_step(arch, bundle.num_classes, device))}
    else:
        blocks = {baseline: engine_block("supervised", baseline, bundle, batch, steps, device, work, None, arch)}
    blocks.update({c: engine_block("supervised", c, bundle, batch, steps, device, work, None, arch) for c in configs})
    got = {name: median(values) for name, values in interleave(blocks, reps).items()}
    rows = []
    for config in configs:
        tflops = got[config] * GFLOP[arch] / 1000
        rows.append(Row(BENCH, f"{arch} b{batch}: engine {config} vs {baseline}", got[config], got[baseline],
                        "img/s", ">= 5" if baseline == "reference" else "",
                        f"{tflops:.2f} TFLOP/s = {tflops / peak:.1%} of matmul"))
    return rows


def student_epoch_row(method: str, label: str, config: str, bundle: Any, batch: int, device: str, work: Path,
                      teachers: dict[str, Path], peak: float) -> Row:
    """One whole epoch of a distillation student through the Trainer (its first: warm-up included)."""
    student, teacher, gflop = STUDENTS[method]
    measure = f"{method} student 1 epoch ({len(bundle.train):,} img, b{batch}) {teacher} -> {student}, {label}"
    steps = len(bundle.train) // batch
    recipe = RECIPE.format(kind=method, method=method, batch=batch, arch=student, device=device, steps=steps,
                           config=config, teacher=f'[teacher]\ncheckpoint = "{teachers[teacher]}"')
    if not config:  # the engine's defaults, deterministic included
        recipe = recipe.replace("deterministic = false\n", "")
    with torch_flags():  # the defaults' deterministic mode is process-wide: keep it to this row
        trainer = engine_trainer(recipe, bundle, work, name=f"{method}-{label}")
        sync = device_sync(device) or (lambda: None)
        sync()
        start = time.perf_counter()
        engine_epoch(trainer, 0)
        sync()
        seconds = time.perf_counter() - start
    images_per_s = steps * batch / seconds
    tflops = images_per_s * gflop / 1000
    return Row(BENCH, measure, images_per_s, None, "img/s", "",
               f"epoch {seconds:.1f} s ({steps} steps); {tflops:.2f} TFLOP/s = {tflops / peak:.1%} of matmul")


@contextlib.contextmanager
def torch_flags() -> Iterator[None]:
    """Restore torch's process-wide determinism and cudnn switches afterwards (setup_torch sets them)."""
    import torch

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def use_eager_compile() -> None:
    """Smoke runs: `Module.compile()` through dynamo with the eager backend (no inductor codegen)."""
    import torch

    original = torch.nn.Module.compile

    def compile_eager(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **{"backend": "eager", **kwargs})

    torch.nn.Module.compile = compile_eager  # type: ignore[method-assign]


def run(device: str = "cuda", batch: int = 512, steps: int = 40, reps: int = 2, images: int = 50_000,
        epoch_images: int = 50_000, epoch_batch: int = 64, budget_s: float = 420.0,
        archs: tuple[str, ...] = ARCHS, smoke: bool = False) -> list[Row]:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return [Row(BENCH, "all rows", None, None, "img/s", "", "skipped: no CUDA device here")]
    budget = Budget(budget_s)
    if smoke:
        use_eager_compile()
    n = 8192 if device.startswith("cuda") else 256
    peak = matmul_tflops(device, n, 200 if device.startswith("cuda") else 3)
    rows = [Row(BENCH, f"bf16 matmul rate (measured, {device})", peak, None, "TFLOP/s", "", f"{n}^3 bf16")]
    bundle = random_bundle(images, classes=100)
    epoch_bundle = bundle if epoch_images == images else random_bundle(epoch_images, classes=100, seed=7)
    with tempfile.TemporaryDirectory(prefix="kdtui-gpu-check-") as tmp:
        work = Path(tmp)
        for arch in archs:
            rows += throughput_rows(arch, list(CONFIGS), bundle, batch, steps, reps, device, work, peak)
        teachers = {arch: save_teacher(work / f"{arch}.pt", arch, epoch_bundle)
                    for arch in ("wrn_40_2_aux", "wrn_40_2")}
        for method in STUDENTS:
            for label, config in (("engine defaults", ""), ("bf16+cl, deterministic = false", FAST)):
                rows.append(student_epoch_row(method, label, config, epoch_bundle, epoch_batch, device, work,
                                              teachers, peak))
        for arch in archs:  # compile last: it is the optional part of the budget
            if budget.left() < (15 if smoke else COMPILE_NEEDS_S):
                rows.append(Row(BENCH, f"{arch} b{batch}: engine {COMPILED}", None, None, "img/s", "",
                                f"skipped: {budget.left():.0f} s left of --budget-s {budget_s:.0f}"))
                continue
            rows += throughput_rows(arch, [COMPILED], bundle, batch, steps, reps, device, work, peak, "bf16+cl")
            if smoke:
                rows[-1].note += " (smoke: dynamo, eager backend)"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per block")
    parser.add_argument("--reps", type=int, default=2, help="interleaved rounds per block (after one warm-up)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for the whole table: a compile row starts only while 120 s of it are left")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: check the code path, not the speed")
    args = parser.parse_args()
    sizes: dict[str, Any] = {}
    if args.smoke:
        args.batch, args.steps, args.reps = 8, 1, 1
        sizes = {"images": 256, "epoch_images": 32, "epoch_batch": 8}
    print(header("GPU check" + (" -- SMOKE RUN: checks the code path, the figures mean nothing" if args.smoke
                                else "")), flush=True)
    started = time.monotonic()
    rows = run(args.device, args.batch, args.steps, args.reps, budget_s=args.budget_s, smoke=args.smoke, **sizes)
    print_table(rows)
    print(f"wall time {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
