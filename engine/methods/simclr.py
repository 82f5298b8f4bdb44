"""SimCLR (Chen et al. 2020): two augmented views per image, NT-Xent on projected features.

The network is the zoo backbone (its classifier unused and frozen) plus a projection head;
checkpoints hold both as `backbone.*` / `head.*`, and linear evaluation or fine-tuning load the
backbone from there (engine/methods/pretrained.py). Representation quality is monitored with
a weighted kNN top-1 of backbone features (bank: the training split, un-augmented).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from engine.data import DataBundle, Split
from engine.data import augment as aug
from engine.methods.base import Method, StepOutput
from engine.methods.ssl_losses import ProjectionHead, knn_predict, nt_xent, world_size
from engine.recipe import Recipe, RecipeError


class SimCLRNet(nn.Module):
    """backbone.forward_features -> projection head; `backbone` stays a plain zoo model."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone.forward_features(x))


class KNNMonitor:
    """kNN top-1 of an encoder's features on a split, voting with the training split's features.

    The bank is recomputed once per optimizer step count, so evaluating val and test after the
    same epoch encodes the training split once.
    """

    def __init__(self, data: DataBundle, device: torch.device, k: int, temperature: float) -> None:
        self.data, self.device, self.k, self.temperature = data, device, k, temperature
        self._bank: tuple[int, Tensor, Tensor] | None = None

    @torch.no_grad()
    def encode(self, encoder: Callable[[Tensor], Tensor], split: Split, batch_size: int) -> tuple[Tensor, Tensor]:
        feats, labels = [], []
        for images, y, _ in split.batches(batch_size, shuffle=False, drop_last=False, device=self.device):
            feats.append(encoder(aug.normalize(images, self.data.mean, self.data.std)).float())
            labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    def top1(self, encoder: Callable[[Tensor], Tensor], split: Split, batch_size: int, step: int) -> float:
        if self._bank is None or self._bank[0] != step:
            self._bank = (step, *self.encode(encoder, self.data.train, batch_size))
        _, bank, bank_labels = self._bank
        feats, labels = self.encode(encoder, split, batch_size)
        predicted = knn_predict(feats, bank, bank_labels, self.data.num_classes, self.k, self.temperature)
        return float((predicted == labels).float().mean()) if len(labels) else 0.0


def require_full_batches(recipe: Recipe, data: DataBundle, method: str) -> None:
    """drop_last with a batch larger than the training split would train zero steps."""
    if len(data.train) < recipe.data.batch_size:
        raise RecipeError(f"recipe {recipe.run.name!r}", "data.batch_size",
                          f"{recipe.data.batch_size} is more than the {len(data.train)} training images; "
                          f"{method} drops the last partial batch, so no step would run")


class SimCLR(Method):
    drop_last = True  # NT-Xent's positives/negatives assume full, equal-sized batches

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        require_full_batches(recipe, data, "simclr")
        if recipe.data.batch_size % world_size():
            raise RecipeError(f"recipe {recipe.run.name!r}", "data.batch_size",
                              f"{recipe.data.batch_size} does not split evenly over {world_size()} processes; "
                              "SimCLR gathers equal shares of the global batch")
        super().__init__(recipe, data, device)
        cfg = recipe.ssl
        self.knn = KNNMonitor(data, device, cfg.knn_k, cfg.knn_temperature)
        self.step = 0

    def build_model(self) -> nn.Module:
        backbone = super().build_model()
        backbone.classifier.requires_grad_(False)  # unused: SimCLR trains features only
        cfg = self.recipe.ssl
        return SimCLRNet(backbone, ProjectionHead(backbone.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim))

    def views(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """[2B,...]: the first view of every image, then the second."""
        cfg = self.recipe.ssl
        return aug.simclr_views(images, generator, mean=self.data.mean, std=self.data.std, crop_scale=cfg.crop_scale,
                                jitter=cfg.jitter, jitter_p=cfg.jitter_p, gray_p=cfg.gray_p, flip_p=cfg.flip_p)

    def contrastive_loss(self, images: Tensor, generator: torch.Generator,
                         gather: bool = True) -> tuple[Tensor, Tensor]:
        """(NT-Xent, fraction of rows whose positive is the most similar key) for one batch;
        under torchrun the negatives span every rank's share of the batch unless gather=False."""
        z1, z2 = self.model(self.views(images, generator)).chunk(2)  # one pass: BN sees both views
        loss, logits, positive = nt_xent(z1, z2, self.recipe.ssl.temperature, gather)
        return loss, (logits.argmax(dim=1) == positive).float().mean()

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        loss, pos_top1 = self.contrastive_loss(images, generator)
        return {"loss": loss, "pos_top1": pos_top1}

    def after_optimizer_step(self, step: int) -> None:
        self.step = step

    @torch.no_grad()
    def evaluate(self, split: Split, batch_size: int) -> dict[str, float]:
        """NT-Xent on the split (views from a fixed seed, negatives within each eval batch) and the
        backbone's kNN top-1; both per-sample means, as torchrun's sharded evaluation expects."""
        model = self.model
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(self.recipe.train.seed)
        total, count = 0.0, 0
        for images, _, _ in split.batches(batch_size, shuffle=False, drop_last=False, device=self.device):
            if len(images) > 1:
                total += float(self.contrastive_loss(images, generator, gather=False)[0]) * len(images)
                count += len(images)
        knn_top1 = self.knn.top1(model.backbone.forward_features, split, batch_size, self.step)
        model.train(was_training)
        return {"loss": total / max(count, 1), "knn_top1": knn_top1}
