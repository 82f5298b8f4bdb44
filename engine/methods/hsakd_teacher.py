"""`hsakd_teacher`: train an `*_aux` network on HSAKD's self-supervised augmented labels.

Every batch of B images becomes 4B rows (rotations 0/90/180/270, `augment.rotate4`); each
auxiliary branch learns the joint (class, rotation) label and the main head the class of the
un-rotated rows. Two modes (`[teacher_training] freeze_backbone`):

* joint: backbone and branches trained together from scratch;
* frozen: the backbone (main fc included) comes from a pretrained plain checkpoint named by
  `[teacher] from` / `checkpoint`, stays in eval() with requires_grad=False, is left out of
  the optimizer, and the branches see detached features: only the branches train.

evaluate() reports the main head (loss/top1/top5 on un-rotated images) and, per branch i,
`aux{i}_joint_top1` (rotation x class, over all 4N rotated rows) and `aux{i}_class_top1` (the
branch's 4C logits summed over rotations, over all 4N rows), as the reference does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import Split
from engine.data import augment as aug
from engine.errors import CheckpointError
from engine.methods.base import Method, StepOutput, topk_correct
from engine.methods.losses import NUM_ROTATIONS, hsakd_teacher_loss, rotation_class_logits
from engine.teacher import freeze, load_backbone


class HSAKDTeacher(Method):
    """Teacher training with the joint-label loss; the model is an `*_aux` architecture."""

    def build_model(self) -> nn.Module:
        from engine.models import build_model

        model = build_model(self.recipe.model.arch, self.recipe.model.num_classes or self.data.num_classes)
        if self.frozen:
            source = self.recipe.teacher.checkpoint
            if not source:  # `[teacher] from` is resolved to a checkpoint by the launcher
                raise CheckpointError("frozen hsakd_teacher: no pretrained backbone checkpoint in [teacher]; "
                                      "start the run with `kdtui run` so that [teacher] from is resolved")
            load_backbone(model.backbone, self.recipe.model.arch.removesuffix("_aux"), source, self.data,
                          self.recipe.teacher.arch)
            freeze(model.backbone)
        return model

    @property
    def frozen(self) -> bool:
        return self.recipe.teacher_training.freeze_backbone

    def parameter_groups(self) -> Iterable[Any]:
        if self.frozen:  # explicit: only the branches, whatever requires_grad says
            return list(self.model.auxiliary_classifier.parameters())
        return super().parameter_groups()

    def train_mode(self) -> None:
        self.model.train()
        if self.frozen:
            self.model.backbone.eval()  # BN running statistics of the pretrained backbone stay put

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        x = aug.rotate4(self.augment(images, generator))
        main, aux = self.model(x, detach_features=self.frozen)
        out: StepOutput = hsakd_teacher_loss(main, aux, labels, self.recipe.train.label_smoothing)
        joint = aug.joint_labels(labels, NUM_ROTATIONS)
        for i, logits in enumerate(aux, start=1):
            out[f"aux{i}_joint_top1"] = (logits.detach().argmax(1) == joint).float().mean()
        return {**out, "logits": main[0::NUM_ROTATIONS].detach(), "labels": labels}

    def logits(self, images: Tensor) -> Tensor:
        """Main head only: eval/diff of a teacher need not run its branches."""
        return self.eval_model().backbone(images)

    @torch.no_grad()
    def evaluate(self, split: Split, batch_size: int) -> dict[str, float]:
        was_training = self.model.training
        metrics = evaluate_auxiliary(self.eval_model(), split, batch_size, self.data.mean, self.data.std, self.device)
        if was_training:
            self.train_mode()  # model.train(True) would also wake the frozen backbone's BN
        return metrics


def evaluate_auxiliary(model: nn.Module, split: Split, batch_size: int, mean: tuple[float, ...],
                       std: tuple[float, ...], device: torch.device) -> dict[str, float]:
    """Main-head and per-branch metrics of an `*_aux` model; `batch_size` rows (= batch_size/4 images) a pass."""
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}  # main metrics: sums over N images; branch metrics: over 4N rows

    def add(name: str, value: Tensor) -> None:
        sums[name] = sums.get(name, 0) + value.double()

    with torch.no_grad():
        for images, labels, _ in split.batches(max(1, batch_size // NUM_ROTATIONS), shuffle=False, drop_last=False,
                                               generator=None, device=device):
            main, aux = model(aug.rotate4(aug.normalize(images, mean, std)))
            main = main[0::NUM_ROTATIONS].float()
            add("loss", F.cross_entropy(main, labels, reduction="sum"))
            top1, top5 = topk_correct(main, labels, (1, 5))
            add("top1", top1)
            add("top5", top5)
            joint = aug.joint_labels(labels, NUM_ROTATIONS)
            classes = labels.repeat_interleave(NUM_ROTATIONS)
            for i, logits in enumerate(aux, start=1):
                add(f"aux{i}_joint_top1", (logits.argmax(1) == joint).sum())
                add(f"aux{i}_class_top1", (rotation_class_logits(logits.float()).argmax(1) == classes).sum())
    model.train(was_training)
    n = max(len(split), 1)
    return {name: float(value) / (n if name in ("loss", "top1", "top5") else NUM_ROTATIONS * n)
            for name, value in sums.items()}
