"""The run-directory contract (DESIGN.md): paths, run.json, metrics.jsonl.

Torch-free: the launcher, the store and the TUI read run directories without torch.
Writers are crash-safe: run.json is replaced atomically, metrics.jsonl is appended
one flushed line at a time, and readers skip a torn last line instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "finished", "failed", "interrupted")
DEFAULT_RUNS_DIR = "runs"


def runs_root(explicit: str | Path | None = None) -> Path:
    """--runs-dir, else $KDTUI_RUNS_DIR, else ./runs."""
    return Path(explicit or os.environ.get("KDTUI_RUNS_DIR") or DEFAULT_RUNS_DIR)


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a user-given name (no '/', '..', NUL, escapes)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-.")
    return cleaned[:limit].strip("-.") or "run"


def new_run_id(name: str) -> str:
    """Sortable by creation time, readable, unique: 20261123-141502-quickstart-a3f9."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(name)}-{secrets.token_hex(2)}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete JSON lines; a torn or garbage line is skipped with a warning."""
    events: list[dict[str, Any]] = []
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return events
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: line %d is not valid JSON (partial write?); skipped", path, number)
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


@dataclass(frozen=True)
class RunDir:
    """One run's folder and the files the contract names."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.toml"

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def tb_dir(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions"

    def read_info(self) -> dict[str, Any]:
        """run.json as a dict; {} when missing or unreadable (the caller shows that state)."""
        try:
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return info if isinstance(info, dict) else {}

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.info_path, json.dumps(info, indent=2, sort_keys=True, default=str))

    def update_info(self, **fields: Any) -> dict[str, Any]:
        info = self.read_info()
        info.update(fields)
        self.write_info(info)
        return info

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)


def create_run_dir(root: Path, name: str, recipe_toml: str, info: dict[str, Any]) -> RunDir:
    """Make runs/<id>/ with recipe.toml and a `queued` run.json. The id never escapes `root`."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        run = RunDir(root / new_run_id(name))
        try:
            run.path.mkdir()
            break
        except FileExistsError:
            continue
    atomic_write_text(run.recipe_path, recipe_toml)
    base = {
        "id": run.id,
        "name": name,
        "status": "queued",
        "host": socket.gethostname(),
        "pid": None,
        "created": time.time(),
        "started": None,
        "ended": None,
        "epoch": 0,
        "step": 0,
        "best": {},
        "last": {},
        "error": None,
        "run_dir": str(run.path.resolve()),
    }
    run.write_info({**base, **info})
    return run


def iter_run_dirs(root: Path) -> Iterator[RunDir]:
    """Every folder under root that has a run.json, oldest id first."""
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.is_dir() and (child / "run.json").exists():
            yield RunDir(child)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def effective_status(info: dict[str, Any]) -> str:
    """A `running` run whose process is gone is shown (and resumable) as `interrupted`; so is a
    `queued` run whose queue process (`queue_pid`, tui/queue.py) is gone."""
    status = info.get("status", "failed")
    local = info.get("host") == socket.gethostname()
    if status == "running" and local and not pid_alive(info.get("pid")):
        return "interrupted"
    if status == "queued" and local and info.get("queue_pid") and not pid_alive(info.get("queue_pid")):
        return "interrupted"
    return status
