"""`kdtui`: the command line. Commands live in tui/commands/*; this file only wires them.

Import hygiene: `kdtui --help` must not import torch or textual (tests check sys.modules),
so command modules import heavy libraries inside their bodies.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="kdtui",
    help="Terminal experiment manager for image-classification training (KD, SSL, semi-supervised).",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """With no command, open the full-screen app."""
    if ctx.invoked_subcommand is None:
        from tui.app import run_app

        run_app()


# Each module registers its commands on `app` when imported; all are torch-free at import.
from tui.commands import bench, core, diff, plot, runs, slurm  # noqa: E402

COMMAND_MODULES = (bench, core, diff, plot, runs, slurm)


def main() -> None:
    app()
