"""Recipe validation: every bad input is one line naming file and dotted key; overrides; extends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.recipe import RecipeError, expand_sweep, load_recipe, parse_override
from tests.conftest import ROOT, TINY_RECIPE, write_recipe


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> RecipeError:
    path = write_recipe(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return info.value


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[optim]\nlr = -1\n", "optim.lr", "greater than 0"),
        ("[optim]\nlr = 'fast'\n", "optim.lr", "number"),
        ("[optim]\nlrr = 0.1\n", "optim.lrr", "unknown key; expected one of"),
        ("[oprim]\nlr = 0.1\n", "oprim", "unknown key"),
        ("[model]\narch = 'resnet1000'\n", "model.arch", "unknown arch 'resnet1000'"),
        ("[data]\ndataset = 'mnist2'\n", "data.dataset", "unknown dataset"),
        ("[run]\nmethod = 'magic'\n", "run.method", "unknown method"),
        ("[data]\nscale = 1.5\n", "data.scale", "less than or equal to 1"),
        ("[train]\ndevice = 'gpu0'\n", "train.device", "expected 'cpu'"),
        ("[teacher]\ncheckpoint = 'nope/t.pt'\n", "teacher.checkpoint", "file not found"),
        ("[checkpoint]\nbest_metric = 'top1'\n", "checkpoint.best_metric", "SPLIT.METRIC"),
        ("[sweep]\n'optim.lrx' = [0.1]\n", "sweep", "unknown key"),
        ("[train]\nepochs = 0\n", "train.epochs", "greater than or equal to 1"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    err = error_of(tmp_path, text)
    assert err.key.startswith(key), err
    assert fragment in str(err)


def test_invalid_toml_names_line(tmp_path: Path) -> None:
    err = error_of(tmp_path, "[optim\nlr = 1\n")
    assert "invalid TOML" in str(err) and "line 1" in str(err)


def test_missing_file() -> None:
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe("does/not/exist.toml")


def test_overrides_are_typed_by_schema(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, TINY_RECIPE)
    recipe = load_recipe(path, ["optim.lr=0.2", "train.epochs=7", "model.arch=resnet20", "run.tags=['a','b']"])
    assert recipe.optim.lr == 0.2 and recipe.train.epochs == 7 and recipe.model.arch == "resnet20"
    assert recipe.run.tags == ["a", "b"]
    assert parse_override("data.root=some/where") == ("data.root", "some/where")


@pytest.mark.parametrize("bad", ["optim.lr", "lr=0.1", "optim.nope=1", "=3"])
def test_bad_overrides(tmp_path: Path, bad: str) -> None:
    path = write_recipe(tmp_path, TINY_RECIPE)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [bad])
    assert "\n" not in str(info.value)


def test_override_value_checked(tmp_path: Path) -> None:
    err = error_of(tmp_path, TINY_RECIPE, ["optim.lr=-3"])
    assert err.key == "optim.lr"


def test_extends_merges_and_child_wins(tmp_path: Path) -> None:
    write_recipe(tmp_path, "[optim]\nlr = 0.3\nmomentum = 0.5\n[train]\nepochs = 4\n", "base.toml")
    child = write_recipe(tmp_path, 'extends = "base.toml"\n[optim]\nlr = 0.01\n', "child.toml")
    recipe = load_recipe(child)
    assert (recipe.optim.lr, recipe.optim.momentum, recipe.train.epochs) == (0.01, 0.5, 4)
    assert recipe.run.name == "child"


def test_extends_cycle_and_missing(tmp_path: Path) -> None:
    write_recipe(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write_recipe(tmp_path, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(RecipeError, match="circular"):
        load_recipe(tmp_path / "a.toml")
    missing = write_recipe(tmp_path, 'extends = "gone.toml"\n', "c.toml")
    with pytest.raises(RecipeError, match="extends: file not found"):
        load_recipe(missing)


def test_sweep_expands_cartesian_product(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, TINY_RECIPE + "[sweep]\n'optim.lr' = [0.1, 0.2]\n'data.batch_size' = [16, 32, 64]\n")
    points = expand_sweep(load_recipe(path))
    assert len(points) == 6
    assert {(r.optim.lr, r.data.batch_size) for _, r in points} == {(a, b) for a in (0.1, 0.2) for b in (16, 32, 64)}
    assert len({r.run.name for _, r in points}) == 6 and all(not r.sweep for _, r in points)


def test_override_of_a_swept_key_pins_it(tmp_path: Path) -> None:
    sweep = "[sweep]\n'optim.lr' = [0.1, 0.2]\n'data.batch_size' = [16, 32]\n"
    path = write_recipe(tmp_path, TINY_RECIPE + sweep)
    points = expand_sweep(load_recipe(path, ["optim.lr=0.3"]))
    assert sorted((r.optim.lr, r.data.batch_size) for _, r in points) == [(0.3, 16), (0.3, 32)]
    assert expand_sweep(load_recipe(path, ["optim.lr=0.3", "data.batch_size=8"]))[0][0] == {}
    assert len(expand_sweep(load_recipe(path, ["optim.momentum=0.5"]))) == 4  # other keys leave the sweep alone


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, TINY_RECIPE), ["optim.lr=0.3"])
    again = load_recipe(write_recipe(tmp_path, recipe.to_toml(), "resolved.toml"))
    assert again == recipe


def test_every_shipped_recipe_validates() -> None:
    recipes = sorted((ROOT / "recipes").rglob("*.toml"))
    assert recipes
    result = subprocess.run([sys.executable, "-m", "tui", "check", *map(str, recipes)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    # recipes that name another recipe's run as teacher/backbone validate too (files exist)
    assert result.returncode == 0, result.stderr


def test_check_bad_recipe_exit_code_2(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "[optim]\nlr = -1\n")
    result = subprocess.run([sys.executable, "-m", "tui", "check", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "optim.lr" in result.stderr and "Traceback" not in result.stderr
