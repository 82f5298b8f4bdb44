"""The distillation zoo's one shape: a plain student learning from a frozen teacher's features.

    loss = ce_weight * CE(student, labels)                      RepDistiller's -r (gamma)
         + kd_weight * KL(p_teacher || p_student) * T^2         -a (alpha)
         + feature_weight * the method's own loss               -b (beta)

A method module subclasses `FeatureDistill` and defines `feature_loss` (and, where it has them,
`build_modules` for its trainable connectors / embeddings / regressors, and `init_loss` plus an
`init_epochs` default for a stage that runs before distillation). Everything else (the teacher,
the optimizer's parameters, checkpoints, resume, the initialisation phase) is shared here, so
no method branches reach the trainer. Teacher and student feature lists follow RepDistiller's
`is_feat=True` order (`Features.as_list()`): index them as the reference does.

Defaults of the shared weights come from RepDistiller (HobbitLong/RepDistiller,
scripts/run_cifar_distill.sh and train_student.py): gamma 1, alpha 0, kd_T 4, init_epochs 30.
Each method names the source of its own beta (`default_feature_weight`) in its docstring.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import DataBundle
from engine.methods.base import Method, Phase, StepOutput
from engine.methods.losses import kl_term
from engine.methods.pretrained import backbone_checkpoint
from engine.models.base import Features
from engine.recipe import Recipe
from engine.teacher import Teacher

DEFAULT_TEMPERATURE = 4.0  # RepDistiller's --kd_T


def stage_pairs(student: Features, teacher: Features, method: str) -> list[tuple[Tensor, Tensor]]:
    """(student, teacher) stage maps feat[1:-1], paired one to one (at, nst, kdsvd, vid, ab)."""
    s, t = student.as_list()[1:-1], teacher.as_list()[1:-1]
    if len(s) != len(t):
        raise ValueError(f"{method}: the student has {len(s)} stage maps and the teacher {len(t)}; "
                         "the method pairs them one to one")
    return list(zip(s, t, strict=True))


class FeatureDistill(Method):
    """A student (`self.model`), a frozen `Teacher`, and the method's own trainable modules."""

    preact = False  # the method reads pre-activation stage maps (RepDistiller's preact=True: ab)
    default_feature_weight = 0.0  # beta of the reference's sample script
    default_init_epochs = 0  # epochs of the stage before distillation (0: none)

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        cfg = recipe.distill
        self.teacher = Teacher(backbone_checkpoint(recipe), data, device, recipe.teacher.arch)
        if recipe.train.channels_last_on(device.type):  # the trainer converts saved modules only
            self.teacher.model.to(memory_format=torch.channels_last)
        self.temperature = cfg.temperature or DEFAULT_TEMPERATURE
        self.feature_weight = self.default_feature_weight if cfg.feature_weight is None else cfg.feature_weight
        self.init_epochs = self.default_init_epochs if cfg.init_epochs is None else cfg.init_epochs
        student, teacher = self.probe()
        self.distill_modules: nn.ModuleDict = self.build_modules(student, teacher).to(device)

    # ---- construction ---------------------------------------------------------
    @torch.no_grad()
    def probe(self) -> tuple[Features, Features]:
        """Student and teacher features of a 2-image batch (eval mode): the shapes modules are built for."""
        size = self.data.image_size
        x = torch.zeros(2, 3, size, size, device=self.device)
        was_training = self.model.training
        self.model.eval()
        student = self.model(x, features=True, preact=self.preact)
        self.model.train(was_training)
        return student, self.teacher.features(x, preact=self.preact)

    def build_modules(self, student: Features, teacher: Features) -> nn.ModuleDict:
        """The method's trainable modules, sized from probe features (none by default)."""
        del student, teacher
        return nn.ModuleDict()

    def student_feature_parameters(self) -> list[nn.Parameter]:
        """Every student parameter but the classifier's (RepDistiller's get_feat_modules())."""
        head = {id(p) for p in self.model.classifier.parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in head]

    def parameter_groups(self) -> Iterable[Any]:
        return [p for p in self.model.parameters() if p.requires_grad] + self.trainable_module_parameters()

    def trainable_module_parameters(self) -> list[nn.Parameter]:
        """What of the method's own modules the main phase trains (all of them by default)."""
        return [p for p in self.distill_modules.parameters() if p.requires_grad]

    def modules_to_save(self) -> dict[str, nn.Module]:
        """The student is `model` (what eval and diff load); the method's modules ride along for resume."""
        return {"model": self.model, **({"distill": self.distill_modules} if len(self.distill_modules) else {})}

    def train_mode(self) -> None:
        self.model.train()
        self.distill_modules.train()

    # ---- the initialisation phase ---------------------------------------------
    def init_parameters(self) -> list[nn.Parameter]:
        """What the initialisation phase trains (methods with one override this)."""
        raise NotImplementedError(f"{type(self).__name__} has no initialisation phase")

    def pre_phases(self) -> list[Phase]:
        if not self.init_epochs:
            return []
        return [Phase("init", self.init_epochs, self.init_parameters(), self.recipe.distill.init_lr)]

    def init_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        """The loss of the initialisation phase (methods with one override this)."""
        raise NotImplementedError(f"{type(self).__name__} has no initialisation phase")

    # ---- training -------------------------------------------------------------
    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        """The method's own loss (unweighted); `teacher` holds no gradients."""
        raise NotImplementedError

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        x = self.augment(images, generator)
        teacher = self.teacher.features(x, preact=self.preact)
        student = self.model(x, features=True, preact=self.preact)
        if self.phase == "init":
            loss = self.init_loss(student, teacher, labels, indices)
            return {"loss": loss, "loss_init": loss.detach(), "logits": student.logits.detach(), "labels": labels}
        cfg = self.recipe.distill
        terms: dict[str, Tensor] = {
            "loss_ce": cfg.ce_weight * F.cross_entropy(student.logits, labels,
                                                       label_smoothing=self.recipe.train.label_smoothing)}
        if cfg.kd_weight:
            terms["loss_kd"] = cfg.kd_weight * kl_term(student.logits, teacher.logits, self.temperature)
        if self.feature_weight:
            terms["loss_feat"] = self.feature_weight * self.feature_loss(student, teacher, labels, indices)
        loss = sum(terms.values())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}, "logits": student.logits.detach(),
                "labels": labels}
