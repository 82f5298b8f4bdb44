#!/usr/bin/env python3
"""The distillation zoo on the embedded data set, small enough for 2 CPU cores in under 30 minutes.

    bench/distill_zoo.py [--teacher-epochs 15] [--epochs 10] [--methods kd crd ...] [--threads 2]

Trains one teacher once (a plain resnet20), then every method's student (resnet8) with the same data,
epochs, schedule and seed, plus the same student without distillation, through the real launcher and
Trainer (runs land in --runs-dir, default a temporary folder, so `kdtui runs --runs-dir` can show them).
The initialisation phases of ab / ft / fsp are scaled from the reference's 240-epoch schedule
(30 epochs) to --epochs; DKD keeps its 20 warm-up epochs where the run is long enough, else half the
run (a 1-epoch warm-up left the student at chance here: the embedded data set starts with a plateau
that a fully weighted DKD term keeps the student on). `--also crd:distill.feature_weight=0.1` adds
rows with other settings. Prints one table: method, student test top-1 at
the end, the no-distillation baseline, the difference, and training time per epoch (images / the
measured images per second of the main phase's step windows) relative to kd.

Embedded-data figures say whether a method learns from the teacher at all on a tiny problem; they do
not rank the methods the way a 240-epoch CIFAR-100 run does (see the README's published table).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMMON = """
[data]
dataset = "embedded"
batch_size = 64
val_fraction = 0.1
[optim]
name = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
[schedule]
name = "cosine"
per = "step"
[train]
epochs = {epochs}
seed = 0
threads = {threads}
log_every = 10
[checkpoint]
every = 0
best_metric = "val.top1"
"""


def train(text: str, name: str, folder: Path, runs: Path, overrides: list[str] | None = None) -> tuple[dict, float]:
    """(run.json, wall seconds) of one run of `text` through the launcher and the Trainer."""
    from engine.trainer import EXIT_FINISHED
    from engine.trainer import train as run_engine
    from tui.launcher import create_runs, prepare

    recipe = folder / f"{name}.toml"
    recipe.write_text(text)
    run = create_runs(prepare(recipe, overrides, runs), runs)[0]
    start = time.perf_counter()
    code = run_engine(run.path)
    wall = time.perf_counter() - start
    info = run.read_info()
    if code != EXIT_FINISHED:
        raise SystemExit(f"{name}: run ended {info.get('status')}: {info.get('error')}")
    return {**info, "events": run.events()}, wall


def seconds_per_epoch(info: dict) -> float:
    """Training images / median images-per-second of the main phase's step windows."""
    rates = [e["images_per_s"] for e in info["events"]
             if e.get("kind") == "step" and e.get("phase", "train") == "train" and e.get("images_per_s")]
    return info["train_images"] / statistics.median(rates)


def test_top1(info: dict) -> float:
    return [e for e in info["events"] if e["split"] == "test"][-1]["top1"]


def main() -> None:
    from engine.recipe_distill import ZOO_METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["kd", *ZOO_METHODS])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--also", nargs="*", default=[], metavar="METHOD:KEY=VALUE",
                        help="extra rows: a method with one more override")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="kdtui-distill-zoo-"))
    runs = args.runs_dir or folder / "runs"
    common = COMMON.format(epochs=args.epochs, threads=args.threads)
    started = time.perf_counter()

    teacher_text = '[run]\nmethod = "supervised"\n[model]\narch = "resnet20"\n' + COMMON.format(
        epochs=args.teacher_epochs, threads=args.threads)
    teacher, teacher_wall = train(teacher_text, "teacher", folder, runs)
    print(f"teacher resnet20: test top-1 {test_top1(teacher):.3f} ({teacher_wall:.0f} s)", flush=True)
    base, base_wall = train('[run]\nmethod = "supervised"\n[model]\narch = "resnet8"\n' + common, "baseline",
                            folder, runs)
    print(f"baseline resnet8: test top-1 {test_top1(base):.3f} ({base_wall:.0f} s)", flush=True)

    init_epochs = max(1, math.ceil(args.epochs * 30 / 240))  # the reference: 30 init epochs per 240
    warmup = min(20, max(1, args.epochs // 2))  # DKD: mdistiller's 20 warm-up epochs, at most half the run
    rows = []
    for label in [*args.methods, *args.also]:
        method, _, extra = label.partition(":")
        text = (f'[run]\nmethod = "{method}"\n[model]\narch = "resnet8"\n[teacher]\nfrom = "teacher.toml"\n'
                + common)
        sets = []
        if method in ZOO_METHODS:
            sets.append(f"distill.init_epochs={init_epochs if method in ('ab', 'ft', 'fsp') else 0}")
        if method == "dkd":
            sets.append(f"distill.dkd.warmup_epochs={warmup}")
        sets += [extra] if extra else []
        info, wall = train(text, method, folder, runs, sets)
        rows.append((label.replace("distill.", ""), test_top1(info), seconds_per_epoch(info), wall))
        print(f"  {label}: test top-1 {rows[-1][1]:.3f}, {rows[-1][2]:.2f} s/epoch ({wall:.0f} s)", flush=True)

    kd_epoch = next((r[2] for r in rows if r[0] == "kd"), None)
    baseline = test_top1(base)
    print(f"\ndistillation zoo, embedded data: teacher resnet20 ({args.teacher_epochs} epochs, test top-1 "
          f"{test_top1(teacher):.3f}) -> student resnet8 ({args.epochs} epochs), {args.threads} threads; "
          f"init phases {init_epochs} epoch(s), DKD warm-up {warmup}; total {time.perf_counter() - started:.0f} s")
    head = ("method", "test top-1", "baseline", "delta", "s/epoch", "vs kd", "run s")
    width = max(10, *(len(r[0]) for r in rows))
    print(f"{head[0]:>{width}}  " + "  ".join(f"{h:>10}" for h in head[1:]))
    for method, top1, per_epoch, wall in rows:
        ratio = f"{per_epoch / kd_epoch:.2f}" if kd_epoch else "-"
        cells = (method, f"{top1:.3f}", f"{baseline:.3f}", f"{top1 - baseline:+.3f}", f"{per_epoch:.2f}", ratio,
                 f"{wall:.0f}")
        print(f"{cells[0]:>{width}}  " + "  ".join(f"{c:>10}" for c in cells[1:]))
    print(f"\nruns: {runs}")


if __name__ == "__main__":
    main()
