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
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

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

__all__ = [
    "CheckpointSection", "DataSection", "ModelSection", "OptimSection", "Recipe", "RecipeError", "RunSection",
    "ScheduleSection", "StageSection", "TeacherSection", "TrainSection", "expand_sweep", "load_recipe",
    "parse_override",
]

# ---------------------------------------------------------------- distillation (issue 3)
# `[distill]`: student losses (engine/methods/distill.py) and deep supervision;
# `[teacher_training]`: HSAKD teachers (engine/methods/hsakd_teacher.py).

DISTILL_METHODS = ("kd", "hsakd", "teacher_target")  # students that learn from a [teacher]
DEEP_SUPERVISION_METHODS = (*DISTILL_METHODS, "supervised_aux")  # methods that honour distill.aux_stage


class DistillSection(Section):
    """Student losses; `temperature` unset means the method's default (kd 4, hsakd 3, teacher_target 1)."""

    temperature: float | None = Field(None, gt=0, le=100)
    alpha: float = Field(0.9, ge=0, le=1)  # kd: weight of the KL term; CE gets 1 - alpha
    ce_weight: float = Field(1.0, ge=0, le=1000)  # hsakd: CE of the un-rotated main logits
    aux_kd_weight: float = Field(1.0, ge=0, le=1000)  # hsakd: each branch's KL term
    main_kd_weight: float = Field(1.0, ge=0, le=1000)  # hsakd: the main logits' KL term
    target_weight: float = Field(1.0, ge=0, le=1000)  # teacher_target: the teacher-as-target CE
    aux_stage: int | None = Field(None, ge=1, le=16)  # deep supervision: a classifier on this stage's output
    aux_weight: float = Field(0.7, ge=0, le=1000)  # deep supervision: loss = main + aux_weight * aux


class TeacherTrainingSection(Section):
    """HSAKD teachers: frozen = train the branches only, on the pretrained backbone named by [teacher]."""

    freeze_backbone: bool = False


def _check_distill(recipe: Recipe) -> None:
    """Cross-section rules of the distillation methods; each message starts with its dotted key."""
    from engine.models.registry import is_auxiliary

    method, arch = recipe.run.method, recipe.model.arch
    has_teacher = bool(recipe.teacher.from_recipe or recipe.teacher.checkpoint)
    teacher_hint = 'set [teacher] from = "recipes/....toml" or checkpoint = "path/to/best.pt"'
    if method in DISTILL_METHODS and not has_teacher:
        raise ValueError(f"teacher: method {method} needs a teacher; {teacher_hint}")
    if method in ("hsakd", "hsakd_teacher") and not is_auxiliary(arch):
        raise ValueError(f"model.arch: method {method} needs an *_aux architecture (e.g. {arch}_aux), got {arch!r}")
    if method in ("kd", "teacher_target", "supervised_aux") and is_auxiliary(arch):
        raise ValueError(f"model.arch: method {method} trains a plain student and would leave the branches of "
                         f"{arch!r} untrained; use {arch.removesuffix('_aux')!r}")
    frozen = recipe.teacher_training.freeze_backbone
    if method == "hsakd_teacher" and frozen and not has_teacher:
        raise ValueError(f"teacher: a frozen hsakd_teacher needs the pretrained plain backbone; {teacher_hint}")
    if method == "hsakd_teacher" and not frozen and has_teacher:
        raise ValueError("teacher: a joint hsakd_teacher trains from scratch and would ignore [teacher]; "
                         "set teacher_training.freeze_backbone = true to start from it")
    if frozen and method != "hsakd_teacher":
        raise ValueError(f"teacher_training.freeze_backbone: only method hsakd_teacher uses it, got method {method}")
    if method == "supervised_aux" and recipe.distill.aux_stage is None:
        raise ValueError("distill.aux_stage: method supervised_aux needs the stage that feeds the auxiliary "
                         "classifier, e.g. aux_stage = 2")
    if recipe.distill.aux_stage is not None and method not in DEEP_SUPERVISION_METHODS:
        raise ValueError(f"distill.aux_stage: method {method} has no deep supervision; use one of "
                         f"{', '.join(DEEP_SUPERVISION_METHODS)}")


# ---------------------------------------------------------------- self- and semi-supervised (issue 4)
# `[ssl]`: SimCLR / RotNet (engine/methods/simclr.py, rotnet.py); `[semi]`: MixMatch (mixmatch.py);
# `[linear_eval]`: the frozen-backbone protocol (linear_eval.py). linear_eval and finetune take their
# starting backbone from `[teacher]` (from = another recipe's latest finished run, or checkpoint = a file).

SSL_METHODS = ("simclr", "rotnet")  # no class head: best.pt is chosen by the kNN monitor


class SSLSection(Section):
    """SimCLR's two views, projection head and NT-Xent; the kNN top-1 monitor (SimCLR and RotNet)."""

    temperature: float = Field(0.5, gt=0, le=100)
    proj_hidden_dim: int = Field(512, ge=0, le=65536)  # 0: a single linear projection
    proj_dim: int = Field(128, ge=1, le=65536)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = Field(0.8, ge=0, le=1)
    gray_p: float = Field(0.2, ge=0, le=1)
    knn_k: int = Field(200, ge=1, le=100_000)
    knn_temperature: float = Field(0.1, gt=0, le=100)

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"expected [min, max] with 0 < min <= max <= 1, got {list(value)}")
        return value

    @field_validator("jitter")
    @classmethod
    def _jitter_range(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if min(value) < 0 or value[3] > 0.5:
            raise ValueError(f"expected [brightness, contrast, saturation, hue] >= 0, hue <= 0.5, got {list(value)}")
        return value


class SemiSection(Section):
    """MixMatch: the labelled subset, K views, sharpening, MixUp, the unlabelled weight and the EMA."""

    num_labels: int = Field(4000, ge=1)  # class-balanced: num_labels / classes per class
    label_seed: int | None = Field(None, ge=0, le=2**31 - 1)  # unset: train.seed
    views: int = Field(2, ge=1, le=16)  # K
    temperature: float = Field(0.5, gt=0, le=100)
    alpha: float = Field(0.75, gt=0, le=100)  # MixUp Beta(alpha, alpha)
    lambda_u: float = Field(75.0, ge=0, le=100_000)
    rampup_steps: int = Field(16384, ge=0)  # linear ramp of lambda_u over this many optimizer steps
    ema_decay: float = Field(0.999, ge=0, lt=1)


class LinearEvalSection(Section):
    """New linear layers on a frozen backbone; `precompute` trains them on cached features."""

    layers: Literal[1, 2] = 1  # 2: Linear -> Linear, no non-linearity (still a linear classifier)
    hidden_dim: int = Field(512, ge=1, le=65536)
    precompute: bool = False
    random_backbone: bool = False  # the baseline: the same protocol on a randomly initialised backbone


def _check_ssl_semi(recipe: Recipe) -> None:
    """Cross-section rules of issue 4's methods; each message starts with its dotted key."""
    from engine.models.registry import is_auxiliary

    method = recipe.run.method
    has_source = bool(recipe.teacher.from_recipe or recipe.teacher.checkpoint)
    if method in (*SSL_METHODS, "linear_eval", "finetune", "mixmatch") and is_auxiliary(recipe.model.arch):
        raise ValueError(f"model.arch: method {method} needs a plain architecture, got {recipe.model.arch!r}")
    if method == "finetune" and has_source and recipe.model.pretrained:
        raise ValueError("model.pretrained: finetune takes its weights from model.pretrained or from [teacher], "
                         "not both; remove one")
    if method == "linear_eval" and not has_source and not recipe.linear_eval.random_backbone:
        raise ValueError('teacher: linear_eval needs a pretrained backbone; set [teacher] from = "recipes/....toml" '
                         '(its latest finished run) or checkpoint = "path/to/best.pt"')
    if method == "linear_eval" and has_source and recipe.linear_eval.random_backbone:
        raise ValueError("linear_eval.random_backbone: the baseline ignores [teacher]; remove one of them")
    if method == "linear_eval" and recipe.linear_eval.precompute and recipe.data.augment != "none":
        raise ValueError('linear_eval.precompute: cached features are of un-augmented images; set data.augment = '
                         '"none" or precompute = false')
    if method == "finetune" and not has_source and not recipe.model.pretrained:
        raise ValueError("model.pretrained: finetune needs starting weights; set model.pretrained = true (or a "
                         "path) for resnet18_imagenet, or [teacher] from / checkpoint for a kdtui run")
    if method == "rotnet" and recipe.model.num_classes is not None:
        raise ValueError("model.num_classes: rotnet always predicts 4 rotations; leave it unset")
    if recipe.schedule.name == "stages" and not recipe.schedule.stages:
        raise ValueError('schedule.stages: schedule "stages" needs at least one [[schedule.stages]] table')
    if method in SSL_METHODS and "best_metric" not in recipe.checkpoint.model_fields_set:
        recipe.checkpoint.best_metric = "val.knn_top1"  # there is no class top-1 to pick best.pt by


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
        _check_distill(self)  # issue 3
        return self

    @model_validator(mode="after")
    def _ssl_semi_consistent(self) -> Recipe:
        _check_ssl_semi(self)  # issue 4
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
    section, _, field = key.partition(".")
    sections = {name: info.annotation for name, info in Recipe.model_fields.items() if name != "sweep"}
    if section not in sections or not field:
        raise ValueError(f"{shown_as}: unknown key; expected SECTION.KEY with SECTION one of {', '.join(sections)}")
    model = sections[section]
    fields = {info.alias or name for name, info in model.model_fields.items()}
    if field not in fields:
        raise ValueError(f"{shown_as}: unknown key; expected one of {', '.join(sorted(fields))}")


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
    """Read, extend, override and validate a recipe file. Raises RecipeError."""
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
