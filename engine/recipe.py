"""Recipes: TOML files validated by pydantic before anything starts.

Torch-free on purpose: `kdtui check`, the launcher and the TUI validate recipes
without paying for a torch import. Every problem becomes one `RecipeError` line
that names the file, the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import itertools
import re
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from engine.recipe_distill import DistillSection, TeacherTrainingSection, check_distill
from engine.recipe_sections import (
    MAX_EXTENDS_DEPTH,
    CheckpointSection,
    DataSection,
    ModelSection,
    OptimSection,
    RecipeError,
    RunSection,
    ScheduleSection,
    Section,
    StageSection,
    TeacherSection,
    TrainSection,
    _one_line,
)
from engine.recipe_ssl import LinearEvalSection, SemiSection, SSLSection, check_ssl_semi

__all__ = [
    "CheckpointSection", "DataSection", "ModelSection", "OptimSection", "Recipe", "RecipeError", "RunSection",
    "ScheduleSection", "StageSection", "TeacherSection", "TrainSection", "expand_sweep", "load_recipe",
    "parse_override",
]

# ---------------------------------------------------------------- the whole recipe


class Recipe(Section):
    """A whole experiment. `source` is the file it came from (not part of the TOML)."""

    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    teacher: TeacherSection = TeacherSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    distill: DistillSection = DistillSection()  # issue 3
    teacher_training: TeacherTrainingSection = TeacherTrainingSection()  # issue 3
    ssl: SSLSection = SSLSection()  # issue 4
    semi: SemiSection = SemiSection()  # issue 4
    linear_eval: LinearEvalSection = LinearEvalSection()  # issue 4
    sweep: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("sweep", mode="before")
    @classmethod
    def _flatten_sweep(cls, value: Any) -> Any:
        return _flatten(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _sweep_keys_exist(self) -> Recipe:
        for key, values in self.sweep.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep.{key}: expected a non-empty list of values")
            _check_dotted_key(key, f"sweep.{key}")
        return self

    @model_validator(mode="after")
    def _distill_consistent(self) -> Recipe:
        check_distill(self)  # issue 3
        return self

    @model_validator(mode="after")
    def _ssl_semi_consistent(self) -> Recipe:
        check_ssl_semi(self)  # issue 4
        return self

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain TOML-able data (None values dropped: TOML has no null)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': [..]}} -> {'optim.lr': [..]}; already dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _check_dotted_key(key: str, shown_as: str) -> None:
    """SECTION.KEY, or SECTION.SUBSECTION.KEY for nested tables such as distill.crd.nce_k."""
    section, _, rest = key.partition(".")
    sections = {name: info.annotation for name, info in Recipe.model_fields.items() if name != "sweep"}
    if section not in sections or not rest:
        raise ValueError(f"{shown_as}: unknown key; expected SECTION.KEY with SECTION one of {', '.join(sections)}")
    model: Any = sections[section]
    parts = rest.split(".")
    for depth, part in enumerate(parts):
        fields = {info.alias or name: info.annotation for name, info in model.model_fields.items()}
        if part not in fields:
            raise ValueError(f"{shown_as}: unknown key; expected one of {', '.join(sorted(fields))}")
        model = fields[part]
        if depth < len(parts) - 1 and not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ValueError(f"{shown_as}: {'.'.join([section, *parts[:depth + 1]])} is a value, not a table")


# ---------------------------------------------------------------- loading


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(path, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(path, "", f"cannot read: {err}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(path, "", f"invalid TOML: {err}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays / inline tables
        raise RecipeError(path, "", "invalid TOML: arrays or inline tables nested too deeply") from None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "sweep":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_extends(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    data = read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(path, "extends", f"expected a path string, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in seen or len(seen) >= MAX_EXTENDS_DEPTH:
        raise RecipeError(path, "extends", f"circular or too deep extends chain at {parent!r}")
    if not parent_path.is_file():
        raise RecipeError(path, "extends", f"file not found: {parent_path}")
    return _deep_merge(_resolve_extends(parent_path, (*seen, path.resolve())), data)


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=0.1' -> ('optim.lr', 0.1); the value is read as TOML, else kept as a string."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$", key):
        raise RecipeError("--set", _one_line(text, 80), "expected SECTION.KEY=VALUE, e.g. optim.lr=0.1")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `data` with each dotted key set to its value."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError("--set", key, f"{part!r} is not a section")
        node[leaf] = value
    return data


def validate(data: dict[str, Any], source: str | Path) -> Recipe:
    """dict -> Recipe, or the first problem as a RecipeError naming the dotted key."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unknown key; expected one of {_known_keys(first['loc'])}"
        else:
            message = first["msg"].removeprefix("Value error, ")
            if "input" in first and first["type"] != "value_error":
                message += f" (got {first['input']!r})"
            if not key and (named := re.match(r"^([\w.]+): (.*)$", message)):
                key, message = named.groups()  # model-level validators name their key in the message
        raise RecipeError(source, key, message) from None
    if not recipe.run.name:
        recipe.run.name = Path(str(source)).stem
    return recipe


def _known_keys(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            break
        model = info.annotation
    return ", ".join(sorted(info.alias or name for name, info in model.model_fields.items()))


def _check_files(recipe: Recipe, source: Path) -> Recipe:
    """Make relative paths absolute (relative to the recipe, then the cwd) and require they exist."""
    base = source.parent

    def resolve(key: str, value: str) -> str:
        for candidate in (base / value, Path.cwd() / value):
            if candidate.exists():
                return str(candidate.resolve())
        raise RecipeError(source, key, f"file not found: {value}")

    if recipe.teacher.from_recipe:
        recipe.teacher.from_recipe = resolve("teacher.from", recipe.teacher.from_recipe)
    if recipe.teacher.checkpoint:
        recipe.teacher.checkpoint = resolve("teacher.checkpoint", recipe.teacher.checkpoint)
    if isinstance(recipe.model.pretrained, str):
        recipe.model.pretrained = resolve("model.pretrained", recipe.model.pretrained)
    if recipe.data.dataset == "folder":
        recipe.data.root = resolve("data.root", recipe.data.root)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Read, extend, override and validate a recipe file. Raises RecipeError. An override of a key
    that `[sweep]` varies replaces the sweep over it (`--set run.method=crd` on a method sweep)."""
    path = Path(path)
    data = _resolve_extends(path)
    if isinstance(overrides, list):
        overrides = dict(parse_override(item) for item in overrides)
    if overrides:
        for key in overrides:
            try:
                _check_dotted_key(key, key)
            except ValueError as err:
                raise RecipeError(path, key, str(err).split(": ", 1)[1]) from None
        data = apply_overrides(data, overrides)
        if isinstance(data.get("sweep"), dict):  # an override of a swept key pins it: that point only
            sweep = _flatten(data["sweep"])
            data["sweep"] = {key: values for key, values in sweep.items() if key not in overrides}
    return _check_files(validate(data, path), path)


def expand_sweep(recipe: Recipe, source: str | Path | None = None) -> list[tuple[dict[str, Any], Recipe]]:
    """The cartesian product of `[sweep]` as (point, recipe) pairs; one pair without a sweep.
    `source` (the recipe file) is named in errors about a point."""
    if not recipe.sweep:
        return [({}, recipe)]
    keys = list(recipe.sweep)
    base = recipe.to_dict()
    base.pop("sweep", None)
    points = []
    for values in itertools.product(*(recipe.sweep[key] for key in keys)):
        point = dict(zip(keys, values, strict=True))
        data = apply_overrides(base, point)
        name = recipe.run.name + "-" + "-".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
        data.setdefault("run", {})["name"] = name
        shown = _one_line(repr(point), 120)  # short enough that the key after it survives the 400-char cap
        points.append((point, validate(data, f"{source or recipe.run.name} (sweep point {shown})")))
    return points
