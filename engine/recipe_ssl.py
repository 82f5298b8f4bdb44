"""Recipe sections of the self- and semi-supervised methods: `[ssl]`, `[semi]`, `[linear_eval]`,
and the cross-section rules they bring. Torch-free, like engine/recipe.py which assembles them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from engine.recipe_sections import Section

if TYPE_CHECKING:
    from engine.recipe import Recipe

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


def check_ssl_semi(recipe: Recipe) -> None:
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
