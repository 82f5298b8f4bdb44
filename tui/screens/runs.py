"""Runs: the history table, sortable and filterable, with every run action one key away."""

from __future__ import annotations

import os
import shlex
import threading
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Input, Static

from engine.rundir import RunDir, iter_run_dirs
from tui.messages import RunsLoaded, RunsRefreshed
from tui.widgets.format import status_of
from tui.widgets.key_footer import KeyFooter
from tui.widgets.runs_table import RunsTable, sort_docs

REFRESH_S = 2.0
SYNC_LOCK_TIMEOUT_S = 5.0  # the UI says "store locked" after this, instead of the CLI's minute
ACTIVE = ("running", "queued")
FILTER_KEYS = ("status", "method", "tag", "device", "arch", "dataset")
STATUS_CYCLE = ("", "running", "finished", "failed", "interrupted", "queued")
TEXT_SORTED = ("status", "name", "method", "device", "arch", "dataset", "tags")
HELP = "filter: words  status:running  method:kd  tag:x  (/ to edit, Esc back to the table)"


def parse_query(text: str) -> tuple[dict[str, str], list[str]]:
    """'status:running lr=0.1 kd' -> ({'status': 'running'}, ['lr=0.1', 'kd'])."""
    try:
        tokens = shlex.split(text)
    except ValueError:  # an unclosed quote while typing
        tokens = text.split()
    filters, words = {}, []
    for token in tokens:
        key, sep, value = token.partition(":")
        if sep and key.lower() in FILTER_KEYS and value:
            filters[key.lower()] = value.lower()
        else:
            words.append(token.lower())
    return filters, words


def haystack(doc: dict[str, Any]) -> str:
    tags = doc.get("tags") if isinstance(doc.get("tags"), list) else []
    fields = (doc.get(k) for k in ("id", "name", "method", "arch", "dataset", "device", "note", "error"))
    return " ".join(str(v) for v in (*fields, *tags) if v).lower()


def matches(doc: dict[str, Any], filters: dict[str, str], words: list[str], hay: str) -> bool:
    for key, value in filters.items():
        if key == "status":
            if not status_of(doc).startswith(value):  # prefix: status:f while typing, status:fin...
                return False
        elif key == "tag":
            if value not in [str(t).lower() for t in doc.get("tags") or []]:
                return False
        elif value not in str(doc.get(key) or "").lower():
            return False
    return all(word in hay for word in words)


def load_docs(root: Path, sync: bool) -> RunsLoaded:
    """The store's documents (reconciled with the run folders when `sync`); the folders if the store fails."""
    warning = None
    try:
        from tui.store import RunStore

        store = RunStore(root)
        store.lock.timeout = SYNC_LOCK_TIMEOUT_S
        docs = store.sync() if sync else store.all()
    except Exception as err:  # a locked or corrupt store degrades to reading the folders
        warning = f"run store unavailable ({err}); showing the run folders"
        docs = [info for run in iter_run_dirs(root) if (info := run.read_info())]
    if sync or warning:  # (skipped on the fast first read: ten thousand stats would delay the first paint)
        for doc in docs:
            run_dir = doc.get("run_dir")
            doc["_missing"] = bool(run_dir) and not os.path.isdir(run_dir)
    return RunsLoaded(docs, warning)


class RunsScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_filter", "filter", key_display="/"),
        Binding("f", "cycle_status", "status"),
        Binding("o", "sort", "sort"),
        Binding("s", "stop", "stop"),
        Binding("r", "resume", "resume"),
        Binding("e", "relaunch", "relaunch"),
        Binding("t", "tag", "tag"),
        Binding("n", "note", "note"),
        Binding("d", "delete", "delete"),
        Binding("c", "compare", "compare"),
        Binding("x", "diff", "diff"),
        Binding("ctrl+r", "reload", "reload", key_display="^r"),
        Binding("escape", "focus_table", "table", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.docs: list[dict[str, Any]] = []
        self.hay: dict[str, str] = {}
        self.warning: str | None = None
        self.loaded = False
        self.syncing = False
        self.painted = threading.Event()
        self.store_mtime: int | None = None

    def compose(self) -> ComposeResult:
        yield Static("kdtui · runs · loading...", id="runs-title", classes="title")
        yield Input(placeholder=HELP, id="runs-filter", compact=True)
        yield RunsTable(id="runs-table")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.app.runs_screen = self  # type: ignore[attr-defined]
        self.table.empty_text = "loading..."
        self.table.focus()
        self.reload(sync=True)
        self.set_interval(REFRESH_S, self._tick)

    @property
    def table(self) -> RunsTable:
        return self.query_one(RunsTable)

    @property
    def root(self) -> Path:
        return self.app.runs_dir  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- loading
    def reload(self, sync: bool = False) -> None:
        self._load(sync)

    @work(thread=True, exclusive=True, group="load")
    def _load(self, sync: bool) -> None:
        """First the store as it is (fast first paint), then, if asked, reconciled with the run folders."""
        self.store_mtime = self._store_mtime()
        first = load_docs(self.root, sync=False)
        first.syncing = sync
        self.painted.clear()
        self.post_message(first)
        if sync:
            self.painted.wait(timeout=2.0)  # let the UI thread paint before the sync competes for the GIL
            self.post_message(load_docs(self.root, sync=True))
            self.store_mtime = self._store_mtime()

    def _store_mtime(self) -> int | None:
        try:
            return os.stat(self.root / "kdtui.json").st_mtime_ns
        except OSError:
            return None

    def on_runs_loaded(self, message: RunsLoaded) -> None:
        self.docs, self.warning, self.loaded, self.syncing = message.docs, message.warning, True, message.syncing
        self.hay = {}
        self.apply_view()
        self.call_after_refresh(self.painted.set)

    def _tick(self) -> None:
        self.app.reap()  # type: ignore[attr-defined]
        if self.loaded:
            self._refresh_active([dict(d) for d in self.docs if d.get("status") in ACTIVE and not d.get("_missing")])

    @work(thread=True, exclusive=True, group="refresh")
    def _refresh_active(self, docs: list[dict[str, Any]]) -> None:
        """Running and queued runs change under us: read their run.json; reload if the store changed."""
        if self._store_mtime() != self.store_mtime:
            self.store_mtime = self._store_mtime()
            self.post_message(load_docs(self.root, sync=False))
            return
        infos = {}
        for doc in docs:
            info = RunDir(Path(str(doc.get("run_dir")))).read_info()
            if info:
                infos[doc["id"]] = info
        if infos:
            self.post_message(RunsRefreshed(infos))

    def on_runs_refreshed(self, message: RunsRefreshed) -> None:
        for doc in self.docs:
            info = message.infos.get(doc.get("id"))
            if info:
                doc.update({k: v for k, v in info.items() if k not in ("tags", "note")})
        self.apply_view()

    # ---------------------------------------------------------------- view
    def apply_view(self) -> None:
        filters, words = parse_query(self.query_one("#runs-filter", Input).value)
        shown = [d for d in self.docs if matches(d, filters, words, self._hay(d))] if filters or words else self.docs
        table = self.table
        shown = sort_docs(shown, table.sort_key, table.descending)
        if self.loaded:
            table.empty_text = ("no runs match the filter" if self.docs else
                                "no runs yet: press 2 for recipes, pick one, Enter to launch")
        table.marked &= {d.get("id") for d in self.docs}
        table.set_rows(shown)
        self.show_title()

    def show_title(self) -> None:
        table = self.table
        title = Text.assemble(("kdtui · runs ", "bold"),
                              f"· {len(table.rows):,} shown of {len(self.docs):,} · sort {table.sort_key}"
                              + (f" · {len(table.marked)} marked" if table.marked else ""))
        if self.syncing:
            title.append(" · syncing with the run folders...", style="italic")
        if self.warning:
            title.append(f" · {self.warning}", style="bold red")
        self.query_one("#runs-title", Static).update(title)

    @on(RunsTable.Highlighted)
    def _highlighted(self) -> None:
        self.show_title()

    def _hay(self, doc: dict[str, Any]) -> str:
        key = doc.get("id", "")
        if key not in self.hay:
            self.hay[key] = haystack(doc)
        return self.hay[key]

    @on(Input.Changed, "#runs-filter")
    def _filter_changed(self) -> None:
        self.apply_view()

    @on(Input.Submitted, "#runs-filter")
    def action_focus_table(self) -> None:
        self.table.focus()

    @on(RunsTable.Opened)
    def _open(self, event: RunsTable.Opened) -> None:
        self.app.open_run(event.doc)  # type: ignore[attr-defined]

    @on(RunsTable.SortRequested)
    def _sort_clicked(self, event: RunsTable.SortRequested) -> None:
        table = self.table
        if table.sort_key == event.key:
            table.descending = not table.descending
        else:
            table.sort_key, table.descending = event.key, event.key not in TEXT_SORTED
        self.apply_view()

    def action_focus_filter(self) -> None:
        self.query_one("#runs-filter", Input).focus()

    def action_cycle_status(self) -> None:
        field = self.query_one("#runs-filter", Input)
        filters, _ = parse_query(field.value)
        now = filters.get("status", "")
        after = STATUS_CYCLE[(STATUS_CYCLE.index(now) + 1) % len(STATUS_CYCLE)] if now in STATUS_CYCLE else ""
        kept = [t for t in field.value.split() if not t.lower().startswith("status:")]
        field.value = " ".join(([f"status:{after}"] if after else []) + kept)

    def action_sort(self) -> None:
        """Cycle: each column descending, then ascending, then the next column."""
        table = self.table
        first_descending = table.sort_key not in TEXT_SORTED  # numbers and times: largest first
        if table.descending == first_descending:  # still the first direction: flip it
            table.descending = not table.descending
        else:
            keys = table.visible_keys()
            after = keys.index(table.sort_key) + 1 if table.sort_key in keys else 0
            table.sort_key = keys[after % len(keys)]
            table.descending = table.sort_key not in TEXT_SORTED
        self.apply_view()

    def action_reload(self) -> None:
        self.reload(sync=True)

    def _selected(self) -> list[dict[str, Any]]:
        selected = self.table.selected()
        if not selected:
            self.notify("no run selected", severity="warning")
        return selected

    def action_stop(self) -> None:
        if docs := self._selected():
            self.app.run_action_on(docs, "stop")  # type: ignore[attr-defined]

    def action_resume(self) -> None:
        if docs := self._selected():
            self.app.run_action_on(docs, "resume")  # type: ignore[attr-defined]

    def action_relaunch(self) -> None:
        if docs := self._selected():
            self.app.relaunch(docs[0])  # type: ignore[attr-defined]

    def action_tag(self) -> None:
        if docs := self._selected():
            self.app.edit_tags(docs)  # type: ignore[attr-defined]

    def action_note(self) -> None:
        if docs := self._selected():
            self.app.edit_note(docs[0])  # type: ignore[attr-defined]

    def action_delete(self) -> None:
        if docs := self._selected():
            self.app.delete_runs(docs)  # type: ignore[attr-defined]

    def action_compare(self) -> None:
        docs = self._selected()
        if len(docs) < 2:
            self.notify("mark two or more runs with space, then press c", severity="warning")
            return
        self.app.open_compare(docs)  # type: ignore[attr-defined]

    def action_diff(self) -> None:
        if docs := self._selected():
            self.app.open_diff(docs[:2])  # type: ignore[attr-defined]
