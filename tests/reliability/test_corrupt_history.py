"""Corrupt history: runs/kdtui.json truncated, garbage, the wrong shape or not UTF-8.

`kdtui runs` must say so in one line (exit 2, no traceback) and point at `kdtui runs --rebuild`,
which must recover every run, with its status, metrics, tags and note, from the run directories.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.rundir import RunDir
from tests.reliability.procs import new_run, run_cli
from tui.store import STORE_FILE, RunStore, write_annotations

CORRUPTIONS = {
    "truncated": lambda good: good[: len(good) // 2],
    "garbage": lambda good: os.urandom(4096),
    "not utf-8": lambda good: b"\xff\xfe" + good,
    "a list": lambda good: b"[1, 2, 3]",
    "wrong tables": lambda good: b'{"runs": 5}',
    "nul bytes": lambda good: b"\0" * len(good),
}


@pytest.fixture
def history(tiny_recipe: Path, runs_dir: Path) -> list[dict]:
    """Four run directories in every end state, with tags and a note, and the store listing them."""
    runs: list[RunDir] = [new_run(tiny_recipe, runs_dir, [f"optim.lr={lr}"]) for lr in (0.1, 0.2, 0.3, 0.4)]
    for run, status in zip(runs, ("finished", "failed", "interrupted", "finished"), strict=True):
        run.update_info(status=status, epoch=3, epochs=3, best={"val.top1": 0.5, "epoch": 3, "metric": "val.top1"},
                        error="loss became nan at epoch 2, step 7" if status == "failed" else None)
    write_annotations(runs[0], tags=["baseline", "ref"], note="the one to beat")
    docs = RunStore(runs_dir).sync()
    assert len(docs) == 4
    return docs


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_store_is_one_line_and_rebuild_recovers(kind: str, history: list[dict], runs_dir: Path) -> None:
    from typer.testing import CliRunner

    from tui.cli import app

    store = runs_dir / STORE_FILE
    store.write_bytes(CORRUPTIONS[kind](store.read_bytes()))
    runner = CliRunner()
    for args in (["runs"], ["runs", "--json"], ["runs", "--csv"]):
        result = runner.invoke(app, [*args, "--runs-dir", str(runs_dir)])
        assert result.exit_code == 2, (kind, result.output, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdtui: error: ") and "Traceback" not in result.output
        assert str(store) in lines[0] and "kdtui runs --rebuild" in lines[0]
        assert result.stdout == ""
    rebuilt = runner.invoke(app, ["runs", "--rebuild", "--json", "--runs-dir", str(runs_dir)])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(rebuilt.stdout) == history[::-1]  # every document back, identical (newest first)
    assert json.loads(store.read_bytes())  # and the file is valid again


def test_real_cli_on_a_truncated_store(history: list[dict], runs_dir: Path) -> None:
    """The same through the real command line: exit status and stderr as a user sees them."""
    store = runs_dir / STORE_FILE
    store.write_bytes(store.read_bytes()[:-7])
    listed = run_cli("runs", "--runs-dir", str(runs_dir))
    assert listed.returncode == 2 and listed.stdout == ""
    assert listed.stderr.count("\n") == 1 and "kdtui runs --rebuild" in listed.stderr, listed.stderr
    rebuilt = run_cli("runs", "--rebuild", "--csv", "--runs-dir", str(runs_dir))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.count("\n") == 1 + len(history) and "the one to beat" in rebuilt.stdout


def test_empty_or_missing_store_rebuilds_itself(history: list[dict], runs_dir: Path) -> None:
    """No history at all is not an error: the next listing recreates it from the folders."""
    store = runs_dir / STORE_FILE
    for damage in (lambda: store.write_bytes(b""), store.unlink):
        damage()
        assert RunStore(runs_dir).sync() == history
        assert len(json.loads(store.read_bytes())["runs"]) == len(history)


def test_garbage_run_json_is_listed_as_failed_not_dropped(history: list[dict], runs_dir: Path) -> None:
    """A run directory whose run.json is garbage still shows up after --rebuild, marked unreadable."""
    victim = Path(history[1]["run_dir"])
    (victim / "run.json").write_bytes(b"\x00garbage")
    store = RunStore(runs_dir)
    assert store.rebuild() == len(history)
    doc = store.get(victim.name)
    assert doc is not None and doc["status"] == "failed" and "unreadable" in doc["error"]
