"""`kdtui --help` stays fast: it must not import torch, textual or tensorboard."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

from typer.main import get_command_name, get_group

from tests.conftest import ROOT
from tui.cli import COMMANDS, app

PROBE = """
import json, sys, io, contextlib
from tui.cli import app
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        app(["--help"])
    except SystemExit:
        pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "torchvision", "textual", "tensorboard"})
commands = sorted(m for m in sys.modules if m.startswith("tui.commands."))
print(json.dumps({"heavy": heavy, "commands": commands, "help": buf.getvalue()}))
"""


def test_help_imports_no_heavy_modules() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["commands"] == []  # the list comes from tui.cli.COMMANDS; no command module is loaded
    for command in COMMANDS:
        assert f"  {command} " in result["help"]


def test_command_table_matches_what_the_modules_register() -> None:
    """`kdtui --help` prints COMMANDS without importing the modules: names, modules and help must be theirs."""
    for module in {module for module, _ in COMMANDS.values()}:
        importlib.import_module(module)
    registered = {info.name or get_command_name(info.callback.__name__): info.callback.__module__
                  for info in app.registered_commands}
    registered |= {group.name: group.typer_instance.registered_commands[0].callback.__module__
                   for group in app.registered_groups}
    assert registered == {name: module for name, (module, _) in COMMANDS.items()}
    for name, command in get_group(app).commands.items():
        assert command.get_short_help_str(limit=500) == COMMANDS[name][1], name


def test_a_typo_suggests_commands_from_every_module() -> None:
    code = subprocess.run([sys.executable, "-m", "tui", "sumary"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert code.returncode == 2 and "Did you mean 'summary'?" in code.stderr


def test_every_subcommand_help_is_light() -> None:
    probe = PROBE.replace('app(["--help"])', 'app([sys.argv[1], "--help"])')
    for command in ("run", "eval", "summary"):
        out = subprocess.run([sys.executable, "-c", probe, command], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1])["heavy"] == [], command
