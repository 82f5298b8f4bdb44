"""FixMatch (Sohn et al. 2020): pseudo-labels from a weak view train the prediction on a strong view.

Per step: B labelled images (the trainer's batch size, as its clock) and mu * B unlabelled ones,
drawn by the method as MixMatch draws them (same class-balanced subset for the same seed, and
every draw, crop and RandAugment parameter from the trainer's generator, so resume is bit-exact).
Weak view: flip + random crop with reflect padding (data.crop_padding; kekmodel/FixMatch-pytorch
dataset/cifar.py TransformFixMatch, google-research/fixmatch augment_shift). Strong view: the same,
then RandAugment + Cutout (engine/data/randaugment.py). One forward pass over
[labelled, unlabelled weak, unlabelled strong], so batch norm sees all of them together (the
reference's interleave exists to keep that true when DataParallel splits the batch across GPUs;
under DDP each process concatenates its own rows, so concatenation is enough here).

    loss = CE(labelled) + lambda_u * mean over unlabelled rows of 1[max p_weak >= threshold] * CE(strong, argmax p_weak)

with p_weak = softmax(logits_weak / T) detached (no gradient through the pseudo-label side) and the
mean over all mu * B rows, masked or not (kekmodel train.py; the paper's eq. 2). Defaults, from the
paper and kekmodel train.py: threshold 0.95, mu 7, lambda_u 1, T 1, EMA 0.999 of the weights for
evaluation (ssl_losses.ema_update; it also averages batch-norm statistics, where kekmodel's ModelEMA
copies them), and weight decay only on conv / linear weights, not on biases or batch-norm parameters
(kekmodel's `no_decay = ['bias', 'bn']`; google-research/fixmatch decays only `kernel` variables).

Logged per step: loss_x, loss_u, mask_rate (fraction of unlabelled rows at or above the threshold),
pseudo_top1 (accuracy of the argmax pseudo-labels against the hidden true labels of all unlabelled
rows) and pseudo_correct (fraction both confident and right: pseudo_correct / mask_rate is the
precision of the pseudo-labels that train). The hidden labels are read for these metrics only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.data import augment as aug
from engine.data.randaugment import randaugment
from engine.methods.base import StepOutput
from engine.methods.mixmatch import MixMatch, draw, gather_images
from engine.methods.ssl_losses import linear_rampup


def _wide(logits: Tensor) -> Tensor:
    """Losses in at least float32 (bf16 / fp16 logits under autocast); float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def pseudo_labels(logits_weak: Tensor, threshold: float = 0.95, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(hard targets, mask): argmax of softmax(logits / T), and whether its probability is >= threshold."""
    probs = torch.softmax(_wide(logits_weak.detach()) / temperature, dim=1)
    confidence, targets = probs.max(dim=1)
    return targets, confidence >= threshold


def unlabelled_loss(logits_strong: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean over all rows of mask * cross-entropy(strong logits, pseudo-label)."""
    return (F.cross_entropy(_wide(logits_strong), targets, reduction="none") * mask).mean()


class FixMatch(MixMatch):
    """MixMatch's frame (labelled subset, draws, EMA for evaluation, step count), FixMatch's step."""

    def parameter_groups(self) -> list[dict]:
        """Weight decay on weights of rank >= 2 (convolutions, linear layers) only."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.ndim > 1]},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]

    def weak(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 flip + reflect-padded random crop (none if data.augment = "none")."""
        if self.recipe.data.augment == "standard":
            return aug.random_crop_flip(images, pad=self.recipe.data.crop_padding, generator=generator, reflect=True)
        return images

    def strong(self, images: Tensor, generator: torch.Generator) -> Tensor:
        cfg = self.recipe.semi
        return randaugment(self.weak(images, generator), generator, n=cfg.strong_ops, magnitude=cfg.strong_magnitude,
                           cutout_fraction=cfg.cutout)

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        """The trainer's batch is the clock only: B = its size (this rank's share under torchrun) labelled
        images and mu * B unlabelled ones are drawn here; its own images and labels are not used."""
        del images, indices
        cfg, train, dev = self.recipe.semi, self.data.train, self.device
        batch = len(labels)
        rows_x, rows_u = draw(self.labelled, batch, generator), draw(self.unlabelled, cfg.mu * batch, generator)
        x = self.weak(gather_images(train, rows_x, dev), generator)
        unlabelled = gather_images(train, rows_u, dev)
        u_weak, u_strong = self.weak(unlabelled, generator), self.strong(unlabelled, generator)
        inputs = aug.normalize(torch.cat([x, u_weak, u_strong]), self.data.mean, self.data.std)
        logits_x, logits_weak, logits_strong = self.model(inputs).split([batch, len(rows_u), len(rows_u)])

        targets_x = aug._on(train.labels[rows_x], dev)
        loss_x = F.cross_entropy(_wide(logits_x), targets_x)
        pseudo, mask = pseudo_labels(logits_weak, cfg.threshold, cfg.temperature)
        loss_u = unlabelled_loss(logits_strong, pseudo, mask)
        weight = cfg.lambda_u * linear_rampup(self.step, cfg.rampup_steps)
        with torch.no_grad():
            right = pseudo == aug._on(train.labels[rows_u], dev)
            stats = {"mask_rate": mask.float().mean(), "pseudo_top1": right.float().mean(),
                     "pseudo_correct": (right & mask).float().mean()}
        return {"loss": loss_x + weight * loss_u, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), **stats,
                "lambda_u": torch.tensor(weight, device=loss_x.device),
                "logits": logits_x.detach(), "labels": targets_x}
