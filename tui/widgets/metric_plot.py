"""A live line plot of one metric: textual-plotext with its own `plt` (no global plotext state)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import RenderResult
from textual.reactive import reactive
from textual_plotext import PlotextPlot

from tui.widgets.series import decimate, positive

# plain ANSI names: they stay distinct in 256-colour terminals and inside tmux
COLORS = ("blue", "red", "green", "orange", "magenta", "cyan", "yellow", "gray")


@dataclass
class Line:
    label: str
    xs: list[float]
    ys: list[float]


class MetricPlot(PlotextPlot):
    """Set `lines` (and `log_y`); the figure is rebuilt lazily at the next paint."""

    log_y: reactive[bool] = reactive(False)

    def __init__(self, title: str, *, log_capable: bool = True, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.title = title
        self.log_capable = log_capable
        self.lines: list[Line] = []
        self.painted_points = 0  # points in the last built figure (tests and the bench read these)
        self.painted_x = float("-inf")  # the largest x painted
        self.paints = 0

    def set_lines(self, lines: list[Line]) -> None:
        self.lines = lines
        self.refresh()

    def watch_log_y(self) -> None:
        self.refresh()

    def render(self) -> RenderResult:
        plt = self.plt
        plt.clear_figure()
        log = self.log_y and self.log_capable
        limit = max(2 * self.size.width, 50)
        painted, right = 0, float("-inf")
        for index, line in enumerate(self.lines):
            xs, ys = positive(line.xs, line.ys) if log else (line.xs, line.ys)
            xs, ys = decimate(xs, ys, limit)
            if xs:
                plt.plot(xs, ys, label=line.label, color=COLORS[index % len(COLORS)])
                painted, right = painted + len(xs), max(right, xs[-1])
        if log:
            plt.yscale("log")
        plt.title(self.title + (" (log)" if log else "") + ("" if painted else " - no data yet"))
        plt.xlabel("epoch")
        self.painted_points, self.painted_x, self.paints = painted, right, self.paints + 1
        return super().render()
