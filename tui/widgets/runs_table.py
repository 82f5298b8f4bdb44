"""The runs table: a Line-API widget that renders only the visible rows.

Textual's DataTable builds every row up front (about 1 s at 10,000 runs, and O(n) removals);
this table keeps the run documents in a list and formats a row only when it is painted, so
first paint and re-sorting cost the same at 10 runs or 100,000.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from tui.widgets.format import (
    best_metric,
    duration_s,
    fmt_duration,
    fmt_pct,
    fmt_progress,
    fmt_time,
    progress,
    short,
    status_of,
)

STATUSES = ("running", "queued", "finished", "failed", "interrupted", "missing")


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    width: int  # 0: takes the remaining width
    text: Callable[[dict[str, Any]], str]
    sort: Callable[[dict[str, Any]], Any]
    right: bool = False
    optional: int = 0  # dropped first (highest first) when the terminal is narrow
    wide: bool = False  # shown only when the name column would stay wide


def _ratio(doc: dict[str, Any]) -> float:
    done, total = progress(doc)
    return done / total if total else 0.0


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


COLUMNS: tuple[Column, ...] = (
    Column("status", "status", 11, status_of, status_of),
    Column("name", "name", 0, lambda d: d.get("name") or d.get("id", ""), lambda d: str(d.get("name") or "").lower()),
    Column("method", "method", 10, lambda d: d.get("method") or "-", lambda d: str(d.get("method") or "")),
    Column("arch", "arch", 12, lambda d: d.get("arch") or "-", lambda d: str(d.get("arch") or ""), wide=True),
    Column("dataset", "data", 10, lambda d: d.get("dataset") or "-", lambda d: str(d.get("dataset") or ""),
           wide=True),
    Column("device", "device", 6, lambda d: d.get("device") or "-", lambda d: str(d.get("device") or ""), optional=1),
    Column("progress", "epoch", 7, fmt_progress, _ratio, right=True),
    Column("top1", "top1", 5, lambda d: fmt_pct(best_metric(d)), lambda d: _or(best_metric(d), -1.0), right=True),
    Column("duration", "time", 6, lambda d: fmt_duration(duration_s(d)), lambda d: _or(duration_s(d), -1.0),
           right=True),
    Column("started", "started", 11, lambda d: fmt_time(d.get("started") or d.get("created")),
           lambda d: d.get("started") or d.get("created") or 0.0, optional=2),
    Column("tags", "tags", 16, lambda d: " ".join(map(str, d.get("tags") or [])) or "",
           lambda d: " ".join(map(str, d.get("tags") or [])), wide=True),
)
MIN_NAME = 12
WIDE_NAME = 32  # extra columns appear only while the name keeps this much room


def sort_docs(docs: list[dict[str, Any]], key: str, descending: bool) -> list[dict[str, Any]]:
    column = next(c for c in COLUMNS if c.key == key)
    return sorted(docs, key=column.sort, reverse=descending)


class RunsTable(ScrollView, can_focus=True):
    """Rows are run documents (store docs overlaid with fresh run.json fields)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "cursor(-1)", "up", show=False),
        Binding("down,j", "cursor(1)", "down", show=False),
        Binding("pageup", "page(-1)", "page up", show=False),
        Binding("pagedown", "page(1)", "page down", show=False),
        Binding("home,g", "jump(0)", "first", show=False),
        Binding("end,G", "jump(-1)", "last", show=False),
        Binding("space", "toggle_mark", "mark"),
        Binding("enter", "open", "open"),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "runs-table--header", "runs-table--cursor", "runs-table--marked",
        *(f"runs-table--{status}" for status in STATUSES),
    }

    cursor: reactive[int] = reactive(0, always_update=True, repaint=False)

    class Opened(Message):
        def __init__(self, doc: dict[str, Any]) -> None:
            super().__init__()
            self.doc = doc

    class Highlighted(Message):
        def __init__(self, doc: dict[str, Any] | None) -> None:
            super().__init__()
            self.doc = doc

    class SortRequested(Message):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows: list[dict[str, Any]] = []
        self.marked: set[str] = set()
        self.sort_key = "started"
        self.descending = True
        self.empty_text = "no runs"
        self.first_paint: float | None = None  # perf_counter() when the first row was painted (bench)
        self._columns_cache: tuple[int, list[tuple[Column, int]]] | None = None

    # ---------------------------------------------------------------- data
    def set_rows(self, rows: list[dict[str, Any]]) -> None:
        """Replace the rows, keeping the cursor on the same run when it is still shown."""
        current = self.current
        self.rows = rows
        index = 0
        if current is not None:
            index = next((i for i, doc in enumerate(rows) if doc.get("id") == current.get("id")), 0)
        self.virtual_size = Size(1, len(rows) + 1)
        self.cursor = min(index, max(len(rows) - 1, 0))
        self.refresh()

    @property
    def current(self) -> dict[str, Any] | None:
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    def selected(self) -> list[dict[str, Any]]:
        """Marked runs in table order, else the run under the cursor."""
        marked = [doc for doc in self.rows if doc.get("id") in self.marked]
        if marked:
            return marked
        return [self.current] if self.current else []

    # ---------------------------------------------------------------- actions
    def watch_cursor(self) -> None:
        self._scroll_to_cursor()
        self.refresh()
        self.post_message(self.Highlighted(self.current))

    def action_cursor(self, delta: int) -> None:
        if self.rows:
            self.cursor = max(0, min(len(self.rows) - 1, self.cursor + delta))

    def action_page(self, direction: int) -> None:
        self.action_cursor(direction * max(1, self.size.height - 2))

    def action_jump(self, index: int) -> None:
        if self.rows:
            self.cursor = index % len(self.rows)

    def action_toggle_mark(self) -> None:
        doc = self.current
        if doc is None:
            return
        self.marked ^= {doc.get("id")}
        self.action_cursor(1)
        self.refresh()

    def action_open(self) -> None:
        if self.current is not None:
            self.post_message(self.Opened(self.current))

    def _scroll_to_cursor(self) -> None:
        visible = max(1, self.size.height - 1)
        top = int(self.scroll_offset.y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + visible:
            self.scroll_to(y=self.cursor - visible + 1, animate=False, immediate=True)

    def on_resize(self) -> None:
        self._columns_cache = None
        self._scroll_to_cursor()

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        if offset.y == 0:
            x = 0
            for column, width in self._columns():
                if x <= offset.x < x + width + 1:
                    self.post_message(self.SortRequested(column.key))
                    return
                x += width + 1
            return
        index = int(self.scroll_offset.y) + offset.y - 1
        if 0 <= index < len(self.rows):
            self.cursor = index
            if event.chain >= 2:
                self.action_open()

    def visible_keys(self) -> list[str]:
        return [column.key for column, _ in self._columns()]

    # ---------------------------------------------------------------- painting
    def _columns(self) -> list[tuple[Column, int]]:
        width = self.scrollable_content_region.width
        if self._columns_cache and self._columns_cache[0] == width:
            return self._columns_cache[1]
        columns = [c for c in COLUMNS if not c.wide]
        for extra in (c for c in COLUMNS if c.wide):
            fixed = 2 + sum(c.width + 1 for c in columns if c.width)
            if width - fixed - extra.width - 1 >= WIDE_NAME:
                columns.append(extra)
        columns.sort(key=COLUMNS.index)
        while True:
            fixed = 2 + sum(c.width + 1 for c in columns if c.width)  # 2: the mark, 1: each separator
            if width - fixed >= MIN_NAME or not any(c.optional for c in columns):
                break
            columns.remove(max((c for c in columns if c.optional), key=lambda c: c.optional))
        layout = [(c, c.width or max(width - fixed, 4)) for c in columns]
        self._columns_cache = (width, layout)
        return layout

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == 0:
            return self._header(width, base)
        index = int(self.scroll_offset.y) + y - 1
        if index >= len(self.rows):
            if not self.rows and y == 1:
                return Strip([Segment(short(self.empty_text, width).ljust(width), base)], width)
            return Strip.blank(width, base)
        if self.first_paint is None:
            self.first_paint = time.perf_counter()
        return self._row(self.rows[index], index, width, base)

    def _header(self, width: int, base: Style) -> Strip:
        style = base + self.get_component_rich_style("runs-table--header")
        segments = [Segment("  ", style)]
        for column, cell in self._columns():
            title = column.header
            if column.key == self.sort_key:
                title += "▼" if self.descending else "▲"
            text = short(title, cell)
            segments.append(Segment((text.rjust(cell) if column.right else text.ljust(cell)) + " ", style))
        return Strip(segments).adjust_cell_length(width, style)

    def _row(self, doc: dict[str, Any], index: int, width: int, base: Style) -> Strip:
        style = base
        if doc.get("id") in self.marked:
            style += self.get_component_rich_style("runs-table--marked")
        if index == self.cursor:
            style += self.get_component_rich_style("runs-table--cursor")
        segments = [Segment("● " if doc.get("id") in self.marked else "  ", style)]
        for column, cell in self._columns():
            text = short(column.text(doc), cell)
            text = text.rjust(cell) if column.right else text.ljust(cell)
            cell_style = style
            if column.key == "status" and index != self.cursor and status_of(doc) in STATUSES:
                cell_style = style + self.get_component_rich_style(f"runs-table--{status_of(doc)}")
            segments.append(Segment(text, cell_style))
            segments.append(Segment(" ", style))
        return Strip(segments).adjust_cell_length(width, style)
