"""Which speed switches to default: the engine's step on CPU with each `train` switch, interleaved.

    .venv/bin/python bench/switches.py [--steps 6] [--reps 5] [--threads 1] [--arch resnet20] [--compile]

resnet20 (100 classes), batch 128, random CIFAR-sized data, through the real Trainer (one short
epoch per block), in these configurations: fp32 (the baseline), bf16 autocast, channels_last,
bf16 + channels_last (and torch.compile with --compile: minutes of C++ code generation on a small
CPU, so not by default). The ratio is images/s against fp32, median of per-round ratios. On CUDA
the same comparison is part of bench/gpu_throughput.py.
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
    random_bundle,
    timed,
)

CONFIGS = {
    "fp32": "channels_last = false",
    "bf16": 'precision = "bf16"\nchannels_last = false',
    "channels_last": "channels_last = true",
    "bf16+channels_last": 'precision = "bf16"\nchannels_last = true',
}
RECIPE = """
[run]
name = "switch-{name}"
[data]
dataset = "embedded"
batch_size = {batch}
[model]
arch = "{arch}"
num_classes = 100
[train]
epochs = 1000
threads = {threads}
max_steps_per_epoch = {steps}
log_every = {steps}
evaluate = false
{switches}
"""


def run(steps: int = 6, reps: int = 5, threads: int = 1, arch: str = "resnet20", batch: int = 128,
        compile_: bool = False) -> list[Row]:
    configs = {**CONFIGS, **({"compile": "compile = true\nchannels_last = false"} if compile_ else {})}
    bundle = random_bundle(10_000)
    with tempfile.TemporaryDirectory(prefix="kdtui-bench-") as tmp:
        trainers = {name: engine_trainer(RECIPE.format(name=name, batch=batch, arch=arch, threads=threads,
                                                       steps=steps, switches=switches), bundle, Path(tmp), name)
                    for name, switches in configs.items()}
        epoch = {"n": 0}

        def block(name: str) -> float:
            epoch["n"] += 1
            return steps * batch / timed(lambda: engine_epoch(trainers[name], epoch["n"]))

        got = interleave({name: (lambda n=name: block(n)) for name in configs}, reps)
        for trainer in trainers.values():
            trainer.metrics.close()
    note = f"{arch} b{batch}, {threads} thread(s), {steps} steps x {reps} rounds"
    return [Row("switches (CPU)", f"{name} vs fp32", median(got[name]), median(got["fp32"]), "img/s", "", note,
                ratio=paired_ratio(got[name], got["fp32"])) for name in configs if name != "fp32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    print(header("speed switches"))
    print_table(run(args.steps, args.reps, args.threads, args.arch, args.batch, args.compile))


if __name__ == "__main__":
    main()
