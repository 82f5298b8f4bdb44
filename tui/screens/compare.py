"""Compare: the curves of several runs overlaid, and a table of only the parameters that differ."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Static

from tui.messages import RunsTailed
from tui.widgets.format import best_metric, fmt_num, fmt_pct, fmt_progress, short, status_of
from tui.widgets.key_footer import KeyFooter
from tui.widgets.metric_plot import Line, MetricPlot
from tui.widgets.series import Curves
from tui.workers import UpdateBuffer, follow_runs

METRICS = (  # split, metric, title, percent
    ("val", "top1", "val top-1 %", True),
    ("val", "loss", "val loss", False),
    ("train", "loss", "train loss", False),
    ("val", "top5", "val top-5 %", True),
    ("train", "top1", "train top-1 %", True),
    ("train", "lr", "learning rate", False),
)
IGNORED = {"run.name", "run.note", "run.tags"}


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_params(doc: dict[str, Any]) -> dict[str, Any]:
    """The resolved recipe of a run as dotted keys; the store's `params` when the file is gone."""
    path = Path(str(doc.get("run_dir") or "")) / "recipe.toml"
    try:
        return flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        params = doc.get("params")
        return dict(params) if isinstance(params, dict) else {}


def differing(params: list[dict[str, Any]]) -> list[str]:
    """Dotted keys whose values are not the same in every run (missing counts as different)."""
    keys = sorted({key for p in params for key in p} - IGNORED)
    missing = object()
    return [key for key in keys if len({repr(p.get(key, missing)) for p in params}) > 1]


class CompareScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "back", key_display="esc"),
        Binding("m", "metric(1)", "metric"),
        Binding("M", "metric(-1)", "prev metric", show=False),
        Binding("l", "log_scale", "log scale"),
        Binding("x", "diff", "diff"),
    ]

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        super().__init__()
        self.docs = docs
        self.curves = {doc["id"]: Curves() for doc in docs}
        self.infos = {doc["id"]: dict(doc) for doc in docs}
        self.metric = 0
        self.buffer = UpdateBuffer()

    def compose(self) -> ComposeResult:
        yield Static(id="compare-title", classes="title")
        yield MetricPlot(METRICS[0][2], id="compare-plot")
        yield DataTable(id="compare-table", cursor_type="row", zebra_stripes=True)
        yield KeyFooter()

    def on_mount(self) -> None:
        self._title()
        self._load_params()
        self._tail()

    @work(thread=True, exclusive=True, group="tail")
    def _tail(self) -> None:
        follow_runs(self, self.buffer, [Path(str(doc.get("run_dir") or "")) for doc in self.docs])

    @work(thread=True, group="params")
    def _load_params(self) -> None:
        params = [read_params(doc) for doc in self.docs]
        self.app.call_from_thread(self._fill_table, params)

    def _fill_table(self, params: list[dict[str, Any]]) -> None:
        if not self.is_attached:  # a worker finishing after the screen closed
            return
        self.params = params
        table = self.query_one(DataTable)
        table.clear(columns=True)
        keys = differing(params)
        table.add_columns("run", "status", "epoch", "best top1", "best loss", *keys)
        for doc, values in zip(self.docs, params, strict=True):
            info = self.infos[doc["id"]]
            table.add_row(
                short(info.get("name") or doc["id"], 28), status_of(info), fmt_progress(info),
                fmt_pct(best_metric(info)), fmt_num(best_metric(info, "val.loss")),
                *(Text(short(fmt_num(values.get(key, "-")), 24)) for key in keys), key=doc["id"],
            )
        if not keys:
            self.notify("the runs' recipes are identical (apart from names)", timeout=4)

    def on_runs_tailed(self, message: RunsTailed) -> None:
        message.stop()
        changed_info = False
        for update in self.buffer.drain():
            curves = self.curves[update.run_id] = Curves() if update.reset else self.curves[update.run_id]
            if update.info is not None:
                self.infos[update.run_id].update(update.info)
                changed_info = True
            curves.set_steps_per_epoch(self.infos[update.run_id].get("steps_per_epoch"))
            curves.add(update.events)
        self._replot()
        if changed_info and hasattr(self, "params"):
            self._fill_table(self.params)

    def _replot(self) -> None:
        split, metric, title, percent = METRICS[self.metric]
        lines = []
        for doc in self.docs:
            xs, ys = self.curves[doc["id"]].get(split, metric)
            name = short(self.infos[doc["id"]].get("name") or doc["id"], 24)
            lines.append(Line(name, xs, [y * 100 for y in ys] if percent else ys))
        plot = self.query_one(MetricPlot)
        plot.title = title
        plot.log_capable = not percent
        plot.set_lines(lines)

    def _title(self) -> None:
        title = METRICS[self.metric][2]
        self.query_one("#compare-title", Static).update(
            Text.assemble(("kdtui · compare ", "bold"), f"{len(self.docs)} runs · {title}"))

    def action_metric(self, step: int) -> None:
        self.metric = (self.metric + step) % len(METRICS)
        self._title()
        self._replot()

    def action_log_scale(self) -> None:
        plot = self.query_one(MetricPlot)
        plot.log_y = not plot.log_y

    def action_diff(self) -> None:
        self.app.open_diff([self.infos[doc["id"]] for doc in self.docs])  # type: ignore[attr-defined]
