#!/usr/bin/env python3
"""Multi-process training before and after a change: `kdtui bench devices` in two source trees, alternating.

    git archive <commit> | tar -x -C /tmp/before
    bench/ddp_before_after.py --before /tmp/before [--rounds 3] [--steps 40] [--recipe recipes/quickstart.toml]

Each round runs `kdtui bench devices RECIPE -d cpu -d 'cpu*2'` in the --before tree, then in this one
(the same virtualenv, each tree's own engine), and reads images/s from each results.json. Prints the
medians per tree and device, cpu*2's scaling efficiency (images/s over 2 x the cpu row of the same
round), and after / before as the median of each round's ratio. On a 2-core machine `cpu*2` runs
two 1-thread gloo processes where `cpu` has both cores to itself, so the efficiency measures the
communication's cost on top.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def bench_devices(tree: Path, recipe: str, steps: int, runs: Path) -> dict[str, float]:
    """images/s per device of one `kdtui bench devices` run in `tree`."""
    env = {**os.environ, "KDTUI_RUNS_DIR": str(runs), "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-m", "tui", "bench", "devices", recipe, "-d", "cpu", "-d", "cpu*2",
                           "--steps", str(steps)], cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    saved = re.search(r"saved (\S+results\.json)", done.stdout)
    if done.returncode or not saved:
        raise SystemExit(f"{tree}: bench devices failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = json.loads(Path(saved.group(1)).read_text())["rows"]
    return {r["device"]: r["images_per_s"] for r in rows if "images_per_s" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a source tree of the earlier commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--recipe", default="recipes/quickstart.toml")
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/kdtui-ddp-bench"))
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE}
    got: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "cpu*2": [], "eff": []} for name in trees}
    for round_ in range(args.rounds):
        for name, tree in (trees.items() if round_ % 2 == 0 else reversed(trees.items())):
            speed = bench_devices(tree, args.recipe, args.steps, args.runs_dir / name)
            got[name]["cpu"].append(speed["cpu"])
            got[name]["cpu*2"].append(speed["cpu*2"])
            got[name]["eff"].append(speed["cpu*2"] / (2 * speed["cpu"]))
            print(f"round {round_ + 1} {name}: cpu {speed['cpu']:.1f} img/s, cpu*2 {speed['cpu*2']:.1f} img/s",
                  flush=True)
    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in got.items()}
    print(f"\n{args.recipe}, {args.steps} timed steps, {args.rounds} rounds (medians), load {os.getloadavg()[0]:.1f}")
    print("| | cpu images/s | cpu*2 images/s | cpu*2 scaling efficiency |")
    print("|---|---|---|---|")
    for name in trees:
        m = med[name]
        print(f"| {name} | {m['cpu']:.1f} | {m['cpu*2']:.1f} | {m['eff']:.0%} |")
    paired = {k: statistics.median(a / b for a, b in zip(got["after"][k], got["before"][k], strict=True))
              for k in ("cpu", "cpu*2", "eff")}  # each round's after over the same round's before
    print(f"| after / before (median of per-round ratios) | {paired['cpu']:.3f} | {paired['cpu*2']:.3f} | "
          f"{paired['eff']:.3f} |")


if __name__ == "__main__":
    main()
