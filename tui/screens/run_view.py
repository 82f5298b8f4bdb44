"""Run view: live curves, the tail of train.log, the resolved recipe and run.json, for one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, VerticalScroll
from textual.screen import Screen
from textual.widgets import Log, Static, TabbedContent, TabPane

from engine.rundir import RunDir
from tui.messages import RunsTailed
from tui.widgets.format import duration_s, fmt_duration, fmt_num, fmt_pct, fmt_progress, fmt_time, short, status_of
from tui.widgets.key_footer import KeyFooter
from tui.widgets.metric_plot import Line, MetricPlot
from tui.widgets.series import Curves
from tui.workers import UpdateBuffer, follow_runs

PLOTS = (  # id, title, metric, splits, as percent, log-scale capable
    ("plot-loss", "loss", "loss", ("train", "val"), False, True),
    ("plot-top1", "top-1 %", "top1", ("train", "val"), True, False),
    ("plot-top5", "top-5 %", "top5", ("train", "val"), True, False),
    ("plot-lr", "learning rate", "lr", ("train",), False, True),
)
TIME_FIELDS = ("created", "started", "ended")


def plot_lines(curves: Curves, metric: str, splits: tuple[str, ...], percent: bool) -> list[Line]:
    lines = []
    for split in splits:
        xs, ys = curves.get(split, metric)
        if xs:
            lines.append(Line(split, xs, [y * 100 for y in ys] if percent else ys))
    return lines


def status_line(info: dict[str, Any], curves: Curves, missing: bool) -> Text:
    """One line: what a glance at a training run needs."""
    name = info.get("name") or info.get("id", "?")
    if missing:
        return Text.assemble((f"{name}  ", "bold"), ("run directory missing: ", "bold red"), str(info.get("run_dir")))
    status = status_of(info)
    train = curves.last.get("train", {})
    epoch = train.get("epoch") if status == "running" and isinstance(train.get("epoch"), int) else None
    parts: list[str] = [f"epoch {epoch}/{info.get('epochs', '?')}" if epoch else f"epoch {fmt_progress(info)}"]
    if "step" in train:
        parts.append(f"step {train['step']}")
    if isinstance(train.get("loss"), int | float):
        parts.append(f"loss {train['loss']:.3f}")
    val = curves.last.get("val") or curves.last.get("test") or {}
    if isinstance(val.get("top1"), int | float):
        parts.append(f"val top1 {fmt_pct(val['top1'])}%")
    best = (info.get("best") or {}).get("val.top1")
    if isinstance(best, int | float):
        parts.append(f"best {fmt_pct(best)}%")
    if isinstance(train.get("images_per_s"), int | float):
        parts.append(f"{train['images_per_s']:.0f} img/s")
    style = {"running": "bold green", "failed": "bold red", "interrupted": "bold yellow"}.get(status, "bold")
    text = Text.assemble((f"{short(name, 40)}  ", "bold"), (status, style), "  " + " · ".join(parts))
    if info.get("error"):
        text.append(f"  error: {info['error']}", style="red")
    return text


def info_table(info: dict[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key in sorted(info):
        value = info[key]
        if isinstance(value, dict):
            for sub in sorted(value):
                shown = fmt_pct(value[sub]) + " %" if str(sub).endswith(("top1", "top5")) else fmt_num(value[sub])
                table.add_row(f"{key}.{sub}", shown)
        elif isinstance(value, list):
            table.add_row(key, ", ".join(map(str, value)))
        else:
            table.add_row(key, fmt_time(value) if key in TIME_FIELDS else fmt_num(value))
    table.add_row("duration", fmt_duration(duration_s(info)))
    return table


class RunViewScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "back", key_display="esc"),
        Binding("p", "tab('curves')", "plots"),
        Binding("o", "tab('log')", "train.log"),
        Binding("v", "tab('recipe')", "recipe"),
        Binding("i", "tab('info')", "info"),
        Binding("l", "log_scale", "log scale"),
        Binding("s", "stop", "stop"),
        Binding("r", "resume", "resume"),
        Binding("e", "relaunch", "relaunch"),
        Binding("x", "diff", "diff"),
    ]

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__()
        self.doc = doc
        self.run = RunDir(Path(str(doc.get("run_dir") or "")))
        self.info: dict[str, Any] = dict(doc)
        self.curves = Curves()
        self.missing = False
        self.recipe_loaded = False
        self.buffer = UpdateBuffer()

    def compose(self) -> ComposeResult:
        yield Static(status_line(self.info, self.curves, False), id="run-status", classes="title")
        with TabbedContent(id="run-tabs"):
            with TabPane("curves", id="curves"), Grid(id="plots"):
                for plot_id, title, _, _, _, log_capable in PLOTS:
                    yield MetricPlot(title, log_capable=log_capable, id=plot_id)
            with TabPane("train.log", id="log"):
                yield Log(max_lines=2000, id="run-log")
            with TabPane("recipe", id="recipe"), VerticalScroll():
                yield Static(id="run-recipe")
            with TabPane("info", id="info"), VerticalScroll():
                yield Static(id="run-info")
        yield KeyFooter()

    def on_mount(self) -> None:
        self._load_recipe()
        self._tail()
        self.call_after_refresh(self._show_info)  # the tab panes mount after this screen

    @work(thread=True, exclusive=True, group="tail")
    def _tail(self) -> None:
        follow_runs(self, self.buffer, [self.run.path])

    @work(thread=True, group="recipe")
    def _load_recipe(self) -> None:
        try:
            text = self.run.recipe_path.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            text = f"# cannot read {self.run.recipe_path}: {err.strerror or err}"
        self.app.call_from_thread(self._show_recipe, text)

    def _show_recipe(self, text: str) -> None:
        if not self.is_attached:  # a worker finishing after the screen closed
            return
        if not self.query("#run-recipe"):  # the tab panes are not mounted yet
            self.call_after_refresh(self._show_recipe, text)
            return
        syntax = Syntax(text, "toml", theme="ansi_dark", line_numbers=True)
        self.query_one("#run-recipe", Static).update(syntax)
        self.recipe_loaded = True

    def on_runs_tailed(self, message: RunsTailed) -> None:
        message.stop()
        if not self.query("#plot-loss"):  # the tab panes are not mounted yet: come back after a refresh
            self.call_after_refresh(self.post_message, RunsTailed())
            return
        for update in self.buffer.drain():
            if update.missing != self.missing:
                self.missing = update.missing
            if update.reset:
                self.curves = Curves()
            if update.info is not None:
                self.info = {**self.info, **update.info}
            self.curves.set_steps_per_epoch(self.info.get("steps_per_epoch"))
            self.curves.add(update.events)
            if update.log_lines:
                self.query_one("#run-log", Log).write_lines(update.log_lines)
            if update.events or update.reset:
                self._replot()
        self._show_info()

    def _replot(self) -> None:
        for plot_id, _, metric, splits, percent, _ in PLOTS:
            self.query_one(f"#{plot_id}", MetricPlot).set_lines(plot_lines(self.curves, metric, splits, percent))

    def _show_info(self) -> None:
        self.query_one("#run-status", Static).update(status_line(self.info, self.curves, self.missing))
        for info in self.query("#run-info").results(Static):
            info.update(info_table(self.info))

    # ---------------------------------------------------------------- actions
    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_log_scale(self) -> None:
        for plot in self.query(MetricPlot):
            plot.log_y = not plot.log_y

    def action_stop(self) -> None:
        self.app.run_action_on([self.info], "stop")  # type: ignore[attr-defined]

    def action_resume(self) -> None:
        self.app.run_action_on([self.info], "resume")  # type: ignore[attr-defined]

    def action_relaunch(self) -> None:
        self.app.relaunch(self.info)  # type: ignore[attr-defined]

    def action_diff(self) -> None:
        self.app.open_diff([self.info])  # type: ignore[attr-defined]
