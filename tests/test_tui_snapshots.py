"""SVG snapshots (pytest-textual-snapshot) of every screen at 80x24 and at 160x48.

Deterministic: fixed fake runs with fixed timestamps (tests/tui_fake.py), UTC, a frozen clock,
fixed devices in the launch dialog, and each screen waited on until its workers have delivered.
Update after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the report before committing the new SVGs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

from tests.tui_fake import wait_for, workspace
from tui.app import KdtuiApp
from tui.screens.compare import CompareScreen
from tui.screens.launch import LaunchScreen
from tui.screens.recipes import RecipesScreen
from tui.screens.run_view import RunViewScreen
from tui.widgets.metric_plot import MetricPlot

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")]
DEVICES = [("cpu  (16 cores)", "cpu", True),  # (GPUs shown, not selected: this machine has none to validate)
           ("cuda:0  NVIDIA H100 80GB HBM3  79,213 MiB free of 81,559", "cuda:0", False),
           ("cuda:1  NVIDIA H100 80GB HBM3  12,004 MiB free of 81,559", "cuda:1", False),
           ("cuda:0,1  one job on 2 GPUs (DDP)", "cuda:0,1", False),
           ("cpu*2  one job, 2 processes (DDP with gloo)", "cpu*2", False)]


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KdtuiApp]:
    root = workspace(tmp_path, monkeypatch)
    monkeypatch.setattr("tui.screens.launch.device_choices", lambda: DEVICES)
    yield KdtuiApp(root, Path("recipes"))
    monkeypatch.undo()
    time.tzset()


async def _runs_ready(pilot: Pilot[Any]) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.runs_screen is not None and app.runs_screen.loaded
                   and not app.runs_screen.syncing)
    await pilot.pause(0.1)


async def _open_run(pilot: Pilot[Any], name: str) -> None:
    await _runs_ready(pilot)
    app = pilot.app
    table = app.runs_screen.table
    table.cursor = next(i for i, doc in enumerate(table.rows) if doc["name"] == name)
    await pilot.press("enter")
    view = app.screen
    assert isinstance(view, RunViewScreen)
    await wait_for(pilot, lambda: view.curves.count == 36 and view.recipe_loaded)
    await wait_for(pilot, lambda: all(p.painted_points for p in view.query(MetricPlot)))
    await pilot.pause(0.1)


def test_runs_screen(snap_compare: Any, app: KdtuiApp, size: tuple[int, int]) -> None:
    assert snap_compare(app, terminal_size=size, run_before=_runs_ready)


def test_runs_screen_filtered(snap_compare: Any, app: KdtuiApp, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _runs_ready(pilot)
        await pilot.press("slash", *"status:fin", "escape", "space")

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_run_view(snap_compare: Any, app: KdtuiApp, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _open_run(pilot, "lr-0.1")

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_compare_screen(snap_compare: Any, app: KdtuiApp, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _runs_ready(pilot)
        await pilot.press("end", "up", "up", "space", "space", "space", "c")  # lr-0.2, lr-0.1, baseline
        screen = pilot.app.screen
        assert isinstance(screen, CompareScreen)
        plot = screen.query_one(MetricPlot)
        table = screen.query_one("#compare-table", DataTable)

        def settled() -> bool:  # rows in, and the lazily recomputed column widths caught up with them
            first = next(iter(table.columns.values()), None)
            return plot.painted_points >= 14 and table.row_count == 3 and first is not None and \
                first.content_width >= len("baseline")

        await wait_for(pilot, settled)
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_recipes_screen(snap_compare: Any, app: KdtuiApp, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await pilot.press("2")
        screen = pilot.app.screen
        assert isinstance(screen, RecipesScreen)
        await wait_for(pilot, lambda: screen.query_one("RecipeTree").last_line >= 3)
        await pilot.press("down")  # broken.toml: the validation error shown in place
        await wait_for(pilot, lambda: "optim.lr" in str(screen.query_one("#recipe-status").render()))
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_launch_dialog(snap_compare: Any, app: KdtuiApp, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await pilot.press("2")
        await wait_for(pilot, lambda: pilot.app.screen.query_one("RecipeTree").last_line >= 3)
        await pilot.press("down", "down", "enter")  # sweep.toml
        dialog = pilot.app.screen
        assert isinstance(dialog, LaunchScreen)
        await wait_for(pilot, lambda: "3 runs" in str(dialog.query_one("#launch-summary").render()))
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.fixture(params=SIZES)
def size(request: pytest.FixtureRequest) -> tuple[int, int]:
    return request.param
