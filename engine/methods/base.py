"""The interface between the trainer and a training method.

The trainer owns the loop, the optimizer, schedules, precision, checkpoints and
logging; a method owns its networks, how a batch becomes a loss, and how a split
is evaluated. Nothing method-specific lives in the trainer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import DataBundle, Split
from engine.data import augment as aug
from engine.recipe import Recipe

StepOutput = dict[str, Tensor]
"""`loss` (required, scalar, differentiable); optional `logits` + `labels` for train accuracy;
any other scalar entries (e.g. `loss_kd`) are averaged and logged under their names."""


@dataclass(frozen=True)
class Phase:
    """A stretch of training before the main one, with an optimizer of its own over its own
    parameters at a constant learning rate (RepDistiller's initialisation stage of ab, ft and
    fsp; FitNet's hint stage). The trainer runs its epochs first, logs them with `phase` = name,
    evaluates nothing, and keeps its optimizer state in the checkpoints for an exact resume."""

    name: str
    epochs: int
    parameters: list[Any]  # parameters or param-group dicts, as parameter_groups() returns
    lr: float | None = None  # None: optim.lr


class Method:
    """Base class: a supervised classifier on `self.model` with the standard augmentation."""

    drop_last = False  # contrastive methods need full batches
    phase = "train"  # set by the trainer before each epoch: a name from pre_phases(), or "train"
    epoch = 1  # set by the trainer before each epoch: 1-based, counted within the current phase

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        self.recipe, self.data, self.device = recipe, data, device
        self.model: nn.Module = self.build_model().to(device)

    # ---- construction -------------------------------------------------------
    def build_model(self) -> nn.Module:
        from engine.models import build_model

        num_classes = self.recipe.model.num_classes or self.data.num_classes
        kwargs: dict[str, Any] = {}
        if self.recipe.model.pretrained:
            kwargs["pretrained"] = self.recipe.model.pretrained
        return build_model(self.recipe.model.arch, num_classes, **kwargs)

    def parameter_groups(self) -> Iterable[Any]:
        """What the optimizer trains: parameters or param-group dicts. Frozen parts are left out."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def modules_to_save(self) -> dict[str, nn.Module]:
        """Networks whose state dicts go into checkpoints; `model` is what eval and diff load."""
        return {"model": self.model}

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond the networks (e.g. an EMA); must be tensors/plain data."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        del state

    def pre_phases(self) -> list[Phase]:
        """Phases to run before the main `train.epochs` (none by default)."""
        return []

    # ---- training -----------------------------------------------------------
    def train_mode(self) -> None:
        """Called at the start of every epoch. Frozen parts override this to stay in eval()."""
        self.model.train()

    def augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 batch -> normalised float batch with the recipe's training augmentation."""
        if self.recipe.data.augment == "standard":
            images = aug.random_crop_flip(images, pad=self.recipe.data.crop_padding, generator=generator)
        return aug.normalize(images, self.data.mean, self.data.std)

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        """One batch -> loss. `indices` are the rows' positions in the training split (the trainer
        always passes them; CRD's memory bank needs them); None only in direct calls from tests."""
        del indices
        logits = self.model(self.augment(images, generator))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.recipe.train.label_smoothing)
        return {"loss": loss, "logits": logits.detach(), "labels": labels}

    def after_optimizer_step(self, step: int) -> None:
        """Hook for per-step state such as an EMA (called after optimizer.step())."""
        del step

    # ---- evaluation ---------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The network that answers for this run in eval/diff (MixMatch: its EMA)."""
        return self.model

    def logits(self, images: Tensor) -> Tensor:
        """Class logits for normalised images (aux models return a tuple; take the main head)."""
        out = self.eval_model()(images)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def evaluate(self, split: Split, batch_size: int) -> dict[str, float]:
        """Loss, top-1 and top-5 of the eval model on a split, in its fixed order."""
        model = self.eval_model()
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        batches = split.batches(batch_size, shuffle=False, drop_last=False, generator=None, device=self.device)
        for images, labels, _ in batches:
            logits = self.logits(aug.normalize(images, self.data.mean, self.data.std)).float()
            totals[0] += F.cross_entropy(logits, labels, reduction="sum")
            totals[1:] += topk_correct(logits, labels, (1, 5))
        model.train(was_training)
        n = max(len(split), 1)
        loss, top1, top5 = (totals / n).tolist()
        return {"loss": loss, "top1": top1, "top5": top5}


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose label is among the top-k logits, for each k (k capped at classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(labels[:, None])
    return torch.stack([hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).to(torch.float64)
