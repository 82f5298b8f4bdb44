"""Student methods: `kd`, `hsakd`, `teacher_target`, and deep supervision (`supervised_aux`).

All share one shape (StudentMethod): an optional frozen teacher from `[teacher]`, a per-head
loss, and optional deep supervision. Deep supervision (`[distill] aux_stage` = k) puts a small
classifier (BN-ReLU-pool-linear) on the output of stage k of the student and adds
`aux_weight` x the method's own per-head loss on it: loss = main + aux_weight * aux. The head
is saved as module `aux_head`; the checkpoint's `model` stays the plain student.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from engine.data import DataBundle
from engine.data import augment as aug
from engine.errors import CheckpointError
from engine.methods import losses
from engine.methods.base import Method, StepOutput
from engine.models import is_auxiliary
from engine.recipe import Recipe, RecipeError
from engine.teacher import Teacher

DEFAULT_TEMPERATURE = {"kd": 4.0, "hsakd": 3.0, "teacher_target": 1.0}


class AuxHead(nn.Module):
    """Deep-supervision classifier on an intermediate feature map: BN-ReLU-pool-linear."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, fmap: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(fmap)).mean((2, 3)))


class StudentMethod(Method):
    """Student + optional teacher + optional deep-supervision head. Subclasses define head_loss."""

    needs_teacher = True
    rotations = False  # hsakd trains on the 4x rotation-expanded batch

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        cfg = recipe.distill
        self.temperature = cfg.temperature or DEFAULT_TEMPERATURE.get(recipe.run.method, 1.0)
        self.aux_student = is_auxiliary(recipe.model.arch)
        teacher = recipe.teacher
        self.teacher = Teacher(teacher.checkpoint, data, device, teacher.arch) if self.needs_teacher else None
        if self.rotations and self.teacher is not None and not self.teacher.auxiliary:
            raise CheckpointError(f"{self.teacher.path}: teacher arch {self.teacher.arch!r} has no auxiliary branches; "
                                  f"{recipe.run.method} needs an *_aux teacher (train one with method hsakd_teacher)")
        if self.teacher is not None and recipe.train.channels_last_on(device.type):  # trainer: saved modules only
            self.teacher.model.to(memory_format=torch.channels_last)
        self.aux_head = self._build_aux_head(cfg.aux_stage).to(device) if cfg.aux_stage else None

    # ---- construction ---------------------------------------------------------
    def _plain(self) -> nn.Module:
        """The student's plain classifier (the backbone of an `*_aux` student)."""
        return self.model.backbone if self.aux_student else self.model

    def _build_aux_head(self, stage: int) -> AuxHead:
        net = self._plain()
        was_training = net.training
        net.eval()
        with torch.no_grad():
            size = self.data.image_size
            feats = net.stage_features(torch.zeros(1, 3, size, size, device=self.device))
        net.train(was_training)
        if not 1 <= stage < len(feats):
            raise RecipeError("recipe.toml", "distill.aux_stage",
                              f"{self.recipe.model.arch} has intermediate stages 1..{len(feats) - 1}, got {stage}")
        return AuxHead(feats[stage - 1].shape[1], self.recipe.model.num_classes or self.data.num_classes)

    def parameter_groups(self) -> Iterable[Any]:
        head = list(self.aux_head.parameters()) if self.aux_head is not None else []
        return [p for p in self.model.parameters() if p.requires_grad] + head

    def modules_to_save(self) -> dict[str, nn.Module]:
        return {"model": self.model, **({"aux_head": self.aux_head} if self.aux_head is not None else {})}

    def train_mode(self) -> None:
        self.model.train()
        if self.aux_head is not None:
            self.aux_head.train()

    # ---- training -------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """(main logits, [branch logits] of an `*_aux` student, deep-supervision logits or None)."""
        if self.aux_head is None:
            out = self.model(x)
            return (out[0], list(out[1]), None) if self.aux_student else (out, [], None)
        net = self._plain()  # one pass through the stages, shared by every head
        feats = net.stage_features(x)
        main = net.classifier(net.global_pool(feats[-1]))
        branches = list(self.model.auxiliary_classifier(feats[:3])) if self.aux_student else []
        return main, branches, self.aux_head(feats[self.recipe.distill.aux_stage - 1])

    def head_loss(self, logits: Tensor, labels: Tensor, teacher: Tensor | None) -> losses.Terms:
        """The method's loss for one class head (main or deep-supervision) given teacher logits."""
        raise NotImplementedError

    def loss(self, main: Tensor, branches: list[Tensor], labels: Tensor, t_main: Tensor | None,
             t_branches: list[Tensor]) -> losses.Terms:
        """The whole loss of the student's outputs; by default the main head's head_loss."""
        del branches, t_branches
        return self.head_loss(main, labels, t_main)

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        x = self.augment(images, generator)
        if self.rotations:
            x = aug.rotate4(x)
        t_main, t_branches = None, []
        if self.teacher is not None:
            t_main, t_branches = self.teacher.logits_and_aux(x) if self.rotations else (self.teacher.logits(x), [])
        main, branches, deep = self.forward(x)
        terms = self.loss(main, branches, labels, t_main, t_branches)
        if deep is not None:
            terms = losses.with_deep_supervision(terms, self.head_loss(deep, labels, t_main),
                                                 self.recipe.distill.aux_weight)
        shown = main[0::losses.NUM_ROTATIONS] if self.rotations else main
        return {**terms, "logits": shown.detach(), "labels": labels}

    def logits(self, images: Tensor) -> Tensor:
        """Main head only: evaluating an `*_aux` student need not run its branches."""
        model = self.eval_model()
        return model.backbone(images) if self.aux_student else model(images)


class SupervisedAux(StudentMethod):
    """Supervised cross-entropy with deep supervision (`[distill] aux_stage`, `aux_weight`)."""

    needs_teacher = False

    def head_loss(self, logits: Tensor, labels: Tensor, teacher: Tensor | None) -> losses.Terms:
        return losses.supervised_loss(logits, labels, self.recipe.train.label_smoothing)


class KD(StudentMethod):
    """Hinton KD: alpha * KL(p_t || p_s) * T^2 + (1 - alpha) * CE."""

    def head_loss(self, logits: Tensor, labels: Tensor, teacher: Tensor | None) -> losses.Terms:
        assert teacher is not None
        return losses.kd_loss(logits, teacher, labels, self.temperature, self.recipe.distill.alpha,
                              self.recipe.train.label_smoothing)


class TeacherTarget(StudentMethod):
    """CE on the true labels + target_weight * CE with the teacher's softmax(t/T) as target."""

    def head_loss(self, logits: Tensor, labels: Tensor, teacher: Tensor | None) -> losses.Terms:
        assert teacher is not None
        return losses.teacher_target_loss(logits, teacher, labels, self.temperature,
                                          self.recipe.distill.target_weight, self.recipe.train.label_smoothing)


class HSAKD(StudentMethod):
    """HSAKD student (`*_aux` student and teacher) on the rotation-expanded batch.

    Main head: ce_weight * CE(un-rotated rows) + main_kd_weight * KL over all 4B rows; each
    branch: aux_kd_weight * KL against the teacher's same branch; no CE on the branches.
    """

    rotations = True

    def loss(self, main: Tensor, branches: list[Tensor], labels: Tensor, t_main: Tensor | None,
             t_branches: list[Tensor]) -> losses.Terms:
        assert t_main is not None
        cfg = self.recipe.distill
        return losses.hsakd_student_loss(main, branches, t_main, t_branches, labels, self.temperature, cfg.ce_weight,
                                         cfg.aux_kd_weight, cfg.main_kd_weight, self.recipe.train.label_smoothing)

    def head_loss(self, logits: Tensor, labels: Tensor, teacher: Tensor | None) -> losses.Terms:
        """Deep supervision: the main-head part (CE + KL against the teacher's main logits)."""
        return self.loss(logits, [], labels, teacher, [])
