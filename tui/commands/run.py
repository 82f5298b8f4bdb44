"""`kdtui run` and `kdtui resume`: queue runs on devices, then follow them in the foreground."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from engine.rundir import RunDir
from tui.cli import app
from tui.commands.common import Overrides, RunsDir, fail, plain, root, user_errors

if TYPE_CHECKING:
    from tui.devices import DeviceSpec
    from tui.queue import Distributed

Devices = Annotated[
    list[str] | None,
    typer.Option("--device", "-d", help="cpu, cpu*N, cuda:N or a group cuda:N,M (one torchrun job); repeat for "
                                        "several devices. Default: the recipe's train.device."),
]
PerDevice = Annotated[int, typer.Option("--per-device", help="Jobs run at once on each device.")]
Detach = Annotated[bool, typer.Option("--detach", help="Queue and return at once; the queue keeps running.")]


@app.command()
@user_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
    device: Devices = None,
    per_device: PerDevice = 1,
    detach: Detach = False,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Machines in one job (torchrun).")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="This machine's rank, 0..nnodes-1.")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT of node 0.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Resume this run directory instead.")] = None,
) -> None:
    """Run a recipe: every sweep point, dealt over the devices, one job per device at a time."""
    from tui.devices import parse_device_spec
    from tui.launcher import prepare
    from tui.queue import submit

    if resume is not None:
        return _resume(find_run(str(resume), runs_dir), runs_dir, detach)
    specs = [parse_device_spec(text) for text in device or []]
    if per_device < 1:
        raise fail(f"--per-device: expected a whole number >= 1, got {per_device}")
    multinode = _multinode(nnodes, node_rank, rdzv_endpoint, specs, per_device)
    prepared = prepare(recipe, overrides, runs_dir)
    runs, queue_pid = submit(prepared, specs, root(runs_dir), per_device, multinode)
    if detach:
        for run_dir in runs:
            print(run_dir.path)
        print(f"queue: pid {queue_pid} ({len(runs)} run{'s' * (len(runs) != 1)}); `kdtui runs` shows them")
        return
    _report(runs, _follow(runs, queue_pid))


def _multinode(nnodes: int, node_rank: int, endpoint: str | None, specs: list[DeviceSpec],
               per_device: int) -> Distributed:
    from tui.queue import Distributed

    if nnodes < 1:
        raise fail(f"--nnodes: expected a whole number >= 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise fail(f"--node-rank: expected 0..{nnodes - 1}, got {node_rank}")
    if nnodes == 1:
        if endpoint or node_rank:
            raise fail("--rdzv-endpoint and --node-rank need --nnodes > 1")
        return Distributed()
    if not endpoint or not re.match(r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$", endpoint):
        raise fail(f"--rdzv-endpoint: expected HOST:PORT of node 0 (e.g. 10.0.0.1:29500), got {endpoint!r}")
    if len(specs) > 1 or per_device != 1:
        raise fail("--nnodes > 1: give one --device (the same on every node) and no --per-device")
    return Distributed(nnodes, node_rank, endpoint)


class QueuedJob:
    """What `tui.follow.follow` needs of a job run by the queue: a pid to signal and a poll()."""

    def __init__(self, run_dir: RunDir, queue_pid: int) -> None:
        self.run_dir, self.pid = run_dir, queue_pid  # Ctrl-C stops the queue, which stops its jobs

    def poll(self) -> int | None:
        from engine.rundir import effective_status

        return 0 if effective_status(self.run_dir.read_info()) in ("finished", "failed", "interrupted") else None


def _follow(runs: list[RunDir], queue_pid: int) -> dict[str, str]:
    """Progress until every run ends; then let the queue record the last results before returning."""
    from tui.follow import follow
    from tui.queue import wait_supervisor

    statuses = follow([(run_dir, QueuedJob(run_dir, queue_pid)) for run_dir in runs])  # type: ignore[misc]
    if len(statuses) == len(runs):
        wait_supervisor(queue_pid)
    return statuses


def _report(runs: list[RunDir], statuses: dict[str, str]) -> None:
    failed = False
    for run_dir in runs:
        info = run_dir.read_info()
        status = statuses.get(run_dir.id, info.get("status"))
        best = info.get("best") or {}
        shown = "  ".join(f"{k}={v:.4f}" for k, v in best.items()
                          if isinstance(v, float) and k.endswith(("top1", "top5", "loss")))
        print(f"{status}: {run_dir.path}" + (f"\n  best (epoch {best.get('epoch')}): {shown}" if shown else ""))
        if info.get("error"):
            print(f"  error: {plain(info['error'])}")
        failed |= status != "finished"
    if failed:
        raise typer.Exit(1)


def _resume(run_dir: RunDir, runs_dir: Path | None, detach: bool) -> None:
    from tui.queue import submit_resume

    del runs_dir  # the run's own runs root holds its store
    queue_pid = submit_resume(run_dir, run_dir.path.parent)
    if detach:
        print(run_dir.path)
        return
    _report([run_dir], _follow([run_dir], queue_pid))


@app.command()
@user_errors
def resume(
    run_id: Annotated[str, typer.Argument(help="Run id, unique prefix, name, or run directory.")],
    runs_dir: RunsDir = None,
    detach: Detach = False,
) -> None:
    """Continue an interrupted or failed run from its checkpoints/last.pt (on the same device)."""
    _resume(find_run(run_id, runs_dir), runs_dir, detach)


def find_run(ref: str, runs_dir: Path | None) -> RunDir:
    """A run by directory path, exact id, unique id prefix or unique name."""
    from engine.rundir import iter_run_dirs

    if Path(ref).is_dir() and (Path(ref) / "run.json").exists():
        return RunDir(Path(ref))
    runs = list(iter_run_dirs(root(runs_dir)))
    for matcher in (lambda r: r.id == ref, lambda r: r.id.startswith(ref), lambda r: r.read_info().get("name") == ref):
        found = [r for r in runs if matcher(r)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            more = f" and {len(found) - 10} more" if len(found) > 10 else ""
            raise fail(f"run {ref!r} is ambiguous: {', '.join(r.id for r in found[:10])}{more}")
    recent = f"; recent: {', '.join(r.id for r in runs[-5:])}" if runs else ""
    raise fail(f"no run {ref!r} in {root(runs_dir)}{recent}")
