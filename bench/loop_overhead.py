"""Benchmark 1: the engine's training loop vs a bare hand-written PyTorch loop, on CPU.

    .venv/bin/python bench/loop_overhead.py [--steps 8] [--reps 15] [--threads 1] [--batch 128]

Same model (resnet20, 100 classes), same batch size, same random CIFAR-sized uint8 data, same
augmentation functions (random crop with padding 4 + flip, normalise), same SGD settings, same
memory layout (the engine's default, resolved for CPU), same thread count, one process. The
engine side is a real Trainer on a run directory (its `_train_epoch` with `max_steps_per_epoch` =
--steps: batching, the method's train_step, autocast context, GradScaler, LR schedule, per-step
scalars, metric events and TensorBoard). The bare side is the loop everyone writes by hand.
Blocks alternate (A B B A ...); the ratio is the median of per-round ratios of images/s.
Target: engine / bare >= 0.97.

The log window is one block, so every block writes one step event and one epoch event: far more
logging per step than a real 390-step epoch, which makes the measured overhead an upper bound.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import (
    Row,
    engine_epoch,
    engine_trainer,
    header,
    interleave,
    median,
    paired_ratio,
    print_table,
    spread,
    timed,
)

RECIPE = """
[run]
name = "loop-overhead"
[data]
dataset = "embedded"
batch_size = {batch}
[model]
arch = "resnet20"
num_classes = 100
[optim]
lr = 0.05
[schedule]
name = "cosine"
[train]
epochs = 200
threads = {threads}
max_steps_per_epoch = {steps}
log_every = {steps}
evaluate = false
"""


def run(steps: int = 8, reps: int = 15, threads: int = 1, batch: int = 128, images: int = 10_000) -> list[Row]:
    import torch
    import torch.nn.functional as F
    from common import random_bundle

    from engine.data import augment as aug
    from engine.models import build_model

    bundle = random_bundle(images)
    with tempfile.TemporaryDirectory(prefix="kdtui-bench-") as tmp:
        trainer = engine_trainer(RECIPE.format(batch=batch, threads=threads, steps=steps), bundle, Path(tmp))
        torch.set_num_threads(threads)

        torch.manual_seed(0)
        model = build_model("resnet20", 100)
        layout = torch.channels_last if trainer.recipe.train.channels_last_on("cpu") else torch.contiguous_format
        model = model.to(memory_format=layout)  # the engine's resolved default ("auto": NHWC on CPU)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        x_all, y_all = bundle.train.data, bundle.train.labels
        state = {"epoch": 0}

        def bare() -> float:
            state["epoch"] += 1
            gen = torch.Generator().manual_seed(state["epoch"])

            def loop() -> None:
                model.train()
                order = torch.randperm(len(y_all), generator=gen)
                for i in range(steps):
                    idx = order[i * batch:(i + 1) * batch]
                    x = aug.random_crop_flip(x_all.index_select(0, idx), 4, generator=gen)
                    x = aug.normalize(x, bundle.mean, bundle.std)
                    loss = F.cross_entropy(model(x.contiguous(memory_format=layout)), y_all.index_select(0, idx))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                float(loss.detach())  # wait for the last step, as the engine does

            return steps * batch / timed(loop)

        def engine() -> float:
            state["epoch"] += 1
            return steps * batch / timed(lambda: engine_epoch(trainer, state["epoch"] % 200))

        got = interleave({"engine": engine, "bare": bare}, reps)
        trainer.metrics.close()
    note = (f"resnet20 b{batch}, {threads} thread(s), {steps} steps x {reps} rounds, median of paired ratios "
            f"({spread(got['engine'], got['bare'])})")
    return [Row("1 loop overhead (CPU)", "engine step vs bare loop", median(got["engine"]), median(got["bare"]),
                "img/s", ">= 0.97", note, ratio=paired_ratio(got["engine"], got["bare"]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    print(header("bench 1: training-loop overhead"))
    print_table(run(args.steps, args.reps, args.threads, args.batch))


if __name__ == "__main__":
    main()
