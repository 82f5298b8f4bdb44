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


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    text = message.replace("\n", "\\n").replace("\x1b", "\\x1b")
    print(f"kdtui: error: {text}", file=sys.stderr)
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
