"""Recipe sections of the self- and semi-supervised methods: `[ssl]`, `[semi]`, `[linear_eval]`,
and the cross-section rules they bring. Torch-free, like engine/recipe.py which assembles them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from engine.recipe_sections import Section

if TYPE_CHECKING:
    from engine.recipe import Recipe

# ---------------------------------------------------------------- self- and semi-supervised (issue 4)
# `[ssl]`: SimCLR / RotNet (engine/methods/simclr.py, rotnet.py); `[semi]`: MixMatch (mixmatch.py);
# `[linear_eval]`: the frozen-backbone protocol (linear_eval.py). linear_eval and finetune take their
# starting backbone from `[teacher]` (from = another recipe's latest finished run, or checkpoint = a file).

# ---------------------------------------------------------------- the self-supervised zoo (issue 14)
# engine/methods/{byol,simsiam,moco,barlow_twins,vicreg,dino}.py on ssl_base.py. Views: a preset of
# engine/data/views.py (`ssl.views`; unset: the method's own), changed by `[ssl.every_view]` (every
# view) and `[[ssl.per_view]]` (view 1, 2, ... in order); DINO adds `ssl.local_crops` small views.
# Each method's own settings are its sub-table `[ssl.<method>]`; defaults are solo-learn's CIFAR-10
# recipes (vturrisi/solo-learn scripts/pretrain/cifar/<method>.yaml, else solo/methods/<method>.py).

ZOO_SSL_METHODS = ("byol", "simsiam", "moco", "barlow_twins", "vicreg", "dino")
SSL_METHODS = ("simclr", "rotnet", *ZOO_SSL_METHODS)  # no class head: best.pt is chosen by the kNN monitor


def _check_scale(value: tuple[float, float] | None) -> tuple[float, float] | None:
    if value is not None and not 0 < value[0] <= value[1] <= 1:
        raise ValueError(f"expected [min, max] with 0 < min <= max <= 1, got {list(value)}")
    return value


def _check_range(value: tuple[float, float] | None) -> tuple[float, float] | None:
    if value is not None and not 0 < value[0] <= value[1]:
        raise ValueError(f"expected [min, max] with 0 < min <= max, got {list(value)}")
    return value


def _check_jitter(value: tuple[float, ...] | None) -> tuple[float, ...] | None:
    if value is not None and (min(value) < 0 or value[3] > 0.5):
        raise ValueError(f"expected [brightness, contrast, saturation, hue] >= 0, hue <= 0.5, got {list(value)}")
    return value


class ViewOverride(Section):
    """Fields of a preset view (engine/data/views.py ViewSpec) to change; unset keeps the preset's."""

    size: int | None = Field(None, ge=4, le=1024)
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] | None = None
    flip_p: float | None = Field(None, ge=0, le=1)
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    jitter_p: float | None = Field(None, ge=0, le=1)
    gray_p: float | None = Field(None, ge=0, le=1)
    blur_p: float | None = Field(None, ge=0, le=1)
    blur_sigma: tuple[float, float] | None = None
    solarize_p: float | None = Field(None, ge=0, le=1)

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        return _check_scale(value)

    @field_validator("crop_ratio", "blur_sigma")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        return _check_range(value)

    @field_validator("jitter")
    @classmethod
    def _jitter_range(cls, value: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        return _check_jitter(value)  # type: ignore[return-value]

    def changes(self) -> dict[str, Any]:
        """The fields this override sets, as ViewSpec keyword arguments."""
        return {key: value for key, value in self if value is not None}


class BYOLSection(Section):
    """`[ssl.byol]`: projector and predictor sizes; the target's momentum, cosine from base to final."""

    proj_hidden_dim: int = Field(4096, ge=1, le=65536)
    proj_dim: int = Field(256, ge=1, le=65536)
    pred_hidden_dim: int = Field(4096, ge=1, le=65536)
    base_tau: float = Field(0.99, ge=0, le=1)
    final_tau: float = Field(1.0, ge=0, le=1)


class SimSiamSection(Section):
    """`[ssl.simsiam]`: projector and predictor sizes; the predictor at a fixed lr (SimSiam sec. 4.4)."""

    proj_hidden_dim: int = Field(2048, ge=1, le=65536)
    proj_dim: int = Field(2048, ge=1, le=65536)
    pred_hidden_dim: int = Field(512, ge=1, le=65536)
    fixed_pred_lr: bool = True


class MoCoSection(Section):
    """`[ssl.moco]`: MoCo v2+ projector, queue of negatives, InfoNCE temperature, key-encoder momentum."""

    proj_hidden_dim: int = Field(2048, ge=1, le=65536)
    proj_dim: int = Field(256, ge=1, le=65536)
    queue_size: int = Field(32768, ge=1, le=10_000_000)
    temperature: float = Field(0.2, gt=0, le=100)
    base_tau: float = Field(0.99, ge=0, le=1)
    final_tau: float = Field(0.999, ge=0, le=1)


class BarlowTwinsSection(Section):
    """`[ssl.barlow_twins]`: projector sizes, off-diagonal weight lambda, scale of the whole loss."""

    proj_hidden_dim: int = Field(2048, ge=1, le=65536)
    proj_dim: int = Field(2048, ge=1, le=65536)
    lamb: float = Field(0.0051, ge=0, le=100)
    scale_loss: float = Field(0.1, gt=0, le=100)


class VICRegSection(Section):
    """`[ssl.vicreg]`: projector sizes, invariance / variance / covariance weights, variance eps."""

    proj_hidden_dim: int = Field(2048, ge=1, le=65536)
    proj_dim: int = Field(2048, ge=1, le=65536)
    sim_weight: float = Field(25.0, ge=0, le=1e6)
    var_weight: float = Field(25.0, ge=0, le=1e6)
    cov_weight: float = Field(1.0, ge=0, le=1e6)
    eps: float = Field(1e-4, gt=0, le=1)


class DINOSection(Section):
    """`[ssl.dino]`: head sizes and prototypes, temperatures (teacher's with a linear warm-up),
    centre momentum, teacher momentum, epochs with the prototypes frozen."""

    proj_hidden_dim: int = Field(2048, ge=1, le=65536)
    proj_dim: int = Field(256, ge=1, le=65536)  # bottleneck before the prototypes
    num_prototypes: int = Field(4096, ge=2, le=1_000_000)
    student_temp: float = Field(0.1, gt=0, le=100)
    teacher_temp: float = Field(0.07, gt=0, le=100)
    warmup_teacher_temp: float = Field(0.04, gt=0, le=100)
    warmup_teacher_temp_epochs: int = Field(0, ge=0, le=100_000)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    base_tau: float = Field(0.9995, ge=0, le=1)
    final_tau: float = Field(1.0, ge=0, le=1)
    freeze_last_layer_epochs: int = Field(1, ge=0, le=100_000)


class SSLSection(Section):
    """SimCLR's two views, projection head and NT-Xent; the kNN top-1 monitor (every SSL method);
    the zoo's views, online linear probe and per-method sub-tables."""

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
    # the zoo (ZOO_SSL_METHODS)
    views: str | None = Field(None, min_length=1, max_length=64)  # a VIEW_PRESETS name; unset: the method's
    every_view: ViewOverride = ViewOverride()
    per_view: list[ViewOverride] = Field(default_factory=list, max_length=16)
    local_crops: int = Field(0, ge=0, le=16)  # dino multi-crop: this many extra small views
    local_crop_size: int | None = Field(None, ge=4, le=1024)  # unset: half the image size
    local_crop_scale: tuple[float, float] = (0.05, 0.4)  # facebookresearch/dino main_dino.py
    probe_lr: float = Field(0.1, gt=0, le=1e9)  # the online linear probe's lr (solo-learn classifier_lr)
    byol: BYOLSection = BYOLSection()
    simsiam: SimSiamSection = SimSiamSection()
    moco: MoCoSection = MoCoSection()
    barlow_twins: BarlowTwinsSection = BarlowTwinsSection()
    vicreg: VICRegSection = VICRegSection()
    dino: DINOSection = DINOSection()

    @field_validator("crop_scale", "local_crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _check_scale(value)  # type: ignore[return-value]

    @field_validator("jitter")
    @classmethod
    def _jitter_range(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return _check_jitter(value)  # type: ignore[return-value]


SIMCLR_VIEW_KEYS = ("crop_scale", "flip_p", "jitter", "jitter_p", "gray_p")
ZOO_SHARED_KEYS = ("views", "every_view", "per_view", "local_crops", "local_crop_size", "local_crop_scale",
                   "probe_lr")


def _check_ssl_zoo(recipe: Recipe) -> None:
    """Keys of one SSL family set for another are mistakes: say which key the method reads instead."""
    method, ssl = recipe.run.method, recipe.ssl
    defaults = SSLSection()
    if method in ZOO_SSL_METHODS:
        for key in ("temperature", "proj_hidden_dim", "proj_dim", *SIMCLR_VIEW_KEYS):
            if getattr(ssl, key) != getattr(defaults, key):
                instead = f"ssl.every_view.{key}" if key in SIMCLR_VIEW_KEYS else f"ssl.{method}.*"
                raise ValueError(f"ssl.{key}: SimCLR's setting, unused by {method}; set {instead}")
    else:
        for key in ZOO_SHARED_KEYS:
            if getattr(ssl, key) != getattr(defaults, key):
                raise ValueError(f"ssl.{key}: only the SSL zoo uses it ({', '.join(ZOO_SSL_METHODS)}), "
                                 f"got method {method}")
    for name in ZOO_SSL_METHODS:
        if name != method and getattr(ssl, name) != getattr(defaults, name):
            raise ValueError(f"ssl.{name}: method {method} does not use it; remove [ssl.{name}]")
    if ssl.local_crops and method != "dino":
        raise ValueError(f"ssl.local_crops: only dino trains on extra local views, got method {method}")
    own = getattr(ssl, method, None)
    if own is not None and hasattr(own, "base_tau") and own.base_tau > own.final_tau:
        raise ValueError(f"ssl.{method}.base_tau: {own.base_tau} is above final_tau {own.final_tau}; "
                         "the momentum only rises")
    if method == "moco" and ssl.moco.queue_size < recipe.data.batch_size:
        raise ValueError(f"ssl.moco.queue_size: {ssl.moco.queue_size} holds less than one batch "
                         f"(data.batch_size {recipe.data.batch_size})")


class SemiSection(Section):
    """MixMatch and FixMatch: the labelled subset, the unlabelled weight and its ramp, the EMA; MixMatch's
    K views, sharpening and MixUp; FixMatch's confidence threshold, unlabelled ratio and strong view.

    Where FixMatch's defaults differ (Sohn et al. 2020, kekmodel/FixMatch-pytorch train.py), an unset key
    takes FixMatch's under method "fixmatch" (check_ssl_semi): lambda_u 1 (not 75), temperature 1 (the
    pseudo-label softmax; hard labels, T only moves the threshold), rampup_steps 0 (no ramp-up).
    """

    num_labels: int = Field(4000, ge=1)  # class-balanced: num_labels / classes per class
    label_seed: int | None = Field(None, ge=0, le=2**31 - 1)  # unset: train.seed
    views: int = Field(2, ge=1, le=16)  # K
    temperature: float = Field(0.5, gt=0, le=100)
    alpha: float = Field(0.75, gt=0, le=100)  # MixUp Beta(alpha, alpha)
    lambda_u: float = Field(75.0, ge=0, le=100_000)
    rampup_steps: int = Field(16384, ge=0)  # linear ramp of lambda_u over this many optimizer steps
    ema_decay: float = Field(0.999, ge=0, lt=1)
    # FixMatch (engine/methods/fixmatch.py; engine/data/randaugment.py for the strong view)
    threshold: float = Field(0.95, ge=0, le=1)  # pseudo-labels whose max probability is >= this count
    mu: int = Field(7, ge=1, le=64)  # unlabelled images per labelled one
    strong_ops: int = Field(2, ge=1, le=14)  # RandAugment ops per image (N)
    strong_magnitude: int = Field(10, ge=2, le=10)  # levels drawn from 1..magnitude-1 (of 10)
    cutout: float = Field(0.5, ge=0, le=1)  # Cutout side, a fraction of the image side (16 px at 32)


MIXMATCH_ONLY = ("views", "alpha")
FIXMATCH_ONLY = ("threshold", "mu", "strong_ops", "strong_magnitude", "cutout")
FIXMATCH_DEFAULTS = {"lambda_u": 1.0, "temperature": 1.0, "rampup_steps": 0}


def _check_semi(recipe: Recipe) -> None:
    """One method's [semi] keys set for the other are mistakes; FixMatch's own defaults where unset."""
    method, semi, defaults = recipe.run.method, recipe.semi, SemiSection()
    for own, other in (("mixmatch", FIXMATCH_ONLY), ("fixmatch", MIXMATCH_ONLY)):
        for key in other if method == own else ():
            if getattr(semi, key) != getattr(defaults, key):
                raise ValueError(f"semi.{key}: unused by {method}; remove it")
    if method == "fixmatch":
        for key, value in FIXMATCH_DEFAULTS.items():
            if key not in semi.model_fields_set:
                setattr(semi, key, value)


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
    if method in (*SSL_METHODS, "linear_eval", "finetune", "mixmatch", "fixmatch") and is_auxiliary(recipe.model.arch):
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
    _check_ssl_zoo(recipe)
    _check_semi(recipe)
    if method in SSL_METHODS and "best_metric" not in recipe.checkpoint.model_fields_set:
        recipe.checkpoint.best_metric = "val.knn_top1"  # there is no class top-1 to pick best.pt by
