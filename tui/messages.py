"""Messages the app's workers post to screens: small dataclasses, nothing but data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class RunUpdate:
    """What changed in one run directory since the last poll (built in the tail thread)."""

    run_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)
    info: dict[str, Any] | None = None
    reset: bool = False  # metrics.jsonl was rewritten (a resume truncated it): drop what was shown
    missing: bool = False  # the run directory is gone

    def merge(self, newer: RunUpdate) -> None:
        """Fold a later update into this one (coalescing while the UI is busy)."""
        if newer.reset:
            self.events, self.reset = list(newer.events), True
        else:
            self.events.extend(newer.events)
        self.log_lines.extend(newer.log_lines)
        if newer.info is not None:
            self.info = newer.info
        self.missing = newer.missing


@dataclass
class RunsTailed(Message):
    """New data is waiting in the tailer's buffer; the handler drains it (one message in flight)."""


@dataclass
class RunsLoaded(Message):
    """The run history was (re)loaded; `warning` explains a degraded source such as a locked store."""

    docs: list[dict[str, Any]]
    warning: str | None = None
    syncing: bool = False  # a reconciliation with the run folders follows


@dataclass
class RunsRefreshed(Message):
    """Fresh run.json contents for runs that may be changing (running or queued)."""

    infos: dict[str, dict[str, Any]]


@dataclass
class RecipeChecked(Message):
    """Result of validating a recipe (and overrides) off the UI thread."""

    path: str
    summary: str
    error: str | None
    points: int = 0
    text: str = ""  # the file's contents, for the preview
