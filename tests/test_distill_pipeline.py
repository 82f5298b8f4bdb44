"""The shipped quick HSAKD pipeline end to end through `kdtui run` (launcher + engine process),
with tiny overrides: a student recipe naming the teacher recipe resolves to that run's best.pt."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from engine.checkpoint import load_checkpoint
from engine.rundir import iter_run_dirs
from tests.conftest import ROOT

PIPELINE = ROOT / "recipes" / "distill"
TINY = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.threads=1", "data.embedded_per_class=8",
        "data.batch_size=16", "data.image_size=16"]


def kdtui_run(recipe: Path, runs: Path) -> subprocess.CompletedProcess[str]:
    sets = [arg for item in TINY for arg in ("--set", item)]
    return subprocess.run([sys.executable, "-m", "tui", "run", str(recipe), *sets], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "KDTUI_RUNS_DIR": str(runs)})


def test_quick_pipeline_teacher_then_student_through_kdtui_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # the student first: no finished teacher run yet -> one-line error, exit 2, nothing created
    early = kdtui_run(PIPELINE / "quick_student_hsakd.toml", runs)
    assert early.returncode == 2, early.stderr
    assert "teacher.from" in early.stderr and "run it first" in early.stderr and early.stderr.count("\n") == 1
    assert not list(iter_run_dirs(runs))

    teacher = kdtui_run(PIPELINE / "quick_teacher.toml", runs)
    assert teacher.returncode == 0, teacher.stdout + teacher.stderr
    (teacher_run,) = iter_run_dirs(runs)
    best = teacher_run.checkpoints / "best.pt"
    state = load_checkpoint(best)
    assert state["arch"] == "resnet8_aux" and state["dataset"] == "embedded" and state["num_classes"] == 10
    assert {"val.aux3_joint_top1", "val.aux3_class_top1", "val.top1"} <= teacher_run.read_info()["best"].keys()

    student = kdtui_run(PIPELINE / "quick_student_hsakd.toml", runs)
    assert student.returncode == 0, student.stdout + student.stderr
    (student_run,) = [r for r in iter_run_dirs(runs) if r.id != teacher_run.id]
    resolved = tomllib.loads((student_run.path / "recipe.toml").read_text())
    assert Path(resolved["teacher"]["checkpoint"]) == best.resolve()
    info = student_run.read_info()
    assert info["status"] == "finished" and info["method"] == "hsakd" and 0 <= info["best"]["test.top1"] <= 1
    events = student_run.events()
    assert any("loss_kd_aux3" in e and "loss_kd_main" in e for e in events if e["split"] == "train")
    saved = load_checkpoint(student_run.checkpoints / "last.pt")
    assert set(saved["modules"]) == {"model"} and saved["arch"] == "resnet8_aux"  # no teacher inside
