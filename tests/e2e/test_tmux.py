"""End to end in a real terminal: tmux runs `kdtui`, keys launch the quickstart recipe, the pane shows
the run training, `q` quits the app cleanly and the run keeps going (stopped in cleanup)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.rundir import effective_status, pid_alive
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


class Pane:
    """One detached tmux session on a private server socket."""

    def __init__(self, socket: str, session: str) -> None:
        self.base = ["tmux", "-L", socket]
        self.session = session

    def tmux(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=True, timeout=10).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", self.session, *(["-l"] if literal else []), *keys)
        time.sleep(0.3)

    def text(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def wait(self, what: Callable[[str], object], timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.text()
            if what(screen):
                return screen
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout} s; the pane shows:\n{self.text()}")


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "recipes").mkdir()
    shutil.copy(ROOT / "recipes" / "quickstart.toml", tmp_path / "recipes" / "quickstart.toml")
    yield tmp_path
    for info_path in (tmp_path / "runs").glob("*/run.json"):  # the run outlived the app: stop it now
        info = json.loads(info_path.read_text())
        for pid in (info.get("pid"), info.get("queue_pid")):
            if pid and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)


def _step(screen: str) -> int:
    found = re.search(r"step (\d+)", screen)
    return int(found.group(1)) if found else -1


def test_kdtui_in_tmux_launches_quickstart_and_quits_leaving_it_running(workspace: Path) -> None:
    runs = workspace / "runs"
    socket = f"kdtui-e2e-{os.getpid()}"
    command = (f"cd {shlex.quote(str(workspace))} && env PYTHONPATH={shlex.quote(str(ROOT))} "
               f"KDTUI_RUNS_DIR={shlex.quote(str(runs))} TERM=xterm-256color "
               f"{shlex.quote(sys.executable)} -m tui; echo EXITED $?; sleep 600")
    pane = Pane(socket, "kdtui")
    pane.tmux("new-session", "-d", "-s", "kdtui", "-x", "100", "-y", "30", command)
    try:
        pane.wait(lambda s: "kdtui · runs" in s and "no runs yet" in s, timeout=30)
        pane.keys("2")  # recipes
        pane.wait(lambda s: "quickstart.toml" in s)
        pane.keys("Down")
        pane.wait(lambda s: "ok: supervised, resnet20 on embedded" in s)
        pane.keys("Enter")  # the launch dialog
        pane.wait(lambda s: "Launch recipes/quickstart.toml" in s and "1 run of supervised resnet20 on cpu" in s)
        pane.keys("Tab")  # devices -> overrides: log every step, one thread
        pane.keys("train.log_every = 1", literal=True)
        pane.keys("Enter")
        pane.keys("train.threads = 1", literal=True)
        pane.wait(lambda s: "train.threads = 1" in s and "1 run of supervised" in s)
        pane.keys("C-l")  # launch: the run view opens on the new run
        first = pane.wait(lambda s: "quickstart  running" in s and _step(s) > 0, timeout=120)
        pane.wait(lambda s: _step(s) > _step(first), timeout=60)  # it is training, and the view follows
        (run_dir,) = [p.parent for p in runs.glob("*/run.json")]
        pane.keys("q")
        pane.wait(lambda s: "EXITED 0" in s, timeout=20)  # the app quit cleanly...
        info = json.loads((run_dir / "run.json").read_text())
        assert effective_status(info) == "running" and pid_alive(info["pid"])  # ...and the run did not
        os.killpg(int(info["pid"]), signal.SIGTERM)  # stop it the documented way: it checkpoints
        deadline = time.monotonic() + 60
        while effective_status(json.loads((run_dir / "run.json").read_text())) != "interrupted":
            assert time.monotonic() < deadline, "the run did not stop after SIGTERM"
            time.sleep(0.3)
        assert (run_dir / "checkpoints" / "last.pt").exists()
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([*pane.base, "kill-server"], capture_output=True, timeout=10)
