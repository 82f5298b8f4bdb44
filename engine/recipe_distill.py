"""Recipe sections of the distillation methods: `[distill]` and `[teacher_training]`, and the
cross-section rules they bring. Torch-free, like engine/recipe.py which assembles them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from engine.recipe_sections import Section

if TYPE_CHECKING:
    from engine.recipe import Recipe

# ---------------------------------------------------------------- distillation (issue 3)
# `[distill]`: student losses (engine/methods/distill.py) and deep supervision;
# `[teacher_training]`: HSAKD teachers (engine/methods/hsakd_teacher.py).

# The distillation zoo (issue 13, engine/methods/zoo/): RepDistiller's methods and mdistiller's DKD.
# loss = ce_weight * CE + kd_weight * KL term + feature_weight * the method's own loss (-r, -a, -b).
ZOO_METHODS = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "kdsvd", "crd", "dkd")
DISTILL_METHODS = ("kd", "hsakd", "teacher_target", *ZOO_METHODS)  # students that learn from a [teacher]
INIT_PHASE_METHODS = ("ab", "ft", "fsp", "fitnet")  # zoo methods with a stage before distillation
DEEP_SUPERVISION_METHODS = ("kd", "hsakd", "teacher_target", "supervised_aux")  # honour distill.aux_stage


class FitNetSection(Section):
    """`[distill.fitnet]`: which feature map (index into the [f0, f1, ..., pooled] list) gives the hint."""

    hint_layer: int = Field(2, ge=0, le=4)


class ATSection(Section):
    """`[distill.at]`: attention maps are the channel mean of |f|^p (RepDistiller's p = 2)."""

    p: float = Field(2.0, gt=0, le=16)


class CCSection(Section):
    """`[distill.cc]`: the linear embeddings of the pooled features the correlation compares."""

    feat_dim: int = Field(128, ge=1, le=65536)


class VIDSection(Section):
    """`[distill.vid]`: initial predicted variance (softplus^-1 parametrised) and its floor."""

    init_pred_var: float = Field(5.0, gt=0, le=1e6)
    eps: float = Field(1e-5, gt=0, le=1)

    @model_validator(mode="after")
    def _variance_above_floor(self) -> VIDSection:
        if self.init_pred_var <= self.eps:  # the log-scale starts at softplus^-1(init_pred_var - eps)
            raise ValueError(f"init_pred_var ({self.init_pred_var}) must exceed eps ({self.eps})")
        return self


class RKDSection(Section):
    """`[distill.rkd]`: weights of the distance and angle terms."""

    distance_weight: float = Field(25.0, ge=0, le=1e6)
    angle_weight: float = Field(50.0, ge=0, le=1e6)


class KDSVDSection(Section):
    """`[distill.kdsvd]`: how many of the teacher's leading singular vectors each stage passes on."""

    k: int = Field(1, ge=1, le=64)


class ABSection(Section):
    """`[distill.ab]`: the activation-boundary margin."""

    margin: float = Field(1.0, ge=0, le=100)


class FTSection(Section):
    """`[distill.ft]`: the paraphraser's rate (factor channels = rate * teacher channels) and
    FactorTransfer's exponents (RepDistiller's p1, p2)."""

    rate: float = Field(0.5, gt=0, le=4)
    p1: float = Field(2.0, gt=0, le=16)  # factor = normalize(mean_c f^p1)
    p2: int = Field(1, ge=1, le=2)  # loss = mean |factor_s - factor_t|^p2


class CRDSection(Section):
    """`[distill.crd]`: embedding size, negatives per sample, NCE temperature, memory momentum."""

    feat_dim: int = Field(128, ge=1, le=65536)
    nce_k: int = Field(16384, ge=1, le=10_000_000)
    nce_t: float = Field(0.07, gt=0, le=100)
    nce_m: float = Field(0.5, ge=0, le=1)
    # negatives are other classes' rows in both; the positive is the row itself (exact) or a row of its class (relax)
    mode: Literal["exact", "relax"] = "exact"


class DKDSection(Section):
    """`[distill.dkd]`: target-class (alpha) and non-target-class (beta) weights, linear warm-up."""

    alpha: float = Field(1.0, ge=0, le=1000)
    beta: float = Field(8.0, ge=0, le=1000)
    warmup_epochs: int = Field(20, ge=0, le=100_000)


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
    # the zoo (ZOO_METHODS): RepDistiller's -r is ce_weight (above), -a kd_weight, -b feature_weight
    kd_weight: float = Field(0.0, ge=0, le=1e6)  # weight of the KL term (RepDistiller's scripts: 0)
    feature_weight: float | None = Field(None, ge=0, le=1e9)  # unset: the method's reference value
    init_epochs: int | None = Field(None, ge=0, le=100_000)  # unset: the method's (ab, ft, fsp: 30)
    init_lr: float | None = Field(None, gt=0, le=1e9)  # initialisation phase lr; unset: optim.lr
    fitnet: FitNetSection = FitNetSection()
    at: ATSection = ATSection()
    cc: CCSection = CCSection()
    vid: VIDSection = VIDSection()
    rkd: RKDSection = RKDSection()
    kdsvd: KDSVDSection = KDSVDSection()
    ab: ABSection = ABSection()
    ft: FTSection = FTSection()
    crd: CRDSection = CRDSection()
    dkd: DKDSection = DKDSection()


class TeacherTrainingSection(Section):
    """HSAKD teachers: frozen = train the branches only, on the pretrained backbone named by [teacher]."""

    freeze_backbone: bool = False


def check_distill(recipe: Recipe) -> None:
    """Cross-section rules of the distillation methods; each message starts with its dotted key."""
    from engine.models.registry import is_auxiliary

    method, arch = recipe.run.method, recipe.model.arch
    has_teacher = bool(recipe.teacher.from_recipe or recipe.teacher.checkpoint)
    teacher_hint = 'set [teacher] from = "recipes/....toml" or checkpoint = "path/to/best.pt"'
    if method in DISTILL_METHODS and not has_teacher:
        raise ValueError(f"teacher: method {method} needs a teacher; {teacher_hint}")
    if method in ("hsakd", "hsakd_teacher") and not is_auxiliary(arch):
        raise ValueError(f"model.arch: method {method} needs an *_aux architecture (e.g. {arch}_aux), got {arch!r}")
    if method in ("kd", "teacher_target", "supervised_aux", *ZOO_METHODS) and is_auxiliary(arch):
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
    for key in ("kd_weight", "feature_weight", "init_epochs", "init_lr"):  # resolved recipes list every key
        if getattr(recipe.distill, key) != DistillSection.model_fields[key].default and method not in ZOO_METHODS:
            raise ValueError(f"distill.{key}: only the distillation zoo's methods use it ({', '.join(ZOO_METHODS)}), "
                             f"got method {method}")
    if recipe.distill.init_epochs and method not in INIT_PHASE_METHODS:
        raise ValueError(f"distill.init_epochs: method {method} has no initialisation stage; only "
                         f"{', '.join(INIT_PHASE_METHODS)} have one")
    if recipe.distill.aux_stage is not None and method not in DEEP_SUPERVISION_METHODS:
        raise ValueError(f"distill.aux_stage: method {method} has no deep supervision; use one of "
                         f"{', '.join(DEEP_SUPERVISION_METHODS)}")
