"""Per-device job queue: sweep points dealt over device slots, run by a detached supervisor.

`submit()` creates one `queued` run directory per sweep point, deals the points
round-robin over the slots (each `--device` times `--per-device`), records them in the
store and starts `python -m tui.queue` in its own session. That supervisor outlives the
terminal: each slot runs its points one after another, it records every start and end
in the store, and SIGTERM stops it cleanly (running jobs checkpoint and become
`interrupted`, points not yet started become `interrupted` too). Slots also hold an
exclusive lock per physical device (`runs/.locks/`), so two `kdtui run` commands aimed at
the same GPU wait for each other instead of sharing it. A queued run records the
supervisor's pid (`queue_pid`): if the supervisor dies, its queued runs show as
`interrupted` and `kdtui resume` starts them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.rundir import RunDir, effective_status
from tui.devices import DeviceSpec, cpu_cores, parse_device_spec
from tui.launcher import Prepared, create_runs, engine_command, engine_env, spawn
from tui.store import RunStore, doc_from_run, files_stamp

TERMINAL = ("finished", "failed", "interrupted")
QUEUE_LOG = "queue.log"


class QueueError(UserError):
    """A run that cannot be queued or stopped in its current state."""


@dataclass(frozen=True)
class Distributed:
    """torchrun pass-through for jobs spanning machines (every node runs the same command)."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None


# ---------------------------------------------------------------- submitting


def submit(prepared: Prepared, specs: list[DeviceSpec], runs_dir: Path, per_device: int = 1,
           multinode: Distributed = Distributed(),
           extra_info: dict[str, Any] | None = None) -> tuple[list[RunDir], int]:
    """Create queued runs for every sweep point and start their supervisor; returns (runs, its pid).

    Without specs each point runs on its own recipe's train.device.
    """
    root = runs_dir.resolve()
    slots: list[DeviceSpec] = [spec for spec in specs for _ in range(per_device)]
    plan: list[tuple[int, DeviceSpec]] = []
    for i, (_, recipe) in enumerate(prepared.points):
        if specs:
            plan.append((i % len(slots), slots[i % len(slots)]))
            continue
        spec = parse_device_spec(recipe.train.device)
        own = [j for j, s in enumerate(slots) if s == spec]
        if not own:
            own = list(range(len(slots), len(slots) + per_device))
            slots += [spec] * per_device
        plan.append((own[sum(1 for _, s in plan if s == spec) % len(own)], spec))
    runs, lanes = [], [[] for _ in slots]
    store = RunStore(root)
    for (point, recipe), (slot, spec) in zip(prepared.points, plan, strict=True):
        recipe = recipe.model_copy(deep=True)
        recipe.train.device = spec.train_device
        launch = {"device": spec.text, "nnodes": multinode.nnodes, "node_rank": multinode.node_rank,
                  "rdzv_endpoint": multinode.rdzv_endpoint}
        run = create_runs(replace(prepared, points=[(point, recipe)]), root,
                          {"device": spec.text, "launch": launch, **(extra_info or {})})[0]
        store.upsert(doc_from_run(run))
        runs.append(run)
        lanes[slot].append(run.id)
    return runs, start_supervisor(root, [lane for lane in lanes if lane], capacity(slots))


def capacity(slots: list[DeviceSpec]) -> dict[str, int]:
    """How many jobs may use each physical device at once (slots naming it)."""
    counts: dict[str, int] = {}
    for spec in slots:
        for name in spec.slots:
            counts[name] = counts.get(name, 0) + 1
    return counts


def submit_resume(run: RunDir, runs_dir: Path) -> int:
    """Queue an interrupted or failed run again (from last.pt when it has one); returns the supervisor pid."""
    info = run.read_info()
    if not info:
        raise QueueError(f"{run.path}: not a run directory (no readable run.json)")
    status = effective_status(info)
    if status in ("running", "queued"):
        raise QueueError(f"{run.id} is {status} (pid {info.get('pid') or info.get('queue_pid')}); stop it first")
    if status == "finished":
        raise QueueError(f"{run.id} already finished; `kdtui relaunch {run.id}` starts a new run like it")
    if not (run.checkpoints / "last.pt").exists():  # starting over: drop the partial curves
        run.metrics_path.unlink(missing_ok=True)
        shutil.rmtree(run.tb_dir, ignore_errors=True)
    spec = parse_device_spec((info.get("launch") or {}).get("device") or info.get("device") or "cpu")
    run.update_info(status="queued", error=None, queue_pid=None, ended=None)
    root = runs_dir.resolve()
    RunStore(root).upsert(doc_from_run(run))
    return start_supervisor(root, [[run.id]], capacity([spec]))


def stop_run(run: RunDir) -> str:
    """SIGTERM a running job's process group (it checkpoints and becomes `interrupted`), or cancel a
    queued one. Returns what was done, for the user."""
    info = run.read_info()
    status = effective_status(info)
    if status == "queued":
        run.update_info(status="interrupted", error="stopped before it started", ended=time.time())
        info = run.read_info()
        if not info.get("pid"):
            return f"{run.id}: cancelled before it started"
    elif status != "running":
        raise QueueError(f"{run.id} is not running (status {status})")
    pid = int(info["pid"])
    try:
        os.killpg(pid, signal.SIGTERM)  # the engine (or torchrun rank 0) leads its own session
    except ProcessLookupError:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return f"{run.id}: process {pid} already gone"
    except PermissionError:
        raise QueueError(f"{run.id}: not allowed to signal pid {pid} (another user's run?)") from None
    return f"{run.id}: sent SIGTERM to pid {pid}; it checkpoints and becomes interrupted"


def start_supervisor(root: Path, lanes: list[list[str]], caps: dict[str, int]) -> int:
    """`python -m tui.queue` in its own session; its output goes to runs/queue.log."""
    command = [sys.executable, "-m", "tui.queue", str(root),
               *[arg for name, n in caps.items() for arg in ("--capacity", f"{name}={n}")],
               *[arg for lane in lanes for arg in ("--lane", ",".join(lane))]]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / QUEUE_LOG, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=engine_env(), close_fds=True)
    return process.pid


# ---------------------------------------------------------------- the command for one job


def job_command(run: RunDir, resume: bool) -> tuple[list[str], dict[str, str]]:
    """The engine command (plain, or torchrun for groups and multi-node jobs) and extra env."""
    info = run.read_info()
    launch = info.get("launch") or {}
    spec = parse_device_spec(launch.get("device") or info.get("device") or "cpu", check=False)
    nnodes = int(launch.get("nnodes") or 1)
    env: dict[str, str] = {}
    if spec.kind == "cuda" and spec.is_group:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(max(spec.indices) + 1)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(names[i] for i in spec.indices)
    if spec.nproc == 1 and nnodes == 1:
        return engine_command(run, resume), env
    if spec.kind == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, cpu_cores() // spec.nproc))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
               "--nproc-per-node", str(spec.nproc), "--max-restarts", "0"]
    if nnodes > 1:
        command += ["--node-rank", str(launch.get("node_rank") or 0), "--rdzv-backend", "static",
                    "--rdzv-endpoint", str(launch.get("rdzv_endpoint"))]
    else:  # one machine: rendezvous and gloo traffic on the loopback interface only
        command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", run.id]
        env.setdefault("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
    return [*command, "-m", "engine", str(run.path.resolve()), *(["--resume"] if resume else [])], env


# ---------------------------------------------------------------- the supervisor


class DeviceLocks:
    """Exclusive flock()s on runs/.locks/<device>.<k>.lock; released when closed or when the process dies."""

    def __init__(self, root: Path, caps: dict[str, int]) -> None:
        self.dir = root / ".locks"
        self.caps = caps

    def acquire(self, spec: DeviceSpec) -> list[int] | None:
        """One free lock for every device the job uses, or None (nothing held) if any is busy."""
        self.dir.mkdir(parents=True, exist_ok=True)
        held: list[int] = []
        for name in spec.slots:
            fd = next((fd for k in range(self.caps.get(name, 1)) if (fd := self._try(f"{name}.{k}.lock")) is not None),
                      None)
            if fd is None:
                self.release(held)
                return None
            held.append(fd)
        return held

    def _try(self, name: str) -> int | None:
        fd = os.open(self.dir / name, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def release(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)


@dataclass
class Lane:
    """One device slot: its runs in order and the job now running on it."""

    pending: list[str]
    process: subprocess.Popen[bytes] | None = None
    run: RunDir | None = None
    locks: list[int] = field(default_factory=list)
    stamp: float = 0.0
    resume: bool = False


class Supervisor:
    """Runs each lane's jobs one after another and keeps run.json and the store current."""

    def __init__(self, root: Path, lanes: list[list[str]], caps: dict[str, int], poll_s: float = 0.5,
                 command: Any = job_command) -> None:
        self.root, self.poll_s, self.command = root, poll_s, command
        self.lanes = [Lane(list(ids)) for ids in lanes]
        self.locks = DeviceLocks(root, caps)
        self.store = RunStore(root)
        self.stopping = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        for lane in self.lanes:  # claim the runs: if this process dies they show as interrupted
            for run_id in lane.pending:
                run = RunDir(self.root / run_id)
                if run.read_info().get("status") == "queued":
                    run.update_info(queue_pid=os.getpid())
        while any(lane.pending or lane.process for lane in self.lanes):
            for lane in self.lanes:
                if lane.process is not None:
                    self._watch(lane)
                if lane.process is None and lane.pending:
                    if self.stopping:
                        self._cancel(lane)
                    else:
                        self._start_next(lane)
            time.sleep(self.poll_s)
        return 0

    def _stop(self, signum: int, frame: object) -> None:
        del frame
        if self.stopping:
            return
        self.stopping = True
        _log(f"signal {signum}: stopping; running jobs checkpoint, queued jobs are cancelled")
        for lane in self.lanes:
            if lane.process is not None and lane.process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(lane.process.pid, signal.SIGTERM)

    def _start_next(self, lane: Lane) -> None:
        run = RunDir(self.root / lane.pending[0])
        info = run.read_info()
        if info.get("status") != "queued":  # stopped or removed while waiting
            lane.pending.pop(0)
            return
        spec = parse_device_spec((info.get("launch") or {}).get("device") or info.get("device") or "cpu", check=False)
        locks = self.locks.acquire(spec)
        if locks is None:  # the device is busy with another queue's job: wait
            return
        lane.pending.pop(0)
        resume = (run.checkpoints / "last.pt").exists()
        command, env = self.command(run, resume)
        lane.process, lane.run, lane.locks, lane.resume = spawn(run, resume, command, env), run, locks, resume
        _log(f"{run.id}: started pid {lane.process.pid} on {spec.text}: {' '.join(command)}")
        if int((info.get("launch") or {}).get("node_rank") or 0) > 0:  # rank 0 is on another node
            run.update_info(status="running", started=time.time())
        self._record(lane)

    def _watch(self, lane: Lane) -> None:
        assert lane.process is not None and lane.run is not None
        code = lane.process.poll()
        if code is None:
            if files_stamp(lane.run) != lane.stamp:  # progress: keep the store current
                self._record(lane)
            return
        info = lane.run.read_info()
        if info.get("status") not in TERMINAL:  # the engine could not say how it ended
            node = int((info.get("launch") or {}).get("node_rank") or 0)
            if code == 0 and node > 0:
                status, error = "finished", None
            elif code < 0 or code in (130, 143):
                status, error = "interrupted", f"engine killed (exit {code}); resume continues from last.pt"
            else:
                status, error = "failed", f"engine exited with code {code} before reporting; see train.log"
            lane.run.update_info(status=status, error=error, ended=time.time())
        _log(f"{lane.run.id}: exited with code {code} ({lane.run.read_info().get('status')})")
        self.locks.release(lane.locks)
        self._record(lane)
        lane.process, lane.run, lane.locks = None, None, []

    def _cancel(self, lane: Lane) -> None:
        for run_id in lane.pending:
            run = RunDir(self.root / run_id)
            if run.read_info().get("status") == "queued":
                run.update_info(status="interrupted", error="queue stopped before this run started", ended=time.time())
                self.store.upsert(doc_from_run(run))
        lane.pending.clear()

    def _record(self, lane: Lane) -> None:
        assert lane.run is not None
        lane.stamp = files_stamp(lane.run)
        try:
            self.store.upsert(doc_from_run(lane.run))
        except Exception as err:  # a broken store must never stop the queue; sync() repairs later
            _log(f"store update failed: {err}")


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [queue {os.getpid()}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tui.queue", description="kdtui queue supervisor")
    parser.add_argument("root", type=Path, help="runs root")
    parser.add_argument("--lane", action="append", default=[], help="comma-separated run ids run in order")
    parser.add_argument("--capacity", action="append", default=[], help="DEVICE=N jobs at once")
    args = parser.parse_args(argv)
    caps = {name: int(n) for name, _, n in (item.partition("=") for item in args.capacity)}
    lanes = [lane.split(",") for lane in args.lane if lane]
    _log(f"supervising {sum(map(len, lanes))} runs in {len(lanes)} lanes under {args.root}")
    return Supervisor(args.root.resolve(), lanes, caps).run()


if __name__ == "__main__":
    sys.exit(main())
