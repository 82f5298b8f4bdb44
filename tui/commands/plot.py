"""`kdtui plot` and `kdtui watch`: plotext curves on stdout, for a plain SSH shell or a log file."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from tui.cli import app
from tui.commands.common import RunsDir, fail, user_errors

METRIC_CHOICES = ("top1", "top5", "loss", "lr")
SPLIT_CHOICES = ("val", "train", "test")
TERMINAL = ("finished", "failed", "interrupted")
COLORS = ("blue", "red", "green", "orange", "magenta", "cyan", "yellow", "gray")


def _check(metric: str, split: str) -> str:
    if metric not in METRIC_CHOICES:
        raise fail(f"--metric: expected one of {', '.join(METRIC_CHOICES)}, got {metric!r}")
    if split not in SPLIT_CHOICES:
        raise fail(f"--split: expected one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    return "train" if metric == "lr" else split  # the learning rate is only logged with training steps


def _curve(events: list[dict[str, Any]], info: dict[str, Any], split: str, metric: str) -> tuple[list, list]:
    from tui.widgets.series import curves_from

    xs, ys = curves_from(events, info.get("steps_per_epoch")).get(split, metric)
    return xs, [y * 100 for y in ys] if metric in ("top1", "top5") else ys


def figure(runs: list[tuple[str, list[float], list[float]]], title: str, width: int, height: int, color: bool,
           log_y: bool = False) -> str:
    """The plot as text: one line per run, overlaid, legend = run names."""
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("pro" if color else "clear")
    for index, (name, xs, ys) in enumerate(runs):
        if xs:
            plt.plot(xs, ys, label=name, color=COLORS[index % len(COLORS)] if color else None)
    if log_y:
        plt.yscale("log")
    plt.title(title)
    plt.xlabel("epoch")
    text = plt.build()
    return text if color else plt.uncolorize(text)


def _size(width: int | None, height: int | None) -> tuple[int, int]:
    columns, lines = shutil.get_terminal_size((100, 30))
    return width or min(columns, 160), height or max(min(lines - 4, 30), 12)


def _title(split: str, metric: str) -> str:
    return f"{split} {metric}" + (" (%)" if metric in ("top1", "top5") else "")


@app.command()
@user_errors
def plot(
    runs: Annotated[list[str], typer.Argument(help="Run ids, unique prefixes, names or run directories.")],
    metric: Annotated[str, typer.Option(help="top1, top5, loss or lr.")] = "top1",
    split: Annotated[str, typer.Option(help="val, train or test.")] = "val",
    runs_dir: RunsDir = None,
    width: Annotated[int | None, typer.Option(help="Columns (default: the terminal's).")] = None,
    height: Annotated[int | None, typer.Option(help="Lines (default: the terminal's).")] = None,
    log_y: Annotated[bool, typer.Option("--log", help="Logarithmic y axis.")] = False,
    color: Annotated[bool | None, typer.Option("--color/--no-color", help="Default: colour on a terminal.")] = None,
) -> None:
    """Print the curves of one or more runs, overlaid (several runs = one line each)."""
    from tui.commands.run import find_run

    split = _check(metric, split)
    lines = []
    for ref in runs:
        run = find_run(ref, runs_dir)
        info = run.read_info()
        xs, ys = _curve(run.events(), info, split, metric)
        if not xs:
            print(f"kdtui: {run.id}: no {split} {metric} logged yet", file=sys.stderr)
        lines.append((str(info.get("name") or run.id), xs, ys))
    if not any(xs for _, xs, _ in lines):
        raise typer.Exit(1)
    print(figure(lines, _title(split, metric), *_size(width, height), sys.stdout.isatty() if color is None else color,
                 log_y))


@app.command()
@user_errors
def watch(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Run id, unique prefix, name or run directory.")],
    runs_dir: RunsDir = None,
    interval: Annotated[float, typer.Option(help="Seconds between redraws.")] = 2.0,
    color: Annotated[bool | None, typer.Option("--color/--no-color", help="Default: colour on a terminal.")] = None,
) -> None:
    """Redraw train loss and val top-1 as the run trains, until it ends or Ctrl-C (the run keeps going)."""
    from engine.rundir import effective_status
    from tui.commands.run import find_run
    from tui.tail import JsonlTail

    if not 0.1 <= interval <= 3600:
        raise fail(f"--interval: expected 0.1 to 3600 seconds, got {interval}")
    run = find_run(run_ref, runs_dir)
    tail, events = JsonlTail(run.metrics_path), []
    color = sys.stdout.isatty() if color is None else color
    try:
        while True:
            events += tail.read_new()
            info = run.read_info()
            status = effective_status(info) if info else "missing"
            _redraw(run.path, info, status, events, color)
            if status in TERMINAL or status == "missing":
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        print("\nkdtui: stopped watching; the run continues")
        return
    if status != "finished":
        raise typer.Exit(1)


def _redraw(path: Path, info: dict[str, Any], status: str, events: list[dict[str, Any]], color: bool) -> None:
    width, height = _size(None, None)
    half = max((height - 2) // 2, 8)
    done = f"epoch {info.get('epoch', 0)}/{info.get('epochs', '?')}"
    head = f"{info.get('name') or path.name}  {status}  {done}  ({path})"
    parts = [head]
    for split, metric in (("train", "loss"), ("val", "top1")):
        xs, ys = _curve(events, info, split, metric)
        if split == "val" and not xs:  # no validation split: fall back to test
            split, (xs, ys) = "test", _curve(events, info, "test", metric)
        parts.append(figure([(str(info.get("name") or path.name), xs, ys)], _title(split, metric), width, half, color))
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[2J\x1b[H")
    print("\n".join(parts), flush=True)
