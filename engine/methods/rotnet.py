"""RotNet (Gidaris et al. 2018): predict which of four rotations was applied to an image.

Each augmented batch of B images becomes 4B rows with `rot90` (row 4b+k is image b rotated
k times, label k); the zoo model is built with a 4-way classifier. Its features are what a
linear evaluation later loads (the 4-way head is dropped there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import DataBundle, Split
from engine.data import augment as aug
from engine.methods.base import Method, StepOutput
from engine.methods.simclr import KNNMonitor
from engine.recipe import Recipe

NUM_ROTATIONS = 4


class RotNet(Method):
    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        self.knn = KNNMonitor(data, device, recipe.ssl.knn_k, recipe.ssl.knn_temperature)
        self.step = 0

    def build_model(self) -> nn.Module:
        from engine.models import build_model

        kwargs = {"pretrained": self.recipe.model.pretrained} if self.recipe.model.pretrained else {}
        return build_model(self.recipe.model.arch, NUM_ROTATIONS, **kwargs)

    def rotation_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [4B, 4], rotation labels [4B]) for normalised images."""
        rotated = aug.rotate4(images)
        return self.model(rotated), aug.rotation_labels(len(images), NUM_ROTATIONS, device=rotated.device)

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        logits, rotations = self.rotation_logits(self.augment(images, generator))
        loss = F.cross_entropy(logits, rotations)
        return {"loss": loss, "rot_top1": (logits.detach().argmax(dim=1) == rotations).float().mean()}

    def after_optimizer_step(self, step: int) -> None:
        self.step = step

    @torch.no_grad()
    def evaluate(self, split: Split, batch_size: int) -> dict[str, float]:
        """Rotation loss and top-1 over all four rotations of the split, and the kNN top-1."""
        model = self.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for images, _, _ in split.batches(batch_size, shuffle=False, drop_last=False, device=self.device):
            logits, rotations = self.rotation_logits(aug.normalize(images, self.data.mean, self.data.std))
            totals[0] += float(F.cross_entropy(logits.float(), rotations, reduction="sum"))
            totals[1] += float((logits.argmax(dim=1) == rotations).sum())
        knn_top1 = self.knn.top1(model.forward_features, split, batch_size, self.step)
        model.train(was_training)
        loss, rot_top1 = (totals / max(NUM_ROTATIONS * len(split), 1)).tolist()
        return {"loss": loss, "rot_top1": rot_top1, "knn_top1": knn_top1}
