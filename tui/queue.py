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
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from engine.errors import UserError
from engine.rundir import RunDir, effective_status
from tui.devices import DeviceLocks, DeviceSpec, cpu_cores, parse_device_spec
from tui.launcher import Prepared, create_runs, engine_command, engine_env, spawn
from tui.store import RunStore, doc_from_run, files_stamp

TERMINAL = ("finished", "failed", "interrupted")
QUEUE_LOG = "queue.log"
DIST_DIR = ".dist"  # per run: torchrun's file rendezvous stores (removed when the job ends)


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
    """Create queued runs for every sweep point and start their supervisor; returns (runs, its pid)."""
    runs, lanes, caps = queue_runs(prepared, specs, runs_dir, per_device, multinode, extra_info)
    return runs, start_supervisor(runs_dir.resolve(), lanes, caps)


def queue_runs(prepared: Prepared, specs: list[DeviceSpec], runs_dir: Path, per_device: int = 1,
               multinode: Distributed = Distributed(), extra_info: dict[str, Any] | None = None,
               ) -> tuple[list[RunDir], list[list[str]], dict[str, int]]:
    """The queued run directories (in the store too), their lanes of run ids, and device capacities.

    Point i goes to slot i mod S of the S = len(specs) * per_device slots; without specs each
    point runs on its own recipe's train.device.
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
    return runs, [lane for lane in lanes if lane], capacity(slots)


def capacity(slots: list[DeviceSpec]) -> dict[str, int]:
    """How many jobs may use each physical device at once (slots naming it)."""
    counts: dict[str, int] = {}
    for spec in slots:
        for name in spec.slots:
            counts[name] = counts.get(name, 0) + 1
    return counts


def run_lock(run: RunDir) -> FileLock:
    """Serialises the launcher side's read-check-write of one run.json (queue claim and start, stop,
    resume), so a stop never races a start. The engine writes run.json only while it runs."""
    return FileLock(str(run.path / ".run.lock"), timeout=30)


def submit_resume(run: RunDir, runs_dir: Path) -> int:
    """Queue an interrupted or failed run again (from last.pt when it has one); returns the supervisor pid."""
    with run_lock(run):
        info = _requeue(run)
    spec = parse_device_spec((info.get("launch") or {}).get("device") or info.get("device") or "cpu")
    root = runs_dir.resolve()
    RunStore(root).upsert(doc_from_run(run))
    return start_supervisor(root, [[run.id]], capacity([spec]))


def _requeue(run: RunDir) -> dict[str, Any]:
    info = run.read_info()
    if not info:
        raise QueueError(f"{run.path}: not a run directory (no readable run.json)")
    status = effective_status(info)
    if status in ("running", "queued"):
        raise QueueError(f"{run.id} is {status} (pid {info.get('pid') or info.get('queue_pid')}); stop it first")
    if status == "finished":
        raise QueueError(f"{run.id} already finished; `kdtui relaunch {run.id}` starts a new run like it")
    if (info.get("launch") or {}).get("scheduler") == "slurm":
        from tui.slurm_array import resubmit_hint

        raise QueueError(f"{run.id} runs under SLURM: `{resubmit_hint(info)}` resumes it from last.pt")
    if not (run.checkpoints / "last.pt").exists():  # starting over: drop the partial curves
        run.metrics_path.unlink(missing_ok=True)
        shutil.rmtree(run.tb_dir, ignore_errors=True)
    return run.update_info(status="queued", error=None, queue_pid=None, pid=None, ended=None, launch_token=None)


def stop_run(run: RunDir) -> str:
    """SIGTERM a running job's process group (it checkpoints and becomes `interrupted`), or cancel a
    queued one. Returns what was done, for the user. A SLURM array task is cancelled with scancel."""
    if run.read_info().get("slurm_job"):  # its pid is on a compute node: never signal it from here
        from tui.slurm_array import stop_array_task

        return stop_array_task(run)
    with run_lock(run):
        info = run.read_info()
        status = effective_status(info)
        if status == "queued":
            info = run.update_info(status="interrupted", error="stopped before it started", ended=time.time())
            if not info.get("pid"):
                return f"{run.id}: cancelled before it started"
    if status not in ("queued", "running"):
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
    _SUPERVISORS[process.pid] = process
    return process.pid


_SUPERVISORS: dict[int, subprocess.Popen[bytes]] = {}  # started by this process, reaped by reap()


def reap() -> None:
    """Collect supervisors of this process that ended (long-lived callers such as the TUI call this
    now and then, so a finished supervisor does not linger as a zombie that still looks alive)."""
    for pid, process in list(_SUPERVISORS.items()):
        if process.poll() is not None:
            del _SUPERVISORS[pid]


def wait_supervisor(pid: int, timeout: float = 60.0) -> bool:
    """Wait until a supervisor this process started has exited (its last store updates written)."""
    process = _SUPERVISORS.get(pid)
    if process is None:
        return True
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    reap()
    return True


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
    else:  # one machine: rendezvous through files in the run directory, so nothing listens on the
        # network (torchrun's TCPStore binds every interface); gloo/nccl sockets stay on loopback
        stores = run.path / DIST_DIR
        stores.mkdir(exist_ok=True)
        nonce = secrets.token_hex(4)
        command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(stores / f"rdzv-{nonce}"),
                    "--rdzv-conf", "store_type=file", "--rdzv-id", run.id]
        env.update(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", KDTUI_DIST_STORE=str(stores / f"group-{nonce}"))
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env[name] = os.environ.get(name, "lo")
    return [*command, "-m", "engine", str(run.path.resolve()), *(["--resume"] if resume else [])], env


# ---------------------------------------------------------------- the supervisor


@dataclass
class Lane:
    """One device slot: its runs in order and the job now running on it."""

    pending: list[str]
    process: subprocess.Popen[bytes] | None = None
    run: RunDir | None = None
    locks: list[int] = field(default_factory=list)
    stamp: float = 0.0
    token: str = ""


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
                with run_lock(run):
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
        if not run.path.is_dir():  # removed while waiting
            lane.pending.pop(0)
            return
        with run_lock(run):
            info = run.read_info()
            if info.get("status") != "queued":  # stopped while waiting
                lane.pending.pop(0)
                return
            launch = info.get("launch") or {}
            spec = parse_device_spec(launch.get("device") or info.get("device") or "cpu", check=False)
            locks = self.locks.acquire(spec)
            if locks is None:  # the device is busy with another queue's job: wait
                return
            lane.pending.pop(0)
            resume = (run.checkpoints / "last.pt").exists()
            command, env = self.command(run, resume)
            lane.process, lane.run, lane.locks = spawn(run, resume, command, env), run, locks
            lane.token = secrets.token_hex(4)  # marks this launch: a later resume's launch is not ours
            run.update_info(launch_token=lane.token)
            if int(launch.get("node_rank") or 0) > 0:  # global rank 0 (which writes run.json) is elsewhere
                run.update_info(status="running", started=time.time())
        _log(f"{run.id}: started pid {lane.process.pid} on {spec.text}: {' '.join(command)}")
        self._record(lane)

    def _watch(self, lane: Lane) -> None:
        assert lane.process is not None and lane.run is not None
        code = lane.process.poll()
        if code is None:
            if files_stamp(lane.run) != lane.stamp:  # progress: keep the store current
                self._record(lane)
            return
        with run_lock(lane.run):
            info = lane.run.read_info()
            ours = info.get("launch_token") == lane.token
            if ours and info.get("status") not in TERMINAL:  # the engine could not say how it ended
                node = int((info.get("launch") or {}).get("node_rank") or 0)
                if code == 0 and node > 0:
                    status, error = "finished", None
                elif code < 0 or code in (130, 143):
                    status, error = "interrupted", f"engine killed (exit {code}); resume continues from last.pt"
                else:
                    status, error = "failed", f"engine exited with code {code} before reporting; see train.log"
                lane.run.update_info(status=status, error=error, ended=time.time())
        _log(f"{lane.run.id}: exited with code {code} ({lane.run.read_info().get('status')})")
        shutil.rmtree(lane.run.path / DIST_DIR, ignore_errors=True)
        self.locks.release(lane.locks)
        self._record(lane)
        lane.process, lane.run, lane.locks = None, None, []

    def _cancel(self, lane: Lane) -> None:
        for run_id in lane.pending:
            run = RunDir(self.root / run_id)
            if not run.path.is_dir():
                continue
            with run_lock(run):
                if run.read_info().get("status") == "queued":
                    run.update_info(status="interrupted", error="queue stopped before this run started",
                                    ended=time.time())
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
