"""The app driving a real engine run on the embedded data: launch on CPU, watch, stop, resume."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from engine.rundir import RunDir, effective_status, pid_alive
from tests.conftest import TINY_RECIPE
from tests.tui_fake import run_async, wait_for
from tui.app import KdtuiApp
from tui.screens.launch import LaunchScreen
from tui.screens.run_view import RunViewScreen
from tui.widgets.metric_plot import MetricPlot

LONG = TINY_RECIPE.replace("epochs = 3", "epochs = 40").replace("log_every = 2", "log_every = 1")


def _train_steps(view: RunViewScreen) -> list[float]:
    return view.curves.get("train", "loss")[0]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.toml").write_text(LONG)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs"


def _kill(root: Path) -> None:
    """Whatever the test leaves running is stopped (engine process groups, queue supervisors)."""
    for run in root.glob("*/run.json"):
        info = RunDir(run.parent).read_info()
        for pid in (info.get("pid"), info.get("queue_pid")):
            if pid and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)


@run_async
async def test_launch_watch_stop_resume_a_real_run(workspace: Path) -> None:
    app = KdtuiApp(workspace, Path("recipes"))
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("2")
            await wait_for(pilot, lambda: app.screen.query_one("RecipeTree").last_line >= 1)
            await pilot.press("down", "enter")
            assert isinstance(app.screen, LaunchScreen)
            summary = app.screen.query_one("#launch-summary")
            await wait_for(pilot, lambda: "1 run of supervised resnet8 on cpu" in str(summary.render()))
            await pilot.press("ctrl+l")
            await wait_for(pilot, lambda: isinstance(app.screen, RunViewScreen))
            view = app.screen
            run = view.run
            assert run.path.parent == workspace.resolve()

            # the curves follow the engine as it trains
            loss = view.query_one("#plot-loss", MetricPlot)
            await wait_for(pilot, lambda: len(_train_steps(view)) >= 3, timeout=60)
            await wait_for(pilot, lambda: loss.painted_points >= 3)
            await wait_for(pilot, lambda: "running" in str(view.query_one("#run-status").render()))

            await pilot.press("s")  # stop: SIGTERM, the run checkpoints and becomes interrupted
            await wait_for(pilot, lambda: effective_status(run.read_info()) == "interrupted", timeout=30)
            assert (run.checkpoints / "last.pt").exists()
            await wait_for(pilot, lambda: "interrupted" in str(view.query_one("#run-status").render()))
            stopped_at = run.read_info()["step"]
            assert 0 < stopped_at < 40 * 5
            # the queue supervisor records the exit (within its 0.5 s poll); resuming before that
            # races with it (it would mark the re-queued run interrupted again)
            queue_log = workspace / "queue.log"
            await wait_for(pilot, lambda: "exited with code" in queue_log.read_text(), timeout=10)

            await pilot.press("r")  # resume from last.pt through the run manager's queue
            await wait_for(pilot, lambda: max(_train_steps(view), default=0) * 5 > stopped_at + 2, timeout=60)
            assert f"{run.path} --resume" in queue_log.read_text()  # restarted from last.pt
            await pilot.press("s")
            await wait_for(pilot, lambda: effective_status(run.read_info()) == "interrupted", timeout=30)
    finally:
        _kill(workspace)
        time.sleep(0.1)
