"""The diff screen: pilot tests on real engine runs, SVG snapshots on a fixed synthetic cache."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import DataTable, Select, Static

from engine.diff import compare, run_diff, view_file
from engine.predictions import Predictions, atomic_save_npz, file_digest, save_predictions
from tests.conftest import ROOT
from tests.test_diff import Trained, train_once
from tui.screens.diff import DiffScreen, TopBars


@pytest.fixture
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The two real runs of test_diff.py (trained once per session, whichever module asks first)."""
    return train_once(tmp_path_factory)


class DiffApp(App[None]):
    """A bare app holding only the diff screen (what the main app pushes from its runs table)."""

    def __init__(self, **screen_args: object) -> None:
        super().__init__()
        self.screen_args = screen_args

    def on_mount(self) -> None:
        self.push_screen(DiffScreen(image_renderer="halfcell", **self.screen_args))  # type: ignore[arg-type]


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async pilot test with asyncio (no pytest async plugin needed); fixtures pass through."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


async def settle(pilot: Pilot) -> None:
    """Let the loader worker (and any subprocess it started) finish, then the UI catch up."""
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.pause()


def table_indices(screen: DiffScreen) -> list[int]:
    table = screen.query_one(DataTable)
    return [int(table.get_row_at(r)[0]) for r in range(table.row_count)]


def summary(screen: DiffScreen) -> str:
    return str(screen.query_one("#diff-summary", Static).render())


# ---------------------------------------------------------------- pilot tests on real runs
@sync
async def test_screen_browses_a_cached_diff(trained: Trained) -> None:
    ckpt = trained.student.checkpoints
    diff = run_diff(ckpt / "epoch_0001.pt", ckpt / "epoch_0002.pt", "test", view=True)
    app = DiffApp(a=f"{trained.student.id}@1", b=f"{trained.student.id}@2", runs_dir=trained.root)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, DiffScreen)
        assert table_indices(screen) == diff.select("all").tolist()
        text = summary(screen)
        assert f"{diff.a.accuracy:.1%}" in text and f"{diff.agreement:.1%}" in text
        assert f"A✓B✗ {diff.counts()['a_right_b_wrong']}" in text
        first = int(diff.disagreements()[0])
        assert str(screen.query_one("#diff-caption", Static).render()).startswith(f"#{first} ")
        assert screen.query_one("#diff-image").image is not None
        bars = screen.query_one("#bars-a", TopBars).data
        assert bars is not None and bars[2] == diff.class_names[int(diff.a.labels[first])]
        assert [name for name, _ in bars[1]] == [diff.class_names[c] for c in diff.a.top_idx[first]]

        await pilot.press("down")
        second = int(diff.disagreements()[1])
        assert str(screen.query_one("#diff-caption", Static).render()).startswith(f"#{second} ")

        await pilot.press("f")  # all -> A right, B wrong
        await pilot.pause()
        assert table_indices(screen) == diff.select("a_right").tolist()
        klass = diff.class_names[int(diff.a.labels[diff.select("a_right")[0]])]
        screen.query_one("#class", Select).value = klass
        await pilot.pause()
        assert table_indices(screen) == diff.select("a_right", klass).tolist()

        await pilot.press("x")  # swap: A's wins become B's
        await settle(pilot)
        assert f"A✗B✓ {diff.counts()['a_right_b_wrong']}" in summary(screen)
        assert table_indices(screen) == diff.select("b_right", klass).tolist()  # filter and class stay


@sync
async def test_picking_runs_and_checkpoints(trained: Trained) -> None:
    run_diff(trained.student.checkpoints / "epoch_0001.pt", trained.teacher.checkpoints / "best.pt", "test", view=True)
    app = DiffApp(a=f"{trained.student.id}@1", runs_dir=trained.root)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert "pick A and B" in summary(screen)
        choices = [value for _, value in screen.folder_choices()]
        assert str(trained.teacher.checkpoints.resolve()) in choices
        screen.query_one("#b-run", Select).value = str(trained.teacher.checkpoints.resolve())
        await settle(pilot)
        assert screen.query_one("#b-ckpt", Select).value == "best.pt"
        assert "wrn_16_1" in summary(screen) and "resnet8" in summary(screen)
        assert screen.query_one(DataTable).row_count > 0


@sync
async def test_missing_caches_are_filled_by_a_subprocess(trained: Trained, tmp_path: Path) -> None:
    for name in ("epoch_0001.pt", "epoch_0002.pt"):
        shutil.copyfile(trained.student.checkpoints / name, tmp_path / name)
    shutil.copyfile(trained.student.checkpoints / "epoch_0001.pt", tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:5000])
    app = DiffApp(a=tmp_path / "epoch_0001.pt", b=tmp_path / "epoch_0002.pt", runs_dir=trained.root)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        diff = run_diff(tmp_path / "epoch_0001.pt", tmp_path / "epoch_0002.pt")  # a cache hit by now
        assert view_file(diff).is_file()
        assert table_indices(screen) == diff.disagreements().tolist()
        assert screen.query_one("#diff-image").image is not None

        screen.query_one("#b-ckpt", Select).value = "cut.pt"  # a truncated file: the error, in place
        await settle(pilot)
        assert "truncated" in summary(screen) and screen.query_one(DataTable).row_count == 0


def test_screen_module_is_torch_free() -> None:
    probe = "import sys, json, tui.screens.diff; print(json.dumps('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False


# ---------------------------------------------------------------- snapshots: a fixed synthetic cache
CLASSES = ["arrow", "tee", "ell", "chevron", "fork", "cup", "comb", "house", "flag", "key"]
RUN_IDS = ("20250101-120000-teacher-0001", "20250101-130000-student-0002")


def synthetic_runs(root: Path) -> None:
    """Two run folders with fixed ids whose caches hold seeded predictions and pattern images.

    Only the caches are read by the screen, so the checkpoint files are fixed bytes: every value
    in the view (ids, hashes, numbers, pixels) is the same on every machine.
    """
    rng = np.random.default_rng(7)
    n = 240
    labels = rng.integers(0, 10, n)
    preds = []
    for run_id, arch, strength in zip(RUN_IDS, ("wrn_16_1", "resnet8"), (2.2, 1.6), strict=True):
        folder = root / run_id / "checkpoints"
        folder.mkdir(parents=True)
        (root / run_id / "run.json").write_text(json.dumps({"id": run_id, "name": run_id.split("-")[2]}))
        path = folder / "best.pt"
        path.write_bytes(f"fixed checkpoint bytes of {run_id}".encode())
        (folder / "last.pt").write_bytes(path.read_bytes())
        logits = rng.normal(size=(n, 10)) + strength * np.eye(10)[labels]
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :5]
        meta = {"arch": arch, "dataset": "embedded", "num_classes": 10, "class_names": CLASSES, "method": "supervised",
                "epoch": 30, "recipe": "[data]\ndataset = \"embedded\"\n"}
        pred = Predictions(str(path), file_digest(path), "test", meta, labels.astype(np.int64), top.astype(np.int32),
                           np.take_along_axis(probs, top, 1).astype(np.float32),
                           (-np.log(probs[np.arange(n), labels])).astype(np.float32), np.arange(n, dtype=np.int64))
        save_predictions(pred)
        preds.append(pred)
    diff = compare(*preds)
    idx = diff.disagreements()
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.stack([np.stack([(xx * 8 + i * 3) % 256, (yy * 8 + labels[i] * 25) % 256,
                                 ((xx + yy) % 8 < 4) * 200 + 30]) for i in idx]).astype(np.uint8)
    atomic_save_npz(view_file(diff), indices=idx, images=images)


@pytest.fixture
def synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from textual_image._terminal import CellSize, get_cell_size

    # the image's size in cells follows the terminal's cell size in pixels: pin it (run from a tty or not)
    monkeypatch.setattr(get_cell_size, "_result", CellSize(10, 20), raising=False)
    synthetic_runs(tmp_path / "runs")
    return tmp_path / "runs"


def test_snapshot_80x24(synthetic: Path, snap_compare: Callable[..., bool]) -> None:
    app = DiffApp(a=RUN_IDS[0], b=RUN_IDS[1], runs_dir=synthetic)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)


def test_snapshot_large_filtered(synthetic: Path, snap_compare: Callable[..., bool]) -> None:
    app = DiffApp(a=RUN_IDS[0], b=f"{RUN_IDS[1]}@last", runs_dir=synthetic)

    async def filtered(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("f", "down", "down")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(160, 48), run_before=filtered)
