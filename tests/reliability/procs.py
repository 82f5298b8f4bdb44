"""Real engine processes for the fault tests: start them, watch their run directory, kill them.

Two ways to start `engine.__main__.main` in its own process and session: `FreshEngine` is a
plain `python -m engine RUN_DIR` subprocess; `ForkServer` forks children from a process that
imported torch once (see forkserver.py). Either way the test holds only a pid, like the TUI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.rundir import RunDir
from tests.conftest import ROOT
from tui.launcher import create_runs, engine_env, prepare

PYTHON = sys.executable
FORKSERVER = Path(__file__).with_name("forkserver.py")


def new_run(recipe: Path, runs_dir: Path, overrides: list[str] | None = None) -> RunDir:
    """A queued run directory, exactly as `kdtui run` creates it (nothing started)."""
    return create_runs(prepare(recipe, overrides, runs_dir), runs_dir)[0]


def engine_args(run: RunDir, resume: bool) -> list[str]:
    return [str(run.path.resolve()), *(["--resume"] if resume else [])]


class FreshEngine:
    """`python -m engine RUN_DIR [--resume]` in its own session, output appended to train.log."""

    def __init__(self, run: RunDir, resume: bool, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        with open(run.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "engine", *engine_args(run, resume)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, env={**engine_env(), **(env or {})}, cwd=ROOT,
                preexec_fn=preexec_fn,
            )
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float = 300) -> int:
        return self.process.wait(timeout=timeout)


class ForkServer:
    """One preloaded process that forks engine children on request (one at a time)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([PYTHON, str(FORKSERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=engine_env(), cwd=ROOT, text=True, bufsize=1)

    def spawn(self, run: RunDir, resume: bool, env: dict[str, str] | None = None) -> ForkedEngine:
        assert self.process.stdin is not None and self.process.stdout is not None
        request = {"args": engine_args(run, resume), "env": env or {}, "log": str(run.log_path)}
        self.process.stdin.write(json.dumps(request) + "\n")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit {self.process.wait()})")
        return ForkedEngine(self, json.loads(line)["pid"])

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ForkedEngine:
    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid, self.code = server, pid, None

    def poll(self) -> int | None:
        """The exit code once the child is gone (the server reaps it at once), else None."""
        if self.code is None and not _running(self.pid):
            self.wait()
        return self.code

    def wait(self, timeout: float = 300) -> int:
        del timeout  # the server reaps the child; its reply arrives when it has
        if self.code is None:
            assert self.server.process.stdout is not None
            reply = json.loads(self.server.process.stdout.readline())
            assert reply["pid"] == self.pid, reply
            self.code = int(reply["exit"])
        return self.code


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def kill(engine: FreshEngine | ForkedEngine) -> int:
    """SIGKILL the engine's process group and reap it; returns its exit code (-9 if the kill hit)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(engine.pid, signal.SIGKILL)
    return engine.wait()


class EventWatch:
    """New metric events of the current process (time >= its start), re-read only when the file grew."""

    def __init__(self, run: RunDir, since: float) -> None:
        self.run, self.since, self.size, self.events = run, since, -1, []

    def poll(self) -> list[dict[str, Any]]:
        try:
            size = self.run.metrics_path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size != self.size:
            self.size = size
            self.events = [e for e in self.run.events() if float(e.get("time", 0)) >= self.since]
        return self.events


def temp_checkpoints(run: RunDir) -> list[Path]:
    return sorted(run.checkpoints.glob(".*.tmp")) if run.checkpoints.is_dir() else []


def wait_until(condition: Callable[[], bool], engine: FreshEngine | ForkedEngine | None = None,
               timeout: float = 240, interval: float = 0.002) -> None:
    """Poll `condition` until it holds; fail if the engine exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if engine is not None and engine.poll() is not None:
            raise AssertionError(f"engine exited with {engine.poll()} before the moment came")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the moment")
        time.sleep(interval)


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `kdtui` command line (`python -m tui ...`) in a subprocess."""
    return subprocess.run([PYTHON, "-m", "tui", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
