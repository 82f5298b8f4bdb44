"""Benchmark 3 (GPU): engine images/s vs a RepDistiller-style reference pipeline, and achieved
TFLOP/s against the device's measured bf16 matmul rate.

    .venv/bin/python bench/gpu_throughput.py [--steps 50] [--reps 3] [--compile] [--kinds ...]
    .venv/bin/python bench/gpu_throughput.py --device cpu --smoke   # exercise the code on CPU

Without CUDA (and without --device cpu) it prints one "skipped: no CUDA device" row.

Workloads on random CIFAR-100-sized uint8 data (50,000 x 3x32x32, 100 classes):
- supervised: resnet18, batch --batch (512);
- hsakd: student wrn_16_2_aux taught by wrn_40_2_aux, batch --hsakd-batch (128 images = 512 rows);
- simclr: resnet18 + projection head, two views, batch 512.

Ours: the engine's Trainer (real method code, data on the GPU as uint8, batched augmentation on the
GPU, cudnn.benchmark, `deterministic = false`), in configurations fp32 and bf16, each with and
without channels_last (+ bf16 + channels_last + torch.compile with --compile): the rows that
decide the CUDA defaults of `train.precision` and `train.channels_last`. Reference: torchvision
PIL transforms in a DataLoader (num_workers = CPU count, pin_memory, non_blocking copies), a plain
fp32 loop with cudnn.benchmark (as RepDistiller sets it); HSAKD rotations stacked on the GPU and the teacher under
no_grad; SimCLR's two views made by the loader. Each reference block starts a fresh loader
iterator, trains untimed on the batches prefetched during start-up (2 per worker), then times
--steps steps. Blocks alternate engine / reference; medians of --reps.

Achieved TFLOP/s = images/s x training FLOPs per image (FIELD-NOTES: resnet18 3.33 G; wrn_16_2
0.607 G; wrn_40_2 1.97 G, its forward alone a third): supervised 3.33 G, hsakd 4 x (0.607 +
1.97 / 3) = 5.05 G (the auxiliary branches not counted), simclr 2 views x 3.33 = 6.66 G (head not
counted). Targets: engine >= 5x the reference; resnet18 at >= 25% of the measured matmul rate.
"""

from __future__ import annotations

import argparse
import os
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
from data_path import PILDataset, reference_transform

KINDS = ("supervised", "hsakd", "simclr")
GFLOP_PER_IMAGE = {"supervised": 3.33, "hsakd": 4 * (0.607 + 1.97 / 3), "simclr": 2 * 3.33}
ARCH = {"supervised": "resnet18", "hsakd": "wrn_16_2_aux", "simclr": "resnet18"}
CONFIGS = {  # explicit layouts: the "auto" default is off on CUDA until these rows say otherwise
    "fp32": 'precision = "fp32"\nchannels_last = false',
    "fp32+cl": 'precision = "fp32"\nchannels_last = true',
    "bf16": 'precision = "bf16"\nchannels_last = false',
    "bf16+cl": 'precision = "bf16"\nchannels_last = true',
}

RECIPE = """
[run]
name = "gpu-{kind}"
method = "{method}"
[data]
dataset = "embedded"
batch_size = {batch}
[model]
arch = "{arch}"
num_classes = 100
[optim]
lr = 0.05
[schedule]
name = "constant"
[train]
epochs = 100000
device = "{device}"
deterministic = false
max_steps_per_epoch = {steps}
log_every = {steps}
evaluate = false
{config}
{teacher}
"""


def matmul_tflops(device: str, n: int = 8192, iters: int = 50) -> float:
    """Measured bf16 matrix-multiply rate of the device (TFLOP/s), the denominator of MFU."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = device_sync(device) or (lambda: None)
    for _ in range(5):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


# ---------------------------------------------------------------- reference pipeline (RepDistiller style)


def reference_step(kind: str, device: str, bundle: Any, teacher_path: Path | None) -> Callable[[Any, Any], None]:
    """One fp32 training step of the reference loop on a loaded (CPU) batch."""
    import torch
    import torch.nn.functional as F

    from engine.checkpoint import load_checkpoint
    from engine.methods.losses import hsakd_student_loss
    from engine.methods.simclr import SimCLRNet
    from engine.methods.ssl_losses import ProjectionHead, nt_xent
    from engine.models import build_model

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.use_deterministic_algorithms(False)
    model = build_model(ARCH[kind], bundle.num_classes)
    if kind == "simclr":
        model = SimCLRNet(model, ProjectionHead(model.feature_dim, 512, 128))
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    teacher = None
    if kind == "hsakd":
        assert teacher_path is not None
        teacher = build_model("wrn_40_2_aux", bundle.num_classes)
        teacher.load_state_dict(load_checkpoint(teacher_path)["model"])
        teacher = teacher.to(device).eval()

    def step(x: Any, y: Any) -> None:
        y = y.to(device, non_blocking=True)
        if kind == "simclr":
            v1, v2 = x
            z1, z2 = model(torch.cat([v1, v2]).to(device, non_blocking=True)).chunk(2)
            loss = nt_xent(z1, z2, 0.5)[0]
        elif kind == "hsakd":
            x = x.to(device, non_blocking=True)
            x = torch.stack([torch.rot90(x, k, (2, 3)) for k in range(4)], 1).view(-1, *x.shape[1:])
            with torch.no_grad():
                t_main, t_aux = teacher(x)
            s_main, s_aux = model(x)
            loss = hsakd_student_loss(s_main, s_aux, t_main, t_aux, y, 3.0)["loss"]
        else:
            loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def reference_block(kind: str, bundle: Any, batch: int, steps: int, device: str,
                    step: Callable[[Any, Any], None]) -> Callable[[], float]:
    """A fresh loader iterator per block; the batches its workers prefetch while starting (2 per
    worker) are trained on untimed, then `steps` are timed; the workers stop after the block."""
    from torch.utils.data import DataLoader

    workers = os.cpu_count() or 1
    warm = 2 * workers
    hwc = bundle.train.data.permute(0, 2, 3, 1).contiguous().numpy()
    dataset = PILDataset(hwc, bundle.train.labels.numpy(), reference_transform(kind), length=(warm + steps) * batch)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.startswith("cuda"), prefetch_factor=2)
    sync = device_sync(device) or (lambda: None)

    def block() -> float:
        batches: Iterator[Any] = iter(loader)
        for _ in range(warm):
            step(*next(batches))
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step(*next(batches))
        sync()
        seconds = time.perf_counter() - start
        del batches  # joins the workers
        return steps * batch / seconds

    return block


# ---------------------------------------------------------------- engine


def engine_block(kind: str, config: str, bundle: Any, batch: int, steps: int, device: str, workdir: Path,
                 teacher_path: Path | None, arch: str | None = None) -> Callable[[], float]:
    """Images/s of `steps` steps of the real Trainer for one method `kind` (its ARCH unless `arch`)."""
    arch = arch or ARCH[kind]
    teacher = f'[teacher]\ncheckpoint = "{teacher_path}"' if teacher_path else ""
    settings = CONFIGS[config.removesuffix("+compile")] + ("\ncompile = true" if config.endswith("+compile") else "")
    recipe = RECIPE.format(kind=kind, method="supervised" if kind == "supervised" else kind, batch=batch,
                           arch=arch, device=device, steps=steps, config=settings, teacher=teacher)
    trainer = engine_trainer(recipe, bundle, workdir, name=f"{kind}-{arch}-{config}")
    sync = device_sync(device) or (lambda: None)
    state = {"epoch": 0}

    def block() -> float:
        state["epoch"] += 1
        sync()
        start = time.perf_counter()
        engine_epoch(trainer, state["epoch"])
        sync()
        return steps * batch / (time.perf_counter() - start)

    return block


def run(steps: int = 50, reps: int = 3, batch: int = 512, hsakd_batch: int = 128, device: str = "cuda",
        compile_: bool = False, kinds: tuple[str, ...] = KINDS, images: int = 50_000) -> list[Row]:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return [Row("3 GPU throughput", "all workloads", None, None, "img/s", "", "skipped: no CUDA device here")]
    configs = [*CONFIGS, *(["bf16+cl+compile"] if compile_ else [])]
    bundle = random_bundle(images, classes=100)
    n = 8192 if device.startswith("cuda") else 512
    peak = matmul_tflops(device, n, 50 if device.startswith("cuda") else 3)
    rows = [Row("3 GPU throughput", f"bf16 matmul rate (measured, {device})", peak, None, "TFLOP/s", "",
                f"{n}x{n} @ {n}x{n} bf16")]
    with tempfile.TemporaryDirectory(prefix="kdtui-bench-") as tmp:
        work = Path(tmp)
        teacher = save_teacher(work / "teacher.pt", "wrn_40_2_aux", bundle)
        for kind in kinds:
            b = hsakd_batch if kind == "hsakd" else batch
            tpath = teacher if kind == "hsakd" else None
            blocks = {c: engine_block(kind, c, bundle, b, steps, device, work, tpath) for c in configs}
            blocks["reference"] = reference_block(kind, bundle, b, steps, device,
                                                  reference_step(kind, device, bundle, tpath))
            got = {name: median(values) for name, values in interleave(blocks, reps).items()}
            for config in configs:
                tflops = got[config] * GFLOP_PER_IMAGE[kind] / 1000
                rows.append(Row("3 GPU throughput", f"{kind} {ARCH[kind]} b{b}: engine {config} vs reference",
                                got[config], got["reference"], "img/s", ">= 5",
                                f"{tflops:.1f} TFLOP/s = {tflops / peak:.0%} of matmul"))
            if kind == "supervised":
                best = max(got[c] for c in configs) * GFLOP_PER_IMAGE[kind] / 1000
                rows.append(Row("3 GPU throughput", "resnet18 achieved / matmul rate", best, peak, "TFLOP/s",
                                ">= 0.25", "best engine config"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hsakd-batch", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="also measure train.compile (slow to warm up)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the code path, not the speed")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.reps, args.batch, args.hsakd_batch = 3, 1, 16, 8
    print(header("bench 3: GPU throughput" + (" -- SMOKE RUN: checks the code path, the figures mean nothing"
                                               if args.smoke else "")))
    print_table(run(args.steps, args.reps, args.batch, args.hsakd_batch, args.device, args.compile,
                    tuple(args.kinds), images=2048 if args.smoke else 50_000))


if __name__ == "__main__":
    main()
