#!/usr/bin/env python3
"""The self-supervised zoo on the embedded data set, small enough for 2 CPU cores in under 30 minutes.

    bench/ssl_zoo.py [--epochs 15] [--methods simclr byol ...] [--threads 2] [--also byol:optim.lr=0.1]

Pretrains every method for the same epochs from the shipped embedded SimCLR recipe
(recipes/ssl/embedded_simclr.toml: resnet8, batch 128, SGD lr 0.3 nesterov, per-step cosine after a
1-epoch warm-up, grayscale views because colour is class-free in this data set), each method with
its own loss, targets and views, but heads shrunk to this network (256-d hidden, 64-d out), the same
grayscale override, and VICReg at a 10x lower lr (see SMALL_HEADS); then runs the shipped linear
evaluation (recipes/ssl/embedded_linear_eval.toml: frozen backbone, two linear layers on cached
features, 20 epochs) on each checkpoint, and on a random backbone as the baseline. Prints: method,
linear test top-1 on the frozen backbone, kNN test top-1 of the pretraining run, pretraining time per
epoch (images / median images-per-second of the step windows) relative to SimCLR. Runs land in
--runs-dir (default a temporary folder).

Embedded-data figures say whether a method learns features at all in a few CPU minutes; they do not
rank the methods as 1000 CIFAR-10 epochs do (see the README's published table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRETRAIN = ROOT / "recipes" / "ssl" / "embedded_simclr.toml"
SIMCLR_ONLY = "[ssl]"  # its [ssl] table holds SimCLR's keys, which the other methods refuse
LINEAR = ROOT / "recipes" / "ssl" / "embedded_linear_eval.toml"
SMALL_HEADS = {  # the solo-learn CIFAR heads (2048-4096 wide) are sized for resnet18; resnet8 has 64 features
    "byol": ["ssl.byol.proj_hidden_dim=256", "ssl.byol.proj_dim=64", "ssl.byol.pred_hidden_dim=256"],
    "simsiam": ["ssl.simsiam.proj_hidden_dim=256", "ssl.simsiam.proj_dim=256", "ssl.simsiam.pred_hidden_dim=64"],
    "moco": ["ssl.moco.proj_hidden_dim=256", "ssl.moco.proj_dim=64", "ssl.moco.queue_size=1024"],
    "barlow_twins": ["ssl.barlow_twins.proj_hidden_dim=256", "ssl.barlow_twins.proj_dim=256"],
    # VICReg: lr 0.03; at the others' 0.3 plain SGD diverged within 25 steps (solo-learn uses LARS for it)
    "vicreg": ["ssl.vicreg.proj_hidden_dim=256", "ssl.vicreg.proj_dim=256", "optim.lr=0.03"],
    "dino": ["ssl.dino.proj_hidden_dim=256", "ssl.dino.proj_dim=64", "ssl.dino.num_prototypes=256"],
}
GRAY_VIEWS = ["ssl.every_view.gray_p=1.0", "ssl.every_view.crop_scale=[0.2, 1.0]",
              "ssl.every_view.jitter=[0.4, 0.4, 0.0, 0.0]"]


def train(recipe: Path, runs: Path, overrides: list[str]) -> tuple[dict, float]:
    """(run.json with its events, wall seconds) of one run through the launcher and the Trainer."""
    from engine.trainer import EXIT_FINISHED
    from engine.trainer import train as run_engine
    from tui.launcher import create_runs, prepare

    run = create_runs(prepare(recipe, overrides, runs), runs)[0]
    start = time.perf_counter()
    code = run_engine(run.path)
    wall = time.perf_counter() - start
    info = {**run.read_info(), "events": run.events(), "path": run.path}
    if code != EXIT_FINISHED:
        info["failed"] = info.get("error") or info.get("status")
    return info, wall


def last(info: dict, split: str, key: str) -> float | None:
    values = [e[key] for e in info["events"] if e["split"] == split and isinstance(e.get(key), float)]
    return values[-1] if values else None


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def seconds_per_epoch(info: dict) -> float | None:
    rates = [e["images_per_s"] for e in info["events"] if e.get("kind") == "step" and e.get("images_per_s")]
    return info["train_images"] / statistics.median(rates) if rates else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--methods", nargs="+",
                        default=["simclr", "byol", "simsiam", "moco", "barlow_twins", "vicreg", "dino"])
    parser.add_argument("--also", nargs="*", default=[], metavar="METHOD:KEY=VALUE",
                        help="extra rows: a method with one more override")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="kdtui-ssl-zoo-"))
    runs = args.runs_dir or folder / "runs"
    shared = folder / "pretrain_shared.toml"  # embedded_simclr.toml without SimCLR's own [ssl] keys
    text = PRETRAIN.read_text()
    shared.write_text(text[:text.index(SIMCLR_ONLY)] + text[text.index("[train]"):])
    common = [f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}", f"train.threads={args.threads}",
              "schedule.warmup_epochs=1"]  # VICReg diverged within 4 steps at lr 0.3 without one
    started = time.perf_counter()

    baseline, _ = train(LINEAR, runs, [f"train.threads={args.threads}", 'teacher.from=""',
                                       "linear_eval.random_backbone=true"])
    print(f"random backbone: linear test top-1 {last(baseline, 'test', 'top1'):.3f}", flush=True)
    rows = []
    for label in [*args.methods, *args.also]:
        method, _, extra = label.partition(":")
        sets = [f"run.method={method}", *common, *SMALL_HEADS.get(method, []),
                *(GRAY_VIEWS if method != "simclr" else []), *([extra] if extra else [])]
        info, wall = train(PRETRAIN if method == "simclr" else shared, runs, sets)
        if "failed" in info:
            rows.append((label, None, None, seconds_per_epoch(info), wall, info["failed"]))
            print(f"  {label}: pretraining ended: {info['failed']}", flush=True)
            continue
        linear, linear_wall = train(LINEAR, runs, [f"train.threads={args.threads}",
                                                   f"teacher.checkpoint={info['path'] / 'checkpoints' / 'last.pt'}"])
        failed = f"linear eval: {linear['failed']}" if "failed" in linear else ""
        rows.append((label, None if failed else last(linear, "test", "top1"), last(info, "test", "knn_top1"),
                     seconds_per_epoch(info), wall + linear_wall, failed))
        print(f"  {label}: linear {cell(rows[-1][1])}, kNN {cell(rows[-1][2])} ({wall:.0f} + {linear_wall:.0f} s)"
              + (f" ({failed})" if failed else ""), flush=True)

    simclr = next((r[3] for r in rows if r[0] == "simclr"), None)
    print(f"\nself-supervised zoo, embedded data: resnet8, {args.epochs} pretraining epochs, {args.threads} threads; "
          f"linear eval 20 epochs on the frozen backbone; total {time.perf_counter() - started:.0f} s")
    width = max(12, *(len(r[0]) for r in rows))
    head = ("linear top-1", "random bb", "kNN top-1", "s/epoch", "vs simclr", "run s")
    print(f"{'method':>{width}}  " + "  ".join(f"{h:>12}" for h in head))
    base = last(baseline, "test", "top1")
    for label, top1, knn, per_epoch, wall, failed in rows:
        cells = (cell(top1), f"{base:.3f}", cell(knn),
                 "-" if per_epoch is None else f"{per_epoch:.2f}",
                 f"{per_epoch / simclr:.2f}" if simclr and per_epoch else "-", f"{wall:.0f}")
        print(f"{label:>{width}}  " + "  ".join(f"{c:>12}" for c in cells) + (f"  ({failed})" if failed else ""))
    print(f"\nruns: {runs}")


if __name__ == "__main__":
    main()
