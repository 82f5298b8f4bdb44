"""NaN: a recipe that diverges (absurd learning rate) through the real `kdtui run`.

The run must stop with status `failed` and an error naming the epoch and the exact first step
whose loss was not finite (the trainer checks once per log window, then pinpoints the step).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from engine.checkpoint import load_checkpoint
from engine.rundir import iter_run_dirs
from tests.reliability.procs import run_cli

NAN_ERROR = re.compile(r"^loss became (nan|inf|-inf) at epoch (\d+), step (\d+); lower optim\.lr")


def test_diverging_recipe_fails_naming_epoch_and_step(tiny_recipe: Path, runs_dir: Path) -> None:
    result = run_cli("run", str(tiny_recipe), "--set", "optim.lr=1e8", "--set", "train.log_every=3",
                     "--runs-dir", str(runs_dir))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    (run,) = iter_run_dirs(runs_dir)
    info = run.read_info()
    assert info["status"] == "failed", info
    match = NAN_ERROR.match(info["error"])
    assert match, info["error"]
    epoch, step = int(match[2]), int(match[3])
    assert f"failed: {run.path}" in result.stdout and f"error: {info['error']}" in result.stdout
    assert epoch == (step - 1) // info["steps_per_epoch"] + 1  # the epoch that holds that step
    logged = [e for e in run.events() if e.get("kind") == "step"]
    assert all(isinstance(e["loss"], float) and math.isfinite(e["loss"]) for e in logged)  # nothing non-finite logged
    assert all(e["step"] < step for e in logged) and step - max((e["step"] for e in logged), default=0) <= 3
    for checkpoint in run.checkpoints.glob("*.pt") if run.checkpoints.is_dir() else []:
        weights = load_checkpoint(checkpoint)["model"].values()
        assert all(bool(w.isfinite().all()) for w in weights if w.is_floating_point())  # no NaN weights saved
    listed = run_cli("runs", "--json", "--runs-dir", str(runs_dir))
    (doc,) = json.loads(listed.stdout)
    assert doc["status"] == "failed" and doc["error"] == info["error"]
    print(f"\nnan: {info['error']}")
