"""`kdtui plot` and `kdtui watch`: plotext curves on stdout, from fixed fake runs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.tui_fake import fake_runs
from tui.cli import app

runner = CliRunner()


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    fake_runs(root)
    return root


def kdtui(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_plot_overlays_several_runs(runs: Path) -> None:
    code, out, err = kdtui("plot", "baseline", "lr-0.1", "--runs-dir", str(runs), "--width", "70", "--height", "18")
    assert code == 0, err
    lines = out.splitlines()
    assert "val top1 (%)" in lines[0]
    assert "baseline" in out and "lr-0.1" in out  # one legend entry per run
    assert "\x1b[" not in out  # not a terminal: no colour codes in a log
    assert max(len(line) for line in lines) <= 70
    assert "94.0" in out  # lr-0.1 reaches 94 % top-1: the y axis goes there


def test_plot_metric_and_split(runs: Path) -> None:
    code, out, _ = kdtui("plot", "lr-0.1", "--metric", "lr", "--runs-dir", str(runs), "--width", "60")
    assert code == 0 and "train lr" in out.splitlines()[0]  # the learning rate is a training-step series
    code, out, _ = kdtui("plot", "lr-0.1", "--metric", "loss", "--split", "train", "--log", "--color",
                         "--runs-dir", str(runs), "--width", "60")
    assert code == 0 and "train loss" in out and "\x1b[" in out


def test_plot_errors_are_one_line(runs: Path) -> None:
    code, _, err = kdtui("plot", "baseline", "--metric", "acc", "--runs-dir", str(runs))
    assert code == 2 and err.strip() == "kdtui: error: --metric: expected one of top1, top5, loss, lr, got 'acc'"
    code, _, err = kdtui("plot", "nope", "--runs-dir", str(runs))
    assert code == 2 and err.startswith("kdtui: error: no run 'nope'") and len(err.strip().splitlines()) == 1
    code, _, err = kdtui("plot", "queued", "--runs-dir", str(runs))  # nothing logged yet
    assert code == 1 and "no val top1 logged yet" in err


def test_watch_a_finished_run_draws_once(runs: Path) -> None:
    code, out, _ = kdtui("watch", "baseline", "--runs-dir", str(runs))
    assert code == 0
    assert "baseline  finished  epoch 6/6" in out and "train loss" in out and "val top1 (%)" in out
    code, out, _ = kdtui("watch", "lr-0.2", "--runs-dir", str(runs))
    assert code == 1 and "failed" in out  # a failed run: non-zero, for scripts


def test_watch_follows_a_run_until_it_ends(runs: Path) -> None:
    info_path = runs / "20260105-084000-live-a005" / "run.json"

    def finish_soon() -> None:
        time.sleep(0.6)
        info = json.loads(info_path.read_text())
        info.update(status="finished", epoch=6)
        info_path.write_text(json.dumps(info))

    thread = threading.Thread(target=finish_soon)
    thread.start()
    code, out, _ = kdtui("watch", "live", "--runs-dir", str(runs), "--interval", "0.1")
    thread.join()
    assert code == 0
    assert out.count("live  running") >= 2  # redrawn while it ran
    assert out.rstrip().splitlines()[0].startswith("live  running")
    assert "live  finished  epoch 6/6" in out


def test_watch_ctrl_c_leaves_the_run_alone(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("tui.commands.plot.time.sleep", interrupt)
    code, out, _ = kdtui("watch", "live", "--runs-dir", str(runs))
    assert code == 0 and "stopped watching; the run continues" in out
    assert json.loads((runs / "20260105-084000-live-a005" / "run.json").read_text())["status"] == "running"
