"""Turn a recipe into run directories and start engine processes for them.

The one path by which runs start: `kdtui run`, `kdtui resume` and the TUI's launch
dialog all come through here. Torch-free. Each run is its own process in its own
session (setsid), so it outlives the terminal, the TUI and the SSH connection.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.recipe import Recipe, RecipeError, expand_sweep, load_recipe, parse_override
from engine.rundir import RunDir, create_run_dir, iter_run_dirs

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Prepared:
    """A validated recipe, expanded into its sweep points, before any directory exists."""

    source: Path
    recipe: Recipe
    points: list[tuple[dict[str, Any], Recipe]]


def prepare(recipe_path: str | Path, overrides: list[str] | None = None, runs_dir: Path | None = None,
            device: str | None = None) -> Prepared:
    """Validate everything first: a RecipeError here means nothing was created."""
    source = Path(recipe_path)
    extra = dict(parse_override(item) for item in overrides or [])
    if device:
        extra["train.device"] = device
    recipe = load_recipe(source, extra)
    if recipe.data.dataset != "folder" and not Path(recipe.data.root).is_absolute():
        recipe.data.root = str((Path.cwd() / recipe.data.root).resolve())
    if recipe.teacher.from_recipe and not recipe.teacher.checkpoint:
        recipe.teacher.checkpoint = str(teacher_checkpoint(source, Path(recipe.teacher.from_recipe), runs_dir))
    return Prepared(source.resolve(), recipe, expand_sweep(recipe, source))


def teacher_checkpoint(source: Path, teacher_recipe: Path, runs_dir: Path | None) -> Path:
    """`[teacher] from = "recipes/x.toml"` -> best.pt of that recipe's latest finished run."""
    from engine.rundir import runs_root

    wanted = str(teacher_recipe.resolve())
    finished = [run for run in iter_run_dirs(runs_root(runs_dir))
                if run.read_info().get("recipe_path") == wanted and run.read_info().get("status") == "finished"
                and (run.checkpoints / "best.pt").exists()]
    if not finished:
        raise RecipeError(source, "teacher.from", f"no finished run of {teacher_recipe} with a best.pt; run it first")
    return finished[-1].checkpoints / "best.pt"


def create_runs(prepared: Prepared, runs_dir: Path, extra_info: dict[str, Any] | None = None) -> list[RunDir]:
    """One queued run directory per sweep point, each with its fully resolved recipe.toml."""
    text = prepared.source.read_bytes()
    commit = git_commit(prepared.source.parent)
    runs = []
    for point, recipe in prepared.points:
        info = {
            "recipe_path": str(prepared.source),
            "recipe_hash": hashlib.sha256(text).hexdigest()[:16],
            "method": recipe.run.method,
            "arch": recipe.model.arch,
            "dataset": recipe.data.dataset,
            "device": recipe.train.device,
            "epochs": recipe.train.epochs,
            "sweep_point": point,
            "tags": list(recipe.run.tags),
            "note": recipe.run.note,
            "git_commit": commit,
            **(extra_info or {}),
        }
        runs.append(create_run_dir(runs_dir, recipe.run.name, recipe.to_toml(), info))
    return runs


def git_commit(folder: Path) -> str | None:
    """HEAD of the git repository holding the recipes folder ('+dirty' with local changes), else None."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def engine_command(run: RunDir, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "engine", str(run.path.resolve()), *(["--resume"] if resume else [])]


def engine_env() -> dict[str, str]:
    """The child imports the same engine code as this process, whatever its cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def spawn(run: RunDir, resume: bool = False, command: list[str] | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the engine detached from this terminal; stdout and stderr go to train.log.
    `env` adds variables (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS for torchrun groups)."""
    with open(run.log_path, "ab") as log:
        process = subprocess.Popen(
            command or engine_command(run, resume), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**engine_env(), **(env or {})}, close_fds=True,
        )
    run.update_info(pid=process.pid)
    return process
