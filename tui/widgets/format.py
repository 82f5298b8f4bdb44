"""Short, fixed-width text for run fields: shared by the runs table, run view, compare and CLI.

`now` is a module attribute so snapshot tests can freeze the clock.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from engine.rundir import effective_status

now = time.time


def status_of(doc: dict[str, Any]) -> str:
    """The status to show: a dead `running` pid reads `interrupted`; a vanished folder `missing`."""
    if doc.get("_missing"):
        return "missing"
    return effective_status(doc) if doc else "missing"


def duration_s(doc: dict[str, Any]) -> float | None:
    started = doc.get("started")
    if not isinstance(started, int | float):
        return None
    ended = doc.get("ended")
    if not isinstance(ended, int | float):
        ended = now() if status_of(doc) == "running" else None
    return None if ended is None else max(0.0, ended - started)


def fmt_duration(seconds: float | None) -> str:
    """6 characters at most: 42s, 12m05s, 3h07m, 2d03h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_time(stamp: Any) -> str:
    """Local 'MM-DD HH:MM' (11 characters) or '-'."""
    if not isinstance(stamp, int | float):
        return "-"
    return time.strftime("%m-%d %H:%M", time.localtime(stamp))


def fmt_pct(value: Any, digits: int = 1) -> str:
    """A fraction 0..1 as a percentage without the sign: 0.7326 -> '73.3'."""
    return f"{value * 100:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def fmt_num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value) if value is not None else "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def progress(doc: dict[str, Any]) -> tuple[int, int]:
    epoch, epochs = doc.get("epoch"), doc.get("epochs")
    return (epoch if isinstance(epoch, int) else 0, epochs if isinstance(epochs, int) else 0)


def fmt_progress(doc: dict[str, Any]) -> str:
    done, total = progress(doc)
    return f"{done}/{total}" if total else (str(done) if done else "-")


def best_metric(doc: dict[str, Any], key: str = "val.top1") -> float | None:
    """best['val.top1'], falling back to test when a recipe has no validation split."""
    best = doc.get("best") or {}
    if not isinstance(best, dict):
        return None
    value = best.get(key)
    if value is None and key.startswith("val."):
        value = best.get("test." + key[4:])
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def short(text: Any, width: int) -> str:
    """Cut to `width` cells with an ellipsis; control characters become spaces."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(text if text is not None else ""))
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def shown_path(path: str | Path) -> str:
    """A path relative to the working directory when it is under it: short, and the same on every machine."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def error_line(err: Exception) -> str:
    """One line for an error; a RecipeError names its file relative to the working directory."""
    file, key, message = (getattr(err, name, None) for name in ("file", "key", "message"))
    if isinstance(file, str) and isinstance(message, str):
        where = shown_path(file) if Path(file).exists() else file
        return f"{where}: {key}: {message}" if key else f"{where}: {message}"
    return str(err) or type(err).__name__
