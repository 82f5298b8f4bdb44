"""`kdtui`: the command line. Commands live in tui/commands/*; this file only wires them.

`kdtui --help` must be quick and must not import torch or textual (tests check sys.modules),
so command modules are imported only when their command runs: `COMMANDS` below names each
command's module and one-line help, which is all `--help` prints. A test checks the table
against the commands the modules really register, so it cannot drift.
"""

from __future__ import annotations

import importlib
import textwrap
from typing import Any

import typer
from typer.core import TyperGroup

# Each command module, and the commands it registers on `app` with the short help `kdtui --help` shows.
_MODULES: dict[str, dict[str, str]] = {
    "tui.commands.run": {
        "run": "Run a recipe: every sweep point, dealt over the devices, one job per device at a time.",
        "resume": "Continue an interrupted or failed run from its checkpoints/last.pt (on the same device).",
    },
    "tui.commands.core": {
        "check": "Validate recipes without running anything (exit 0, or one line per error and exit 2).",
        "eval": "Loss, top-1 and top-5 of a checkpoint on a split of its data set.",
        "summary": "Every layer's name, output size and parameters, and the total.",
    },
    "tui.commands.runs": {
        "runs": "List runs: filter, sort by a metric, export as JSON or CSV.",
        "show": "One run: status, timings, best and last metrics, and its recipe values.",
        "stop": "SIGTERM a run's process group: it finishes its step, writes last.pt and becomes interrupted.",
        "relaunch": "A new run from a run's resolved recipe, with --set edits (and its device unless --device).",
        "tag": "Add (or --remove) a tag; `kdtui runs --tag TAG` filters by it.",
        "note": "Attach a free-text note to a run (replaces the previous note).",
        "rm": "Remove a run from the history and delete its folder (not while it is queued or running).",
        "tensorboard": ("TensorBoard over the runs' tb/ folders, bound to 127.0.0.1; prints the port to forward "
                        "over SSH."),
    },
    "tui.commands.plot": {
        "plot": "Print the curves of one or more runs, overlaid (several runs = one line each).",
        "watch": "Redraw train loss and val top-1 as the run trains, until it ends or Ctrl-C (the run keeps going).",
    },
    "tui.commands.diff": {
        "diff": "Compare two checkpoints on one split: accuracies, agreement and the images they disagree on.",
    },
    "tui.commands.bench": {
        "devices": "List this machine's devices: CPU cores and RAM, each CUDA GPU's name and memory.",
        "bench": "Benchmarks: `kdtui bench devices RECIPE --device ...`.",
    },
    "tui.commands.slurm": {
        "slurm": "Write (and optionally submit) one SLURM job array, a task per sweep point; prints the script path.",
    },
}
# name -> (module, short help)
COMMANDS: dict[str, tuple[str, str]] = {
    name: (module, short_help) for module, commands in _MODULES.items() for name, short_help in commands.items()
}


class LazyGroup(TyperGroup):
    """A Typer group that imports a command's module the first time that command is asked for."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            importlib.import_module(COMMANDS[cmd_name][0])
            self.commands.update(_built_commands())
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """The command list from the table: listing must not import the modules."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, textwrap.shorten(short_help, max(limit, 20), placeholder="..."))
                for name, (_, short_help) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in COMMANDS:  # a typo: load everything so "Did you mean ...?" sees every name
            for module in {module for module, _ in COMMANDS.values()}:
                importlib.import_module(module)
            self.commands.update(_built_commands())
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="kdtui",
    cls=LazyGroup,
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


def _built_commands() -> dict[str, Any]:
    """Click commands for everything the imported command modules registered on `app` so far."""
    from typer.main import get_group

    return dict(get_group(app).commands)


def main() -> None:
    app()
