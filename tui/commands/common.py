"""Shared CLI plumbing: the runs-dir option and one-line errors with exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from engine.data.errors import DataError
from engine.errors import UserError
from engine.rundir import runs_root

F = TypeVar("F", bound=Callable[..., Any])

RunsDir = Annotated[
    Path | None,
    typer.Option("--runs-dir", envvar="KDTUI_RUNS_DIR", help="Runs root (default ./runs).", show_default=False),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe value: SECTION.KEY=VALUE (repeatable)."),
]


def plain(text: object) -> str:
    """User-given text (run names, tags, notes, errors) made safe for a terminal: control and format
    characters (ESC, newlines, NUL, bidi overrides) are shown escaped, so a run name cannot move the
    cursor, recolour the screen or fake extra lines."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def plain_doc(value: Any) -> Any:
    """`plain` applied to every string in a run document (keys and values), for text output."""
    if isinstance(value, str):
        return plain(value)
    if isinstance(value, dict):
        return {plain(k): plain_doc(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_doc(v) for v in value]
    return value


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    print(f"kdtui: error: {plain(message)}", file=sys.stderr)
    return typer.Exit(code)


def user_errors(func: F) -> F:
    """Turn any UserError/DataError into its one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (UserError, DataError) as err:
            raise fail(str(err)) from None

    return wrapper  # type: ignore[return-value]


def root(runs_dir: Path | None) -> Path:
    return runs_root(runs_dir)
