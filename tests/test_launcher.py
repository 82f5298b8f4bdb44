"""Devices, the per-device queue and its supervisor, and the launch path end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.rundir import RunDir, effective_status, iter_run_dirs
from tests.conftest import ROOT, write_recipe
from tui.cli import app
from tui.devices import Device, DeviceError, DeviceLocks, parse_device_spec
from tui.launcher import prepare
from tui.queue import Distributed, Supervisor, job_command, queue_runs
from tui.store import RunStore

FAKE_GPUS = [Device("cuda", i, "Fake GPU", 16000, 15000) for i in range(4)]
QUICK = ["train.epochs=1", "train.max_steps_per_epoch=2", "data.embedded_per_class=8", "train.log_every=1"]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def wait_for(condition: Callable[[], bool], timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize(("text", "canonical", "nproc", "train_device"), [
    ("cpu", "cpu", 1, "cpu"), ("cpu*2", "cpu*2", 2, "cpu"), ("CUDA", "cuda:0", 1, "cuda:0"),
    ("cuda:3", "cuda:3", 1, "cuda:3"), ("cuda:0,1", "cuda:0,1", 2, "cuda"), (" cuda:2, 3 ", "cuda:2,3", 2, "cuda"),
])
def test_device_specs(text: str, canonical: str, nproc: int, train_device: str) -> None:
    spec = parse_device_spec(text, FAKE_GPUS)
    assert (spec.text, spec.nproc, spec.train_device) == (canonical, nproc, train_device)


@pytest.mark.parametrize(("text", "message"), [
    ("cuda:9", "no cuda:9"), ("gpu", "expected cpu"), ("cpu*0", "1 <= N"), ("cuda:0,0", "listed twice"),
    ("cuda:", "expected cpu"), ("cpu*x", "expected cpu"),
])
def test_bad_device_specs(text: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        parse_device_spec(text, FAKE_GPUS)
    with pytest.raises(DeviceError, match="no CUDA device"):
        parse_device_spec("cuda:0", [])


def test_sweep_points_are_dealt_over_device_slots(tiny_recipe: Path, runs_dir: Path) -> None:
    prepared = prepare(write_recipe(tiny_recipe.parent, tiny_recipe.read_text() + '\n[sweep]\n"optim.lr" = '
                                    '[0.1, 0.2, 0.3, 0.4, 0.5]\n', "sweep.toml"), None, runs_dir)
    specs = [parse_device_spec("cpu"), parse_device_spec("cuda:0,1", FAKE_GPUS)]
    runs, lanes, caps = queue_runs(prepared, specs, runs_dir, per_device=1)
    assert len(runs) == 5 and [len(lane) for lane in lanes] == [3, 2]
    devices = [run.read_info()["device"] for run in runs]
    assert devices == ["cpu", "cuda:0,1", "cpu", "cuda:0,1", "cpu"]
    assert caps == {"cpu": 1, "cuda0": 1, "cuda1": 1}
    recipe = (runs[1].path / "recipe.toml").read_text()
    assert 'device = "cuda"' in recipe and "lr = 0.2" in recipe  # a group: each rank picks cuda:LOCAL_RANK
    docs = RunStore(runs_dir).all()
    assert len(docs) == 5 and {d["status"] for d in docs} == {"queued"}  # visible before anything starts
    _, lanes2, caps2 = queue_runs(prepared, specs[:1], runs_dir, per_device=2)
    assert [len(lane) for lane in lanes2] == [3, 2] and caps2 == {"cpu": 2}


def test_group_and_multinode_commands(tiny_recipe: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = prepare(tiny_recipe, None, runs_dir)
    (single,), _, _ = queue_runs(prepared, [parse_device_spec("cpu")], runs_dir)
    command, env = job_command(single, resume=False)
    assert command[1:3] == ["-m", "engine"] and env == {}
    (group,), _, _ = queue_runs(prepared, [parse_device_spec("cpu*2")], runs_dir)
    command, env = job_command(group, resume=True)
    assert command[1:3] == ["-m", "torch.distributed.run"] and command[-3:] == ["engine", str(group.path), "--resume"]
    assert command[command.index("--nproc-per-node") + 1] == "2" and "store_type=file" in command
    assert env["GLOO_SOCKET_IFNAME"] == "lo" and env["KDTUI_DIST_STORE"].startswith(str(group.path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    (gpus,), _, _ = queue_runs(prepared, [parse_device_spec("cuda:1,3", FAKE_GPUS)], runs_dir)
    assert job_command(gpus, resume=False)[1]["CUDA_VISIBLE_DEVICES"] == "5,7"
    (node,), _, _ = queue_runs(prepared, [parse_device_spec("cpu")], runs_dir,
                               multinode=Distributed(2, 1, "10.0.0.1:29400"))
    command, env = job_command(node, resume=False)
    for flag, value in (("--nnodes", "2"), ("--node-rank", "1"), ("--rdzv-backend", "static"),
                        ("--rdzv-endpoint", "10.0.0.1:29400"), ("--nproc-per-node", "1")):
        assert command[command.index(flag) + 1] == value


def test_device_locks_are_exclusive(tmp_path: Path) -> None:
    locks = DeviceLocks(tmp_path, {"cpu": 1, "cuda0": 1, "cuda1": 1})
    held = locks.acquire(parse_device_spec("cuda:1", FAKE_GPUS))
    assert held is not None
    assert locks.acquire(parse_device_spec("cuda:0,1", FAKE_GPUS)) is None  # cuda1 busy: nothing held
    cpu = locks.acquire(parse_device_spec("cuda:0", FAKE_GPUS))
    assert cpu is not None  # cuda0 was released by the failed group attempt
    locks.release(held)
    locks.release(cpu)
    assert locks.acquire(parse_device_spec("cuda:0,1", FAKE_GPUS)) is not None


FAKE_ENGINE = """
import os, sys, time
from pathlib import Path
from engine.rundir import RunDir
run = RunDir(Path(sys.argv[1]))
run.update_info(status="running", pid=os.getpid(), started=time.time())
time.sleep(0.6)
run.update_info(status="finished", ended=time.time())
"""


def test_queue_runs_at_most_n_jobs_per_device(tiny_recipe: Path, runs_dir: Path) -> None:
    """5 points on one device with --per-device 2: two at a time, the rest visibly queued."""
    sweep = write_recipe(tiny_recipe.parent, tiny_recipe.read_text() + '\n[sweep]\n"train.seed" = [1, 2, 3, 4, 5]\n',
                         "sweep.toml")
    runs, lanes, caps = queue_runs(prepare(sweep, None, runs_dir), [parse_device_spec("cpu")], runs_dir, per_device=2)
    store, seen, done = RunStore(runs_dir), [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.append(sorted(d["status"] for d in store.all()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        Supervisor(runs_dir.resolve(), lanes, caps, poll_s=0.05,
                   command=lambda run, resume: ([sys.executable, "-c", FAKE_ENGINE, str(run.path)], {})).run()
    finally:
        done.set()
        sampler.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    spans = sorted((r.read_info()["started"], r.read_info()["ended"]) for r in runs)
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap == 2  # in parallel, and never more than --per-device
    assert all(info["status"] == "finished" for info in (r.read_info() for r in runs))
    assert any(states.count("queued") >= 2 and states.count("running") == 2 for states in seen)
    assert {d["status"] for d in store.all()} == {"finished"}


def test_two_devices_run_at_once_and_a_sigkilled_run_resumes(tiny_recipe: Path, runs_dir: Path) -> None:
    """Two slots give two engine processes at the same time; `kdtui run --detach` has exited by then.
    Then the queue and one engine are SIGKILLed: that run shows as interrupted, the other one still
    finishes (its own session), and `kdtui resume` takes the killed one to the end."""
    sweep = write_recipe(tiny_recipe.parent, tiny_recipe.read_text() + '\n[sweep]\n"train.seed" = [1, 2]\n',
                         "sweep.toml")
    sets = [arg for item in ["train.epochs=4", "train.max_steps_per_epoch=2", "data.embedded_per_class=8"]
            for arg in ("--set", item)]
    launcher = subprocess.run([sys.executable, "-m", "tui", "run", str(sweep), "-d", "cpu", "-d", "cpu", "--detach",
                               *sets], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert launcher.returncode == 0, launcher.stderr
    killed, survivor = runs = list(iter_run_dirs(runs_dir))
    wait_for(lambda: all((r.checkpoints / "last.pt").exists() for r in runs), what="both first checkpoints")
    pids = [r.read_info()["pid"] for r in runs]
    assert pids[0] != pids[1] and all(os.path.exists(f"/proc/{pid}") for pid in pids)  # two at once
    os.kill(killed.read_info()["queue_pid"], signal.SIGKILL)  # the machine side dies: queue and one engine
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: effective_status(killed.read_info()) == "interrupted", 30, "the dead pid")
    wait_for(lambda: survivor.read_info()["status"] == "finished", what="the other run to finish alone")
    code, out, _ = invoke("runs", "--json")
    assert {d["id"]: d["status"] for d in json.loads(out)} == {killed.id: "interrupted", survivor.id: "finished"}
    code, out, err = invoke("resume", killed.id[:-3])  # a unique prefix
    assert code == 0, out + err
    info = killed.read_info()
    assert info["status"] == "finished" and info["epoch"] == 4
    steps = [e["step"] for e in killed.events() if e["split"] == "val"]
    assert steps == sorted(set(steps)) and len(steps) == 4  # curves continue without duplicates
    assert RunStore(runs_dir).get(killed.id)["status"] == "finished"


def test_queue_stop_cancels_queued_points(tiny_recipe: Path, runs_dir: Path) -> None:
    sweep = write_recipe(tiny_recipe.parent, tiny_recipe.read_text() + '\n[sweep]\n"train.seed" = [1, 2, 3]\n',
                         "sweep.toml")
    runs, lanes, caps = queue_runs(prepare(sweep, None, runs_dir), [parse_device_spec("cpu")], runs_dir)
    supervisor = Supervisor(runs_dir.resolve(), lanes, caps, poll_s=0.05,
                            command=lambda run, resume: ([sys.executable, "-c", FAKE_ENGINE, str(run.path)], {}))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        supervisor.run()
    finally:
        timer.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    statuses = [RunDir(run.path).read_info()["status"] for run in runs]
    assert statuses == ["interrupted"] * 3
    assert "engine killed" in runs[0].read_info()["error"]  # the fake engine has no SIGTERM handler
    assert all("queue stopped before" in run.read_info()["error"] for run in runs[1:])  # never started
