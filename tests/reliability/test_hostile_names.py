"""Hostile names: run names, tags, notes and `--set` values made of path tricks and terminal tricks.

`../`, absolute paths, NUL, newlines, ANSI escapes, Rich/Textual markup, bidi overrides, shell
syntax and 10,000 characters. They must never place a file outside the runs root, must come back
unchanged from `kdtui runs --json` and `--csv` (where text a spreadsheet would run as a formula gets
a leading quote, and nothing else changes), must not reach the terminal raw through the text
outputs (`kdtui runs`, `kdtui show`), and must not break the TUI's runs table or run view.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from engine.recipe import RecipeError
from engine.rundir import RunDir
from tests.conftest import ROOT, TINY_RECIPE
from tui.launcher import create_runs, prepare

LONG = "L" * 10_000
ID = re.compile(r"^\d{8}-\d{6}-[A-Za-z0-9_.=+-]{1,40}-[0-9a-f]{4}$")


def hostile(outside: Path) -> dict[str, str]:
    return {
        "dotdot": "../../../outside/dotdot",
        "absolute": str(outside / "absolute"),
        "nul": "nul\x00byte",
        "newlines": "two\nlines\r\nthree",
        "ansi": "\x1b[31mred\x1b[0m\x1b]0;pwned\x07\x1b[2J",
        "markup": "[bold red]x[/] [@click=app.quit]click[/]",
        "bidi": "safe\u202etxt.exe",
        "shell": "$(touch pwned); `touch pwned2`",
        "csv": '=HYPERLINK("x"),"quoted",comma;semi',
        "unicode": "名前 🚀 ñ",
    }


def cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from tui.cli import app

    return CliRunner().invoke(app, list(args))


def tree(folder: Path, skip: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if skip not in p.parents and p != skip}


def terminal_safe(text: str) -> bool:
    """Only printable characters and newlines: nothing that moves the cursor or recolours the terminal."""
    return all(ch.isprintable() or ch == "\n" for ch in text)


@pytest.fixture
def hostile_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, RunDir], dict[str, str]]:
    """One run per hostile name (with every hostile string as a tag, and its name as the note)."""
    cwd, root, outside = tmp_path / "cwd", tmp_path / "a" / "b" / "runs", tmp_path / "outside"
    cwd.mkdir()
    root.parent.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    names = hostile(outside)
    before = tree(tmp_path, root)
    runs = {}
    for key, name in names.items():
        data = tomllib.loads(TINY_RECIPE)
        data["run"].update(name=name, tags=[*names.values(), LONG], note=name)
        recipe = cwd / f"{key}.toml"
        recipe.write_text(tomli_w.dumps(data))
        before.add(recipe)
        runs[key] = create_runs(prepare(recipe, None, root), root)[0]
    assert tree(tmp_path, root) == before  # nothing appeared outside the runs root (or in the cwd)
    assert not outside.exists()
    return root, runs, names


def test_names_never_leave_the_runs_root(hostile_runs: tuple[Path, dict[str, RunDir], dict[str, str]]) -> None:
    root, runs, names = hostile_runs
    for key, run in runs.items():
        assert run.path.parent == root and ID.match(run.id), run.id
        info = json.loads(run.info_path.read_text())
        assert info["name"] == names[key] and info["note"] == names[key]  # stored exactly, not mangled
        assert tomllib.loads(run.recipe_path.read_text())["run"]["name"] == names[key]
    assert sorted(p.name for p in root.iterdir()) == sorted(r.id for r in runs.values())


def test_ten_thousand_character_name_is_one_line(tmp_path: Path) -> None:
    data = tomllib.loads(TINY_RECIPE)
    data["run"]["name"] = LONG
    recipe = tmp_path / "long.toml"
    recipe.write_text(tomli_w.dumps(data))
    with pytest.raises(RecipeError) as caught:
        prepare(recipe, None, tmp_path / "runs")
    assert "run.name" in str(caught.value) and len(str(caught.value)) <= 400
    result = cli("run", str(recipe), "--set", f"run.note={LONG}", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def as_csv(text: str) -> str:
    """What `kdtui runs --csv` writes for a text: formula-like text (=, +, -, @, tab, CR first) quoted."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def test_json_and_csv_exports_parse_back(hostile_runs: tuple[Path, dict[str, RunDir], dict[str, str]]) -> None:
    root, runs, names = hostile_runs
    by_id = {run.id: key for key, run in runs.items()}
    result = cli("runs", "--json", "--runs-dir", str(root))
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    assert len(docs) == len(runs)
    for doc in docs:
        key = by_id[doc["id"]]
        assert doc["name"] == names[key] and doc["note"] == names[key]
        assert doc["tags"] == [*names.values(), LONG]
    result = cli("runs", "--csv", "--runs-dir", str(root))  # bytes: the runner's .stdout folds \r\n into \n
    rows = list(csv.DictReader(io.StringIO(result.stdout_bytes.decode(), newline="")))
    assert len(rows) == len(runs)
    for row in rows:
        assert row["name"] == as_csv(names[by_id[row["id"]]]) and row["note"] == as_csv(names[by_id[row["id"]]])
        assert row["tags"] == as_csv(";".join([*names.values(), LONG]))
    found = json.loads(cli("runs", "--json", "--grep", "red", "--runs-dir", str(root)).stdout)
    assert runs["ansi"].id in {d["id"] for d in found}


def test_real_cli_exports(hostile_runs: tuple[Path, dict[str, RunDir], dict[str, str]]) -> None:
    """Through a real process (real stdout encoding, bytes as written): the exports still parse back."""
    root, _, names = hostile_runs
    command = [sys.executable, "-m", "tui", "runs", "--runs-dir", str(root)]
    listed = subprocess.run([*command, "--json"], cwd=ROOT, capture_output=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert sorted(d["name"] for d in json.loads(listed.stdout)) == sorted(names.values())
    exported = subprocess.run([*command, "--csv"], cwd=ROOT, capture_output=True, timeout=120).stdout.decode()
    assert sorted(r["name"] for r in csv.DictReader(io.StringIO(exported, newline=""))) == sorted(
        as_csv(name) for name in names.values())
    table = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=120)
    assert table.returncode == 0 and terminal_safe(table.stdout.decode()), table.stdout[:300]


def test_text_outputs_do_not_pass_escapes_to_the_terminal(
        hostile_runs: tuple[Path, dict[str, RunDir], dict[str, str]]) -> None:
    root, runs, names = hostile_runs
    table = cli("runs", "--runs-dir", str(root))
    out = table.stdout_bytes.decode()
    assert table.exit_code == 0 and terminal_safe(out), repr(out[:500])
    assert out.count("\n") == 1 + len(runs)  # one line per run: a newline in a tag cannot add rows
    line_counts = set()
    for key, run in runs.items():
        shown = cli("show", run.id, "--runs-dir", str(root))
        out = shown.stdout_bytes.decode()
        assert shown.exit_code == 0 and terminal_safe(out), (key, out[:300])
        line_counts.add(out.count("\n"))
        by_name = cli("show", names[key], "--json", "--runs-dir", str(root))  # a run found by its hostile name
        assert by_name.exit_code == 0 and json.loads(by_name.stdout)["id"] == run.id, key
    assert len(line_counts) == 1  # every run shows the same lines: a newline in its name or note adds none


def test_tag_and_note_commands(hostile_runs: tuple[Path, dict[str, RunDir], dict[str, str]]) -> None:
    root, runs, names = hostile_runs
    run = runs["unicode"]
    for key, value in [*names.items(), ("long", LONG)]:
        tagged = cli("tag", run.id, value, "--runs-dir", str(root))
        assert tagged.exit_code in (0, 2), (key, tagged.exception)
        assert terminal_safe(tagged.stdout_bytes.decode()) and tagged.stderr.count("\n") <= 1, (key, tagged.output)
        noted = cli("note", run.id, value, "--runs-dir", str(root))
        assert noted.exit_code == (2 if value is LONG else 0), (key, noted.output)
    doc = json.loads(cli("show", run.id, "--json", "--runs-dir", str(root)).stdout)
    assert doc["note"] == names["unicode"]  # the last accepted note (10,000 characters were refused)
    assert names["ansi"] in doc["tags"] and names["nul"] in doc["tags"]  # one word each: accepted as given


def test_tui_runs_table_and_run_view(hostile_runs: tuple[Path, dict[str, RunDir], dict[str, str]]) -> None:
    """Pilot: the table lists every hostile run, control characters are not drawn, markup is text."""
    from tests.tui_fake import run_async, wait_for
    from tui.app import KdtuiApp
    from tui.screens.run_view import RunViewScreen
    from tui.widgets.runs_table import RunsTable

    root, runs, names = hostile_runs

    @run_async
    async def drive() -> None:
        app = KdtuiApp(root, root)
        async with app.run_test(size=(160, 40)) as pilot:
            table = app.screen.query_one(RunsTable)
            await wait_for(pilot, lambda: len(table.rows) == len(runs))
            assert sorted(doc["name"] for doc in table.rows) == sorted(names.values())
            lines = [table.render_line(y).text for y in range(table.size.height)]
            assert all(terminal_safe(line) for line in lines), lines
            for key in ("ansi", "markup", "newlines", "bidi"):  # their run views: the status line shows the name
                table.cursor = next(i for i, doc in enumerate(table.rows) if doc["id"] == runs[key].id)
                await pilot.press("enter")
                await wait_for(pilot, lambda: isinstance(app.screen, RunViewScreen))
                status = str(app.screen.query_one("#run-status").render())
                assert terminal_safe(status.replace("\n", " ")), (key, status)
                await pilot.press("escape")
                await wait_for(pilot, lambda: app.screen is app.runs_screen)
            assert app.is_running  # a [@click=app.quit] name did not quit it

    drive()
