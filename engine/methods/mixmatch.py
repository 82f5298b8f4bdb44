"""MixMatch (Berthelot et al. 2019): semi-supervised training from a few labels.

The method keeps the trainer method-agnostic by owning its data draws: it splits the training
split once into a class-balanced labelled subset (semi.num_labels, seeded) and the unlabelled
rest, and every step draws one batch of each with the trainer's generator. The trainer's own
batch is used only as the clock (one step per batch, drop_last) and its labels are never read,
so no label outside the subset can leak. All randomness (draws, augmentation, Beta, the MixUp
permutation) comes from that generator, so resume stays bit-exact.

Evaluation, checkpoints' `model`, `kdtui eval` and diff all use the EMA of the weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import DataBundle, Split
from engine.methods.base import Method, StepOutput
from engine.methods.ssl_losses import (
    ema_update,
    guess_labels,
    interleave,
    linear_rampup,
    mixup,
    probability_mse,
    sample_mix_lambda,
    sharpen,
    soft_cross_entropy,
)
from engine.recipe import Recipe, RecipeError


def labelled_subset(labels: Tensor, num_labels: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """(labelled rows, unlabelled rows), sorted: num_labels / num_classes random rows of each class."""
    per_class, remainder = divmod(num_labels, num_classes)
    if remainder or per_class == 0:
        raise ValueError(f"{num_labels} labels cannot be split evenly over {num_classes} classes; "
                         f"use a multiple of {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        rows = (labels == c).nonzero().squeeze(1)
        if len(rows) <= per_class:
            raise ValueError(f"class {c} has {len(rows)} training images, not more than the {per_class} "
                             "labelled ones it needs (none would be left unlabelled)")
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    labelled = torch.cat(chosen).sort().values
    is_unlabelled = torch.ones(len(labels), dtype=torch.bool)
    is_unlabelled[labelled] = False
    return labelled, is_unlabelled.nonzero().squeeze(1)


def draw(pool: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n distinct rows of pool (with replacement only if the pool is smaller than n)."""
    if n <= len(pool):
        return pool[torch.randperm(len(pool), generator=generator)[:n]]
    return pool[torch.randint(len(pool), (n,), generator=generator)]


def gather_images(split: Split, rows: Tensor, device: torch.device) -> Tensor:
    """uint8 images of `rows`, indexed on the device where the split keeps a copy there."""
    if hasattr(split, "on_device"):
        images, _ = split.on_device(device)
        return images[rows.to(images.device)]
    return split.images(rows).to(device)


class MixMatch(Method):
    drop_last = True  # equal labelled and unlabelled batch sizes every step

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        cfg = recipe.semi
        seed = recipe.train.seed if cfg.label_seed is None else cfg.label_seed
        try:
            self.labelled, self.unlabelled = labelled_subset(data.train.labels, cfg.num_labels, data.num_classes, seed)
        except ValueError as err:
            raise RecipeError(f"recipe {recipe.run.name!r}", "semi.num_labels", str(err)) from None
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.step = 0

    def eval_model(self) -> nn.Module:
        return self.ema

    def modules_to_save(self) -> dict[str, nn.Module]:
        return {"model": self.model, "ema": self.ema}  # the trainer saves, restores and syncs both

    def extra_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        """The trainer's batch is the clock only: its size (this rank's share under torchrun) is
        how many labelled and unlabelled images to draw; its images and labels are not used."""
        del images
        cfg, train = self.recipe.semi, self.data.train
        batch = len(labels)
        rows_x, rows_u = draw(self.labelled, batch, generator), draw(self.unlabelled, batch, generator)
        x = self.augment(gather_images(train, rows_x, self.device), generator)
        targets_x = F.one_hot(train.labels[rows_x], self.data.num_classes).float().to(self.device)
        unlabelled = gather_images(train, rows_u, self.device)
        views_u = [self.augment(unlabelled, generator) for _ in range(cfg.views)]
        with torch.no_grad():
            targets_u = sharpen(guess_labels([self.model(v) for v in views_u]), cfg.temperature)

        inputs = torch.cat([x, *views_u])
        targets = torch.cat([targets_x, targets_u.repeat(cfg.views, 1)])
        lam = sample_mix_lambda(cfg.alpha, generator)
        mixed_x, mixed_y = mixup(inputs, targets, lam, torch.randperm(len(inputs), generator=generator))

        # One forward pass per chunk, each chunk holding labelled and unlabelled rows (batch norm).
        chunks = interleave(list(mixed_x.split(batch)), batch)
        logits = interleave([self.model(chunk) for chunk in chunks], batch)
        loss_x = soft_cross_entropy(logits[0], mixed_y[:batch])
        loss_u = probability_mse(torch.cat(logits[1:]), mixed_y[batch:])
        weight = cfg.lambda_u * linear_rampup(self.step, cfg.rampup_steps)
        return {"loss": loss_x + weight * loss_u, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                "lambda_u": torch.tensor(weight, device=loss_x.device)}

    def after_optimizer_step(self, step: int) -> None:
        ema_update(self.ema, self.model, self.recipe.semi.ema_decay)
        self.step = step
