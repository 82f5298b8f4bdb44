"""Disk full: a real engine process whose file-size limit (RLIMIT_FSIZE) is too small for a checkpoint.

With SIGXFSZ ignored, write() past the limit fails with EFBIG, which is what a full disk (ENOSPC)
or a quota (EDQUOT) looks like to the writer. The previous last.pt must stay byte-identical and
loadable, the run must end `failed` with a message that says the disk is full, and no
half-written file may remain.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.checkpoint import load_checkpoint
from engine.errors import DiskFullError
from engine.rundir import RunDir
from engine.trainer import Trainer
from tests.conftest import ROOT
from tests.reliability.procs import FreshEngine, new_run, run_cli


def file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partial_files(run: RunDir) -> list[str]:
    return sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*.tmp"))


def stop_after_first_epoch(run: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train epoch 1 in this process and stop right after its checkpoint (as a crash would)."""
    original = Trainer._end_of_epoch_checkpoints

    def die_after_epoch_one(self: Trainer, evals: dict) -> None:
        original(self, evals)
        raise SystemExit("stop after epoch 1")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_end_of_epoch_checkpoints", die_after_epoch_one)
        with pytest.raises(SystemExit):
            Trainer(run).fit()
    run.update_info(status="interrupted")


def test_checkpoint_write_past_the_limit_fails_cleanly(tiny_recipe: Path, runs_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = new_run(tiny_recipe, runs_dir, ["data.embedded_per_class=8", "data.batch_size=16", "train.epochs=2"])
    stop_after_first_epoch(run, monkeypatch)
    last, best = run.checkpoints / "last.pt", run.checkpoints / "best.pt"
    before = {"last": digest(last), "best": digest(best)}
    limit = last.stat().st_size // 2  # room for logs and run.json, not for a checkpoint

    engine = FreshEngine(run, resume=True, preexec_fn=file_size_limit(limit))
    assert engine.wait() == 1  # EXIT_FAILED: a reported failure, not a crash
    info = json.loads(run.info_path.read_text())
    assert info["status"] == "failed" and "disk full" in info["error"], info["error"]
    assert "\n" not in info["error"] and "last.pt" in info["error"]
    log = run.log_path.read_text()
    assert "Traceback" not in log and "disk full" in log
    assert {"last": digest(last), "best": digest(best)} == before  # the previous checkpoints are untouched
    assert load_checkpoint(last)["progress"]["epoch"] == 1
    assert partial_files(run) == []  # nothing half-written left behind
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best.pt", "epoch_0001.pt", "last.pt"]

    listed = run_cli("runs", "--json", "--runs-dir", str(runs_dir))
    doc = next(d for d in json.loads(listed.stdout) if d["id"] == run.id)
    assert doc["status"] == "failed" and "disk full" in doc["error"]

    resumed = run_cli("resume", run.id, "--runs-dir", str(runs_dir))  # space freed: resume finishes
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert run.read_info()["status"] == "finished" and run.read_info()["epoch"] == 2


def test_run_json_write_past_the_limit_keeps_the_old_file(tmp_path: Path) -> None:
    """The atomic metadata writer (run.json, the metrics rewrite on resume) under the same fault."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_info({"status": "running", "note": "x"})
    before = run.info_path.read_bytes()
    script = ("from pathlib import Path; from engine.rundir import RunDir; "
              "RunDir(Path(__import__('sys').argv[1])).update_info(note='y' * 100_000)")
    result = subprocess.run([sys.executable, "-c", script, str(run.path)], cwd=ROOT, capture_output=True, text=True,
                            preexec_fn=file_size_limit(10_000), timeout=60)
    assert result.returncode == 1 and "File too large" in result.stderr
    assert run.info_path.read_bytes() == before
    assert sorted(p.name for p in run.path.iterdir()) == ["run.json"]


def test_hard_link_fallback_copy_leaves_nothing_on_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system without hard links best.pt is a copy; a copy cut short must not stay behind."""
    from engine import trainer

    source = tmp_path / "last.pt"
    source.write_bytes(b"x" * 1000)

    def no_links(*args: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    def copy_until_full(src: Path, dst: Path) -> None:
        Path(dst).write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(shutil, "copyfile", copy_until_full)
    with pytest.raises(DiskFullError, match="disk full"):
        trainer._link_or_copy(source, tmp_path / "best.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
