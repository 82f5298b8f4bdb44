"""Read only what was appended to a JSON-lines file since the last call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlTail:
    """Keeps a byte offset and an unfinished-line buffer; never re-reads old bytes.

    A line still being written (no trailing newline yet) waits for the next call;
    a complete line that is not valid JSON is skipped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                size = handle.seek(0, 2)
                if size < self.offset:  # file was rewritten (resume truncation): start over
                    self.offset, self.partial = 0, b""
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(event, dict):
                events.append(event)
        return events
