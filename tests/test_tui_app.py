"""Pilot tests (App.run_test) of each screen's main flows, on fixed fake runs (no training)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from tests.conftest import ROOT
from tests.tui_fake import T0, run_async, wait_for, workspace
from tui.app import KdtuiApp
from tui.screens.compare import CompareScreen
from tui.screens.dialogs import ConfirmDeleteScreen, PromptScreen
from tui.screens.launch import LaunchScreen
from tui.screens.recipes import RecipesScreen
from tui.screens.run_view import RunViewScreen
from tui.store import RunStore
from tui.widgets.metric_plot import MetricPlot
from tui.widgets.runs_table import RunsTable


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield workspace(tmp_path, monkeypatch)
    monkeypatch.undo()
    time.tzset()


def names(app: KdtuiApp) -> list[str]:
    return [doc["name"] for doc in app.screen.query_one(RunsTable).rows]


def loaded(app: KdtuiApp) -> bool:
    screen = app.runs_screen
    return screen is not None and screen.loaded and not screen.syncing


@run_async
async def test_runs_table_filters_and_sorts(fake: Path) -> None:
    app = KdtuiApp(fake, Path("recipes"))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: loaded(app))
        assert names(app) == ["queued", "live", "kd-wrn", "lr-0.2", "lr-0.1", "baseline"]  # newest first
        await pilot.press("slash", *"status:running")
        assert names(app) == ["live"]
        app.screen.query_one("#runs-filter").value = "tag:kd"
        await pilot.pause()
        assert names(app) == ["kd-wrn"]
        app.screen.query_one("#runs-filter").value = "lr-0"
        await pilot.pause()
        assert names(app) == ["lr-0.2", "lr-0.1"]
        await pilot.press("escape")
        app.screen.query_one("#runs-filter").value = ""
        await pilot.press("f")  # status filter cycles: running, finished, ...
        assert names(app) == ["live"]
        await pilot.press("f")
        assert names(app) == ["lr-0.1", "baseline"]
        app.screen.query_one("#runs-filter").value = ""
        app.screen.query_one(RunsTable).post_message(RunsTable.SortRequested("top1"))
        await pilot.pause()
        assert names(app) == ["lr-0.1", "baseline", "live", "kd-wrn", "lr-0.2", "queued"]  # best top-1 first
        await pilot.press("o")  # same column, other direction
        assert names(app)[:2] == ["queued", "lr-0.2"]


@run_async
async def test_run_view_survives_a_torn_line_and_follows_new_metrics(fake: Path) -> None:
    app = KdtuiApp(fake, Path("recipes"))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: loaded(app))
        await pilot.press("down", "enter")  # 'live': its metrics.jsonl ends in half a line
        assert isinstance(app.screen, RunViewScreen)
        view = app.screen
        loss = view.query_one("#plot-loss", MetricPlot)
        await wait_for(pilot, lambda: loss.painted_points > 0)
        assert view.curves.get("val", "top1")[0] == [1.0, 2.0, 3.0, 4.0]
        before = loss.painted_points
        with open(fake / "20260105-084000-live-a005" / "metrics.jsonl", "a") as handle:
            handle.write(', "split": "train", "kind": "step", "loss": 0.5}\n')  # completes the torn line
            handle.write(json.dumps({"time": T0 + 50, "epoch": 5, "step": 50, "split": "val", "loss": 0.4,
                                     "top1": 0.6, "top5": 0.9}) + "\n")
        await wait_for(pilot, lambda: view.curves.get("val", "top1")[0][-1:] == [5.0])
        await wait_for(pilot, lambda: loss.painted_points > before)
        status = str(view.query_one("#run-status").render())
        assert "live" in status and "running" in status and "val top1 60.0%" in status
        await pilot.press("o")  # the train.log tab
        assert "epoch 4/6" in "\n".join(view.query_one("#run-log").lines)
        await pilot.press("l")
        assert loss.log_y
        await pilot.press("escape")
        assert app.screen is app.runs_screen


@run_async
async def test_missing_run_directory_is_shown_not_crashed_on(fake: Path) -> None:
    app = KdtuiApp(fake, Path("recipes"))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: loaded(app))
        shutil.rmtree(fake / "20260105-080000-baseline-a001")
        await pilot.press("end", "enter")
        await wait_for(pilot, lambda: "run directory missing" in str(app.screen.query_one("#run-status").render()))
        await pilot.press("escape", "ctrl+r")
        await wait_for(pilot, lambda: loaded(app) and "baseline" not in names(app))  # sync drops it


@run_async
async def test_corrupt_store_falls_back_to_the_run_folders(fake: Path) -> None:
    (fake / "kdtui.json").write_text("{ not json")
    app = KdtuiApp(fake, Path("recipes"))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: loaded(app))
        assert len(names(app)) == 6
        assert "unreadable run store" in str(app.screen.query_one("#runs-title").render())


@run_async
async def test_locked_store_is_reported(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tui.screens.runs.SYNC_LOCK_TIMEOUT_S", 0.2)
    app = KdtuiApp(fake, Path("recipes"))
    with FileLock(str(fake / "kdtui.json.lock")):
        async with app.run_test(size=(160, 30)) as pilot:
            await wait_for(pilot, lambda: loaded(app))
            assert "locked" in str(app.screen.query_one("#runs-title").render())
            assert len(names(app)) == 6


@run_async
async def test_compare_two_runs(fake: Path) -> None:
    app = KdtuiApp(fake, Path("recipes"))
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: loaded(app))
        await pilot.press("c")  # nothing marked: a warning, no screen
        assert app.screen is app.runs_screen
        await pilot.press("end", "up", "space", "space")  # lr-0.1 and baseline
        await pilot.press("c")
        assert isinstance(app.screen, CompareScreen)
        compare = app.screen
        plot = compare.query_one(MetricPlot)
        await wait_for(pilot, lambda: sum(1 for line in plot.lines if line.xs) == 2)
        table = compare.query_one("#compare-table")
        await wait_for(pilot, lambda: table.row_count == 2)
        headers = [str(column.label) for column in table.columns.values()]
        assert "optim.lr" in headers and "data.batch_size" not in headers  # only what differs
        assert [line.label for line in plot.lines] == ["lr-0.1", "baseline"]
        await pilot.press("m")
        assert plot.title == "val loss"


@run_async
async def test_tag_note_and_delete(fake: Path) -> None:
    app = KdtuiApp(fake, Path("recipes"))
    store = RunStore(fake)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: loaded(app))
        await pilot.press("end", "t")  # baseline
        assert isinstance(app.screen, PromptScreen)
        await pilot.press(*"best -ref", "enter")
        await wait_for(pilot, lambda: store.get("20260105-080000-baseline-a001")["tags"] == ["best"])
        await pilot.press("n", *"keep me", "enter")
        await wait_for(pilot, lambda: store.get("20260105-080000-baseline-a001")["note"].endswith("keep me"))
        await wait_for(pilot, lambda: loaded(app))
        await pilot.press("end", "d")
        assert isinstance(app.screen, ConfirmDeleteScreen)
        await pilot.press("k")  # forget it, keep the folder under removed/
        await wait_for(pilot, lambda: store.get("20260105-080000-baseline-a001") is None)
        assert (fake / "removed" / "20260105-080000-baseline-a001" / "run.json").exists()
        await wait_for(pilot, lambda: loaded(app) and "baseline" not in names(app))
        await pilot.press("home", "down", "d", "y")  # 'live' is running: refused
        await pilot.pause(0.3)
        assert (fake / "20260105-084000-live-a005").exists()


@run_async
async def test_recipes_show_validation_in_place_and_open_the_launch_dialog(fake: Path) -> None:
    app = KdtuiApp(fake, Path("recipes"))
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("2")
        assert isinstance(app.screen, RecipesScreen)
        status = app.screen.query_one("#recipe-status")
        await wait_for(pilot, lambda: app.screen.query_one("RecipeTree").last_line >= 3)
        await pilot.press("down")  # broken.toml (sorted first)
        await wait_for(pilot, lambda: "optim.lr" in str(status.render()))
        assert "greater than 0" in str(status.render())
        await pilot.press("down")  # sweep.toml
        await wait_for(pilot, lambda: "sweep of 3 runs" in str(status.render()))
        await pilot.press("enter")
        assert isinstance(app.screen, LaunchScreen)
        summary = app.screen.query_one("#launch-summary")
        await wait_for(pilot, lambda: "3 runs (sweep over optim.lr)" in str(summary.render()))
        devices = app.screen.query_one("#launch-devices")
        assert devices.selected == ["cpu"]
        app.screen.query_one("#launch-overrides").text = "optim.lr = 5e9\n"
        await wait_for(pilot, lambda: "optim.lr" in str(summary.render()) and "less than" in str(summary.render()))
        assert app.screen.query_one("#launch-go").disabled
        await pilot.press("1")  # global keys are off under a dialog
        assert isinstance(app.screen, LaunchScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, RecipesScreen)


@run_async
async def test_command_palette_switches_screens(fake: Path) -> None:
    app = KdtuiApp(fake, Path("recipes"))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: loaded(app))
        await pilot.press("ctrl+p", *"Recipes")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, RecipesScreen))


PROBE = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.tui_fake import wait_for
from tui.app import KdtuiApp

async def main():
    app = KdtuiApp(Path(sys.argv[2]), Path(sys.argv[3]))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.runs_screen and app.runs_screen.loaded and not app.runs_screen.syncing)
        await pilot.press("down", "enter")  # run view
        await wait_for(pilot, lambda: app.screen.query_one("#plot-loss").painted_points)
        await pilot.press("escape", "space", "down", "space", "c")  # compare
        await wait_for(pilot, lambda: app.screen.query_one("#compare-table").row_count == 2)
        await pilot.press("escape", "2", "down", "down")  # recipes
        await wait_for(pilot, lambda: "sweep of 3" in str(app.screen.query_one("#recipe-status").render()))
        await pilot.press("enter")  # launch dialog, devices detected, sweep validated
        await wait_for(pilot, lambda: "3 runs" in str(app.screen.query_one("#launch-summary").render()))
        print(type(app.screen).__name__)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "tensorboard"))
    print("HEAVY", heavy)

asyncio.run(main())
"""


def test_the_app_never_imports_torch(fake: Path) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), str(fake), str(fake.parent / "recipes")],
                         capture_output=True, text=True, timeout=90, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "LaunchScreen"  # every screen visited
    assert lines[-1] == "HEAVY []"


@run_async
async def test_relaunch_with_edits_queues_a_child_run(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the run manager's submit (as `kdtui relaunch`); only the supervisor start is stubbed."""
    monkeypatch.setattr("tui.queue.start_supervisor", lambda root, lanes, caps: 4_000_001)
    app = KdtuiApp(fake, Path("recipes"))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: loaded(app))
        await pilot.press("end", "e")  # baseline
        dialog = app.screen
        assert isinstance(dialog, LaunchScreen) and "Relaunch baseline" in dialog.title_text
        summary = dialog.query_one("#launch-summary")
        await wait_for(pilot, lambda: "1 run of supervised resnet8 on cpu" in str(summary.render()))
        assert dialog.query_one("#launch-devices").selected == ["cpu"]  # the run's own device
        dialog.query_one("#launch-overrides").text = "optim.lr = 0.3\n"
        await wait_for(pilot, lambda: not dialog.query_one("#launch-go").disabled and dialog.plan.runs == 1)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, RunViewScreen))
        child = app.screen.run
        info = child.read_info()
        assert info["parent"] == "20260105-080000-baseline-a001" and info["status"] == "queued"
        assert "lr = 0.3" in child.recipe_path.read_text()
        assert 4_000_001 in app.supervisors


@run_async
async def test_diff_key_opens_the_checkpoint_diff_screen(fake: Path) -> None:
    from tui.screens.diff import DiffScreen

    app = KdtuiApp(fake, Path("recipes"))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: loaded(app))
        await pilot.press("end", "space", "space", "x")  # baseline and lr-0.1: A and B
        assert isinstance(app.screen, DiffScreen)
        assert app.screen.error  # the fake runs have no checkpoints: said on the screen, no crash
        await pilot.press("escape")
        assert app.screen is app.runs_screen
