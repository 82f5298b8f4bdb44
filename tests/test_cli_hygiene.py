"""`kdtui --help` stays fast: it must not import torch, textual or tensorboard."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

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
print(json.dumps({"heavy": heavy, "help": buf.getvalue()}))
"""


def test_help_imports_no_heavy_modules() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    for command in ("run", "check", "eval", "summary", "resume"):
        assert command in result["help"]


def test_every_subcommand_help_is_light() -> None:
    probe = PROBE.replace('app(["--help"])', 'app([sys.argv[1], "--help"])')
    for command in ("run", "eval", "summary"):
        out = subprocess.run([sys.executable, "-c", probe, command], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1])["heavy"] == [], command
