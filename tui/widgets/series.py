"""Metric events -> plottable curves. Textual-free: the TUI plots and `kdtui plot` share it.

x is in epochs so runs with different batch sizes line up: a train step event sits at
step / steps_per_epoch, an evaluation at its (completed) epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

METRICS = ("loss", "top1", "top5", "lr")
SPLITS = ("train", "val", "test")


@dataclass
class Curves:
    """All curves of one run, grown incrementally as events arrive."""

    steps_per_epoch: int | None = None
    points: dict[tuple[str, str], tuple[list[float], list[float]]] = field(default_factory=dict)
    pending: list[dict[str, Any]] = field(default_factory=list)  # train steps waiting for steps_per_epoch
    last: dict[str, dict[str, Any]] = field(default_factory=dict)  # newest event per split
    count: int = 0

    def add(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.count += 1
            split = event.get("split")
            if not isinstance(split, str):
                continue
            self.last[split] = event
            if split == "train" and event.get("kind", "step") != "step":
                if self.steps_per_epoch is None and _int(event.get("epoch")) and _int(event.get("step")):
                    self.set_steps_per_epoch(max(1, event["step"] // event["epoch"]))
                continue
            if split == "train" and self.steps_per_epoch is None:
                self.pending.append(event)
                continue
            self._add_one(split, event)

    def set_steps_per_epoch(self, steps: Any) -> None:
        """Known from run.json (or the first epoch event); places any train steps seen so far."""
        if self.steps_per_epoch is None and _int(steps) and steps > 0:
            self.steps_per_epoch = int(steps)
            waiting, self.pending = self.pending, []
            for event in waiting:
                self._add_one("train", event)

    def _add_one(self, split: str, event: dict[str, Any]) -> None:
        if split == "train":
            x = _num(event.get("step"))
            if x is None or not self.steps_per_epoch:
                return
            x /= self.steps_per_epoch
        else:
            x = _num(event.get("epoch"))
            if x is None:
                return
        for metric in METRICS:
            y = _num(event.get(metric))
            if y is not None:
                xs, ys = self.points.setdefault((split, metric), ([], []))
                xs.append(x)
                ys.append(y)

    def get(self, split: str, metric: str) -> tuple[list[float], list[float]]:
        if split == "train" and self.steps_per_epoch is None and self.pending:
            # no epoch length yet: plot against steps rather than show nothing
            pairs = [(_num(e.get("step")), _num(e.get(metric))) for e in self.pending]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            return [x for x, _ in pairs], [y for _, y in pairs]
        return self.points.get((split, metric), ([], []))


def curves_from(events: list[dict[str, Any]], steps_per_epoch: Any = None) -> Curves:
    curves = Curves()
    curves.set_steps_per_epoch(steps_per_epoch)
    curves.add(events)
    return curves


def decimate(xs: list[float], ys: list[float], limit: int) -> tuple[list[float], list[float]]:
    """At most `limit` points, evenly strided, always keeping the newest one."""
    if len(xs) <= limit or limit < 2:
        return xs, ys
    stride = math.ceil(len(xs) / (limit - 1))
    keep = [*range(0, len(xs) - 1, stride), len(xs) - 1]
    return [xs[i] for i in keep], [ys[i] for i in keep]


def positive(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Only points a log scale can show."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=False) if y > 0]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
