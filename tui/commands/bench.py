"""`kdtui devices` and `kdtui bench devices`: what this machine has, and how fast each device trains.

The benchmark trains the same recipe for a fixed number of steps on each device or group,
one after another (never two at once, so they do not compete), through the same launch
path as `kdtui run` (torchrun for groups). Throughput comes from the train step events'
timestamps after a warm-up window, so process start-up, data loading and the first slow
steps are excluded. Results go to RUNS/bench/devices-<time>/results.json (and .md).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from tui.cli import app
from tui.commands.common import Overrides, RunsDir, fail, root, user_errors
from tui.commands.run import Devices

bench_app = typer.Typer(help="Benchmarks: `kdtui bench devices RECIPE --device ...`.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.command()
@user_errors
def devices(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """List this machine's devices: CPU cores and RAM, each CUDA GPU's name and memory."""
    from dataclasses import asdict

    from tui.devices import describe, detect_devices

    found = detect_devices()
    if as_json:
        print(json.dumps([asdict(d) for d in found], indent=2))
        return
    for device in found:
        print(describe(device))
    if len(found) == 1:
        print("(no CUDA device found)")


@bench_app.command("devices")
@user_errors
def bench_devices(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file (its first sweep point is used).")],
    device: Devices = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed optimizer steps per device.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps first (start-up, caches).")] = 5,
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
) -> None:
    """Train RECIPE for a fixed number of steps on each device: images/s, epoch time, speed-up, scaling."""
    from tui.devices import describe, detect_devices, parse_device_spec
    from tui.launcher import prepare

    specs = [parse_device_spec(text) for text in device or ["cpu"]]
    if not 1 <= steps <= 100_000 or not 1 <= warmup <= 10_000:
        raise fail(f"--steps 1..100000 and --warmup 1..10000 expected, got {steps} and {warmup}")
    timed = math.ceil(steps / warmup) * warmup  # whole log windows of `warmup` steps
    prepared = prepare(recipe, [*(overrides or []), "train.epochs=1", f"train.max_steps_per_epoch={warmup + timed}",
                                f"train.log_every={warmup}", "train.evaluate=false", "checkpoint.every=0"], runs_dir)
    found = detect_devices()
    print("devices on this machine:\n" + "\n".join("  " + describe(d) for d in found))
    out_dir = root(runs_dir).resolve() / "bench" / time.strftime("devices-%Y%m%d-%H%M%S")
    rows = []
    for spec in specs:
        print(f"benchmarking {spec.text}: {warmup} warm-up + {timed} timed steps ...", flush=True)
        rows.append(bench_one(prepared, spec, out_dir, root(runs_dir).resolve()))
    add_ratios(rows)
    result = {"recipe": str(prepared.source), "batch_size": prepared.points[0][1].data.batch_size,
              "arch": prepared.points[0][1].model.arch, "warmup_steps": warmup, "timed_steps": timed,
              "time": time.time(), "devices": [d.__dict__ for d in found], "rows": rows}
    table = format_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "results.md").write_text(table + "\n")
    print(table)
    print(f"saved {out_dir / 'results.json'}")


def bench_one(prepared: Any, spec: Any, out_dir: Path, runs_root: Path) -> dict[str, Any]:
    """One timed run on one device or group; the device lock keeps queued jobs off it meanwhile."""
    from tui.devices import DeviceLocks
    from tui.launcher import create_runs, spawn
    from tui.queue import capacity, job_command

    point, base = prepared.points[0]
    recipe = base.model_copy(deep=True)
    recipe.train.device = spec.train_device
    run = create_runs(replace(prepared, points=[(point, recipe)]), out_dir,
                      {"device": spec.text, "launch": {"device": spec.text}, "tags": ["bench"]})[0]
    locks = DeviceLocks(runs_root, capacity([spec]))
    held = locks.acquire(spec)
    while held is None:
        print(f"  waiting for {spec.text} (busy with a queued job) ...", flush=True)
        time.sleep(5)
        held = locks.acquire(spec)
    try:
        command, env = job_command(run, resume=False)
        start = time.time()
        process = spawn(run, False, command, env)
        try:
            code = process.wait()
        except KeyboardInterrupt:  # the job runs in its own session: stop it too
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
        wall = time.time() - start
    finally:
        locks.release(held)
    info = run.read_info()
    row = {"device": spec.text, "processes": spec.nproc, "run_dir": str(run.path), "wall_s": round(wall, 2)}
    if code != 0 or info.get("status") != "finished":
        return {**row, "error": info.get("error") or f"exit code {code}; see {run.log_path}"}
    return {**row, **throughput(run.events(), recipe.data.batch_size, info.get("batches_per_epoch"))}


def throughput(events: list[dict[str, Any]], batch_size: int, batches_per_epoch: int | None) -> dict[str, Any]:
    """Images/s between the first (warm-up) step event and the last one; epoch time projected from it."""
    marks = [e for e in events if e.get("split") == "train" and e.get("kind") == "step"]
    if len(marks) < 2 or marks[-1]["step"] <= marks[0]["step"] or marks[-1]["time"] <= marks[0]["time"]:
        return {"error": "too few steps to time (the data set is smaller than warm-up + steps batches?)"}
    steps = marks[-1]["step"] - marks[0]["step"]
    seconds = marks[-1]["time"] - marks[0]["time"]
    per_step = seconds / steps
    return {"timed_steps": steps, "timed_s": round(seconds, 3), "s_per_step": per_step,
            "images_per_s": steps * batch_size / seconds,
            "epoch_s": per_step * batches_per_epoch if batches_per_epoch else None,
            "batches_per_epoch": batches_per_epoch}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up over the plain `cpu` row; scaling efficiency of a group over its single devices."""
    speed = {r["device"]: r["images_per_s"] for r in rows if "images_per_s" in r}
    for row in rows:
        ips = row.get("images_per_s")
        row["speedup_vs_cpu"] = ips / speed["cpu"] if ips and "cpu" in speed else None
        row["scaling_efficiency"] = None
        if ips and row["processes"] > 1:
            if row["device"].startswith("cpu"):
                singles = [speed["cpu"]] if "cpu" in speed else []
            else:
                singles = [speed[f"cuda:{i}"] for i in row["device"][5:].split(",") if f"cuda:{i}" in speed]
            if singles:
                row["scaling_efficiency"] = ips / (row["processes"] * sum(singles) / len(singles))


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = ["device", "procs", "images/s", "s/step", "timed (s)", "epoch (projected)", "speed-up vs cpu (x)",
              "scaling eff."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['processes']} | failed: {r['error']} |" + " |" * (len(header) - 3))
            continue
        epoch = "-" if r.get("epoch_s") is None else f"{r['epoch_s']:.1f} s ({r['batches_per_epoch']} steps)"
        lines.append(f"| {r['device']} | {r['processes']} | {r['images_per_s']:.1f} | {r['s_per_step']:.4f} | "
                     f"{r['timed_s']:.2f} | {epoch} | {num(r['speedup_vs_cpu'], '.2f')} | "
                     f"{num(r['scaling_efficiency'], '.0%')} |")
    return "\n".join(lines)
