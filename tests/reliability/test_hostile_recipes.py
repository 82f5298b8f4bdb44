"""Hostile recipes: property tests over every key of every section of the recipe schema.

The keys are found by walking the pydantic models in engine/recipe.py (a new section or key is
covered without touching this file). For each key, hypothesis generates values that cannot be
valid (a table where a scalar goes, letters for a number, numbers out of range, nan/inf, unknown
names) and values of any TOML type; it also mangles the TOML text and the `--set` overrides.
The promise: either the recipe is valid, or a RecipeError of one line that starts with the file
and names the key; `kdtui run` then exits 2 with that one line, no traceback, and no run directory.
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from engine.recipe import Recipe, RecipeError
from tests.conftest import TINY_RECIPE
from tests.reliability.procs import run_cli
from tui.launcher import prepare

BASE = tomllib.loads(TINY_RECIPE)
NAMED = {"run.method", "data.dataset", "model.arch", "train.device", "checkpoint.best_metric"}  # checked names
EXAMPLES = 150
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def schema_keys(model: type[BaseModel] = Recipe, prefix: tuple[str | int, ...] = ()) -> list[tuple[tuple, FieldInfo]]:
    """Every leaf key as a path, e.g. ('optim', 'lr') or ('schedule', 'stages', 0, 'epochs')."""
    keys = []
    for name, info in model.model_fields.items():
        path, annotation = (*prefix, info.alias or name), info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += schema_keys(annotation, path)
            continue
        keys.append((path, info))
        item = get_args(annotation)[0] if get_origin(annotation) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):  # [[schedule.stages]] tables
            keys += schema_keys(item, (*path, 0))
    return keys


KEYS = schema_keys()


def dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def with_value(path: tuple, value: Any) -> dict[str, Any]:
    """The tiny recipe with one key set (lists of tables get a valid first table to put it in)."""
    data = copy.deepcopy(BASE)
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(part, int):
            node = node[part]
        elif isinstance(path[i + 1], int):
            node = node.setdefault(part, [{"epochs": 1, "lr": 0.1}])
        else:
            node = node.setdefault(part, {})
    node[path[-1]] = value
    return data


# ---------------------------------------------------------------- value strategies
identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
letters = st.from_regex(r"[A-Za-z][A-Za-z_ ]{5,15}", fullmatch=True)  # never a number, never a bool word
toml_scalars = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=30), st.booleans(),
                         st.datetimes(), st.dates(), st.times())
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3), max_leaves=8)
tables = st.dictionaries(identifiers, toml_scalars, min_size=1, max_size=3)


def out_of_range(info: FieldInfo, integral: bool) -> list[st.SearchStrategy[Any]]:
    """Numbers just past (and far past) each bound in the field's constraints."""
    out = []
    for rule in info.metadata:
        for name, below in (("ge", True), ("gt", True), ("le", False), ("lt", False)):
            bound = getattr(rule, name, None)
            if bound is None:
                continue
            inclusive_ok = name in ("ge", "le")
            if integral:
                out.append(st.integers(max_value=bound - 1 if inclusive_ok else bound) if below
                           else st.integers(min_value=bound + 1 if inclusive_ok else bound))
            else:
                out.append(st.floats(max_value=bound, exclude_max=inclusive_ok, allow_nan=False, allow_infinity=False)
                           if below else st.floats(min_value=bound, exclude_min=inclusive_ok, allow_nan=False,
                                                   allow_infinity=False))
    return out


def invalid_values(path: tuple, info: FieldInfo) -> st.SearchStrategy[Any]:
    """Values this key can never accept, whatever the rest of the recipe says."""
    key = dotted(path)
    if key == "sweep":  # a table of SECTION.KEY -> list; a non-list value is always wrong
        return st.dictionaries(st.sampled_from(["optim.lr", "train.seed", "zz.top"]), toml_scalars, min_size=1)
    annotation = info.annotation
    members = [a for a in (get_args(annotation) if get_origin(annotation) in (Union, types.UnionType)
                           else (annotation,)) if a is not type(None)]
    options: list[st.SearchStrategy[Any]] = [tables]
    for member in members:
        origin = get_origin(member)
        if origin in (list, tuple):
            options.append(st.integers())  # a scalar where a list goes
            if origin is tuple:
                options.append(st.lists(st.floats(0.01, 0.99), min_size=len(get_args(member)) + 1, max_size=6))
                options.append(st.lists(letters, min_size=len(get_args(member)), max_size=len(get_args(member))))
        elif origin is Literal:
            options.append(st.builds(lambda s: f"zz{s}", st.text(max_size=10)))
    plain = set(members)
    if plain & {int, float}:
        options += [letters, *out_of_range(info, integral=float not in plain)]
        if float in plain:
            options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
        else:
            options.append(st.floats(0.1, 1e6).filter(lambda x: x != int(x)))
    if bool in plain and str not in plain:
        options += [letters, st.floats(0.1, 0.9)]
    if str in plain:
        options += [st.floats(0.1, 0.9), st.lists(st.integers(), min_size=1, max_size=3)]
        if key in NAMED:
            options.append(st.builds(lambda s: f"zz-{s}", st.text(max_size=10)))
        if info.metadata and getattr(info.metadata[0], "max_length", None):
            options.append(st.text(min_size=info.metadata[0].max_length + 1, max_size=300))
    return st.one_of(options)


# ---------------------------------------------------------------- the promise
def attempt(path: Path, text: str | bytes | None = None, data: dict[str, Any] | None = None,
            overrides: list[str] | None = None) -> RecipeError | None:
    """Write the recipe and prepare a run as `kdtui run` does; None if valid, else the RecipeError."""
    if data is not None:
        text = tomli_w.dumps(data)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    try:
        prepare(path, overrides, path.parent / "runs")
    except RecipeError as err:
        message = str(err)
        assert "\n" not in message and "\r" not in message and len(message) <= 400, message
        assert message.startswith((f"{path}: ", f"{path} (sweep point ", "--set: ")), message
        return err
    return None


CLI_EVERY = 10  # property tests: every 10th refused example also goes through `kdtui run` (~25 ms each)
_refused = [0]


def assert_cli_refuses(path: Path, runs: Path, overrides: list[str] | None = None, sample: bool = False) -> None:
    """`kdtui run` (in process): exit 2, one stderr line, no traceback, nothing created under --runs-dir."""
    from typer.testing import CliRunner

    from tui.cli import app

    _refused[0] += 1
    if sample and _refused[0] % CLI_EVERY:
        return
    sets = [arg for item in overrides or [] for arg in ("--set", item)]
    result = CliRunner().invoke(app, ["run", str(path), *sets, "--runs-dir", str(runs)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("kdtui: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    assert not runs.exists() or not any(runs.iterdir())


def known_key(err: RecipeError) -> bool:
    """The error names a dotted key whose first part is a section (or a top-level key) of the schema."""
    return bool(err.key) and err.key.split(".")[0] in {*Recipe.model_fields, "extends"}


def test_every_key_refuses_a_table(tmp_path: Path) -> None:
    """Deterministic coverage: each of the schema's keys, given a table, names itself."""
    recipe, runs = tmp_path / "r.toml", tmp_path / "runs"
    assert len(KEYS) >= 80
    for path, _ in KEYS:
        value = {"optim.lr": 1} if dotted(path) == "sweep" else {"zz": 1}
        err = attempt(recipe, data=with_value(path, value))
        assert err is not None and err.key.startswith(dotted(path)), (dotted(path), err)
        assert_cli_refuses(recipe, runs)


@PROPERTY
@given(st.data())
def test_invalid_value_for_any_key_names_the_key(tmp_path: Path, data: st.DataObject) -> None:
    path, info = data.draw(st.sampled_from(KEYS), label="key")
    value = data.draw(invalid_values(path, info), label="value")
    recipe = tmp_path / "r.toml"
    err = attempt(recipe, data=with_value(path, value))
    assert err is not None, f"{dotted(path)} = {value!r} was accepted"
    assert err.key == dotted(path) or err.key.startswith(dotted(path) + "."), (dotted(path), str(err))
    assert_cli_refuses(recipe, tmp_path / "runs", sample=True)


@PROPERTY
@given(st.data())
def test_any_value_for_any_key_is_valid_or_one_line(tmp_path: Path, data: st.DataObject) -> None:
    path, _ = data.draw(st.sampled_from(KEYS), label="key")
    value = data.draw(toml_values, label="value")
    recipe = tmp_path / "r.toml"
    err = attempt(recipe, data=with_value(path, value))
    if err is None:  # accepted: then it also survives the resolved-recipe round trip
        loaded = prepare(recipe, None, tmp_path / "runs").recipe
        again = tmp_path / "again.toml"
        assert attempt(again, text=loaded.to_toml()) is None
    else:
        assert known_key(err), str(err)
        assert_cli_refuses(recipe, tmp_path / "runs", sample=True)


TOML_NOISE = st.text(alphabet=st.sampled_from(list("[]{}=\"'.,#\\\n\t 0123456789abcxyz_-+é\x00\x1b\u2028")),
                     max_size=12)


@PROPERTY
@given(st.data())
def test_mangled_toml_is_valid_or_one_line(tmp_path: Path, data: st.DataObject) -> None:
    text = TINY_RECIPE
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        i = data.draw(st.integers(0, len(text)), label="at")
        j = data.draw(st.integers(i, min(len(text), i + 20)), label="to")
        text = text[:i] + data.draw(TOML_NOISE, label="noise") + text[j:]
    raw: bytes = text.encode()
    if data.draw(st.booleans(), label="binary"):
        raw = raw[: data.draw(st.integers(0, len(raw)))] + data.draw(st.binary(max_size=16), label="bytes")
    recipe = tmp_path / "r.toml"
    err = attempt(recipe, text=raw)
    if err is not None:
        assert_cli_refuses(recipe, tmp_path / "runs", sample=True)


@PROPERTY
@given(st.data())
def test_hostile_overrides_are_valid_or_one_line(tmp_path: Path, data: st.DataObject) -> None:
    key = data.draw(st.one_of(st.sampled_from([dotted(p) for p, _ in KEYS]), st.text(max_size=20)), label="key")
    raw = data.draw(st.one_of(st.text(max_size=40), toml_values.map(lambda v: tomli_w.dumps({"v": v})[4:].strip())),
                    label="value")
    override = data.draw(st.sampled_from([f"{key}={raw}", key, f"{key} = {raw}", raw]), label="form")
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE)
    err = attempt(recipe, text=TINY_RECIPE, overrides=[override])
    if err is not None and "\0" not in override:  # argv cannot carry NUL; in process it reaches prepare()
        assert_cli_refuses(recipe, tmp_path / "runs", [override], sample=True)


def test_unknown_keys_and_sections_are_named(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    for section in [name for name in Recipe.model_fields if name != "sweep"]:
        err = attempt(recipe, data={**BASE, section: {**BASE.get(section, {}), "zz_unknown": 1}})
        assert err is not None and err.key == f"{section}.zz_unknown" and "unknown key" in str(err), err
    err = attempt(recipe, data={**BASE, "zz_section": {"a": 1}})
    assert err is not None and err.key == "zz_section"


@pytest.mark.parametrize("text", [
    "x = " + "[" * 3000 + "]" * 3000,  # deeper than the TOML parser's recursion allows
    "[run]\nname = \"a\"\n[run]\nname = \"b\"\n",  # a table defined twice
    "[optim]\nlr = 0.1\nlr = 0.2\n",  # a key defined twice
    "\ufeff[optim]\nlr = 0.1\n",  # a byte-order mark
    "[train]\nepochs = 1e400\n",  # a float out of range
    "[data]\nroot = \"a\\u0000b\"\n",  # a NUL in a path
    "[sweep]\n\"optim.lr\" = [0.1, -1]\n",  # one bad sweep point
    "[sweep]\n\"run.name\" = [\"" + "n" * 500 + "\"]\n",  # a sweep point whose name is too long
    "extends = \"/\"\n",
    "extends = \"r.toml\"\n",  # extends itself
])
def test_nasty_files(tmp_path: Path, text: str) -> None:
    recipe = tmp_path / "r.toml"
    err = attempt(recipe, text=text)
    if err is not None:
        assert re.match(r"^\S+( \(sweep point .*\))?: ", str(err)), str(err)
        assert_cli_refuses(recipe, tmp_path / "runs")


def test_real_cli_exit_codes(tmp_path: Path) -> None:
    """The real `kdtui run` / `kdtui check` processes: exit 2, one line each, no traceback."""
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 3000 + "]" * 3000)
    nan = tmp_path / "nan.toml"
    nan.write_text(TINY_RECIPE.replace("lr = 0.05", "lr = nan"))
    runs = tmp_path / "runs"
    result = run_cli("run", str(deep), "--runs-dir", str(runs))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nested too deeply" in result.stderr
    result = run_cli("check", str(deep), str(nan), "--set", "train.epochs=zero")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 2 and "nested too deeply" in result.stderr and "optim.lr" in result.stderr
    assert not runs.exists()
