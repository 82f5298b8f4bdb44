"""Foreground progress for `kdtui run`: one Rich progress bar per job, fed by its run directory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from engine.rundir import RunDir, effective_status
from tui.tail import JsonlTail

TERMINAL = ("finished", "failed", "interrupted")


def _stats(event: dict) -> str:
    parts = [f"epoch {event.get('epoch', '?')}"]
    for key, fmt in (("loss", "loss {:.3f}"), ("top1", "top1 {:.3f}"), ("images_per_s", "{:.0f} img/s")):
        if isinstance(event.get(key), int | float):
            parts.append(fmt.format(event[key]))
    return "  ".join(parts)


def follow(jobs: list[tuple[RunDir, subprocess.Popen[bytes] | None]], console: Console | None = None,
           poll_s: float = 0.5) -> dict[str, str]:
    """Show progress until every job ends; Ctrl-C asks them all to checkpoint and stop."""
    console = console or Console()
    tails = {run.id: JsonlTail(run.metrics_path) for run, _ in jobs}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    statuses: dict[str, str] = {}
    with Progress(*columns, console=console, transient=False) as bars:
        tasks = {run.id: bars.add_task(_label(run), total=None, stats="starting") for run, _ in jobs}
        stopping = False
        while len(statuses) < len(jobs):
            try:
                for run, process in jobs:
                    if run.id in statuses:
                        continue
                    _update(bars, tasks[run.id], run, tails[run.id])
                    exited = process is not None and process.poll() is not None
                    status = effective_status(run.read_info())  # read after poll(): a queued job's poll
                    # reads run.json too, and a status read before it may predate the end it reports
                    if exited or (process is None and status in TERMINAL):
                        statuses[run.id] = status if status in TERMINAL else "failed"
                        shown = bars.tasks[tasks[run.id]].fields["stats"]
                        bars.update(tasks[run.id], stats=f"{statuses[run.id]} {shown}")
                time.sleep(poll_s)
            except KeyboardInterrupt:
                if stopping:
                    console.print("[yellow]leaving; runs continue in the background[/]")
                    break
                stopping = True
                console.print("[yellow]stopping: each run finishes its step and writes last.pt "
                              "(Ctrl-C again to leave)[/]")
                for run, process in jobs:
                    pid = process.pid if process else run.read_info().get("pid")
                    if pid and run.id not in statuses:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(pid, signal.SIGTERM)
    return statuses


def _label(run: RunDir) -> str:
    """The run's name as plain text: its escapes and [markup] are shown, never interpreted."""
    from tui.commands.common import plain

    return escape(plain(run.read_info().get("name") or run.id)[:30])


def _update(bars: Progress, task: int, run: RunDir, tail: JsonlTail) -> None:
    info = run.read_info()
    total = (info.get("epochs") or 0) * (info.get("steps_per_epoch") or 0) or None
    events = tail.read_new()
    steps = [e for e in events if e.get("split") == "train" and e.get("kind") == "step"]
    fields = {}
    if steps:
        fields["stats"] = _stats(steps[-1])
        bars.update(task, total=total, completed=steps[-1].get("step", 0), **fields)
    elif total:
        bars.update(task, total=total)
