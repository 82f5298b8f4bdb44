"""Tailing run directories from a thread worker without ever blocking the UI thread.

`follow_runs` runs inside `@work(thread=True)`: each poll reads only the bytes appended to
metrics.jsonl and train.log since the last one (JsonlTail, a byte offset for the log) and
re-reads run.json only when its mtime changed. Updates go into an `UpdateBuffer`; the first
update after a drain posts one `RunsTailed` message, later ones merge into the buffer until
the UI drains it, so a busy UI never accumulates a backlog of messages. Widgets are never
touched from the thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from textual.message_pump import MessagePump
from textual.worker import get_current_worker

from engine.rundir import RunDir
from tui.messages import RunsTailed, RunUpdate
from tui.tail import JsonlTail

LOG_BACKLOG_BYTES = 64 * 1024  # on first open, show only the end of a long train.log
LOG_LINES_KEPT = 500


class UpdateBuffer:
    """Thread-safe mailbox of per-run updates, merged until the UI takes them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, RunUpdate] = {}

    def add(self, update: RunUpdate) -> bool:
        """Store an update; True when the buffer was empty (the caller posts one wake-up)."""
        with self._lock:
            was_empty = not self._pending
            if update.run_id in self._pending:
                self._pending[update.run_id].merge(update)
            else:
                self._pending[update.run_id] = update
            return was_empty

    def drain(self) -> list[RunUpdate]:
        with self._lock:
            updates, self._pending = list(self._pending.values()), {}
        for update in updates:
            del update.log_lines[:-LOG_LINES_KEPT]
        return updates


class RunTail:
    """Per-run read positions. Lives in the worker thread only."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.metrics = JsonlTail(run.metrics_path)
        self.metrics_inode: int | None = None
        self.log_offset: int | None = None
        self.log_partial = b""
        self.info_mtime: int | None = None
        self.missing: bool | None = None

    def poll(self) -> RunUpdate | None:
        update = RunUpdate(self.run.id)
        missing = not self.run.path.is_dir()
        flipped, self.missing = missing != self.missing, missing
        update.missing = missing
        if missing:
            return update if flipped else None
        update.reset = self._check_rewritten()
        update.events = self.metrics.read_new()
        update.log_lines = self._read_log()
        update.info = self._read_info()
        changed = flipped or update.reset or update.events or update.log_lines or update.info is not None
        return update if changed else None

    def _check_rewritten(self) -> bool:
        """A resume replaces metrics.jsonl (new inode, maybe shorter): start over from byte 0."""
        try:
            stat = os.stat(self.run.metrics_path)
        except FileNotFoundError:
            return False
        inode, self.metrics_inode = self.metrics_inode, stat.st_ino
        if (inode is not None and inode != stat.st_ino) or stat.st_size < self.metrics.offset:
            self.metrics = JsonlTail(self.run.metrics_path)
            return True
        return False

    def _read_log(self) -> list[str]:
        try:
            with open(self.run.log_path, "rb") as handle:
                size = handle.seek(0, 2)
                if self.log_offset is None:
                    self.log_offset = max(0, size - LOG_BACKLOG_BYTES)
                if size < self.log_offset:
                    self.log_offset, self.log_partial = 0, b""
                handle.seek(self.log_offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self.log_offset += len(chunk)
        lines = (self.log_partial + chunk).split(b"\n")
        self.log_partial = lines.pop()
        return [clean_line(line) for line in lines[-LOG_LINES_KEPT:]]

    def _read_info(self) -> dict | None:
        try:
            mtime = os.stat(self.run.info_path).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime == self.info_mtime:
            return None
        info = self.run.read_info()
        if info:  # a half-visible replace reads as {}: try again next poll
            self.info_mtime = mtime
            return info
        return None


def clean_line(raw: bytes) -> str:
    """Decode a log line for display: keep what a carriage return left visible, drop escapes."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r").rsplit("\r", 1)[-1]
    return "".join(ch if ch.isprintable() or ch == "\t" else "?" for ch in text.replace("\x1b", ""))


def follow_runs(target: MessagePump, buffer: UpdateBuffer, run_dirs: list[Path], interval: float = 0.25,
                sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll the runs until the worker is cancelled (body of a `@work(thread=True)` worker)."""
    worker = get_current_worker()
    tails = [RunTail(RunDir(Path(path))) for path in run_dirs]
    while not worker.is_cancelled:
        for tail in tails:
            try:
                update = tail.poll()
            except OSError as err:  # permissions, a vanished file mid-read: show it, keep tailing
                update = RunUpdate(tail.run.id, log_lines=[f"[kdtui: cannot read {tail.run.path}: {err}]"])
            if update is not None and buffer.add(update):
                target.post_message(RunsTailed())
        sleep(interval)
